"""The SSH transport: the agent runs over asyncssh channels.

Connecting follows OpenSSH: ``~/.ssh/config`` (or ``-F`` files) with Host,
HostName, Port, User, IdentityFile, ProxyJump, UserKnownHostsFile ...; the
ssh-agent; host keys checked against known_hosts unless told otherwise; never
a prompt.  One connection per host per process carries many channels, at
most ``max_sessions`` at a time (OpenSSH's ``MaxSessions``, default 10);
past that another connection is opened.

The agent is shipped once per host, content-addressed:
``~/.chaperone/agent-<sha256[:16]>.py``, written to a temporary name, its
hash checked there, then renamed into place; before every run a small
``python -c`` bootstrap checks the file's hash again and runs it only if it
matches (else exit 97: ship it again).  Only ``python3`` is needed on the
host.  Everything the agent reads (program.json, with the callback token)
travels on the channel's stdin, never in argv.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import List, Optional, Sequence

import asyncssh

from ...agent_source import agent_bytes
from ...errors import ConnectFailed, ConnectionLost
from .common import Launch, SSHTransportBase, Tunnel, connect_error, ship_command, ship_failure
from . import options as ssh_opts
from .options import (DEFAULT_CONNECT_TIMEOUT, FAST_CIPHERS, default_config_files, option_line,
                      prefer_fast_ciphers)
from ..target import Target
from ..base import AgentProcess

__all__ = ["SSHTransport"]


def _preferred_ciphers(config_files: Sequence[str]) -> Optional[List[str]]:
    """asyncssh's default ciphers with AES-GCM first when the CPU has AES
    instructions: every byte of output crosses this cipher in Python's one
    thread, and AES-GCM moves ~1.6x what chacha20-poly1305 does there
    (OpenSSH puts chacha first for CPUs without them).  Only the order
    changes, and never when an ssh config names its own ``Ciphers`` (as
    for OpenSSH: options.prefer_fast_ciphers)."""
    if not prefer_fast_ciphers(list(config_files) or ["~/.ssh/config"]):
        return None
    from asyncssh.encryption import get_default_encryption_algs

    algs = [a.decode() for a in get_default_encryption_algs()]
    gcm = [a for a in FAST_CIPHERS if "-gcm@" in a and a in algs]  # (aes128 first, as for OpenSSH)
    return gcm + [a for a in algs if a not in gcm]


def _host_of(hop: str) -> str:
    """The host name in a jump host's ``[user@]host[:port]``."""
    host = hop.rpartition("@")[2]
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _connect_error(target: Target, e: BaseException) -> ConnectFailed:
    """What an exception from ``asyncssh.connect`` means (nothing has run yet)."""
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return connect_error(target, "host_key")
    if isinstance(e, asyncssh.PermissionDenied):
        return connect_error(target, "auth")
    if isinstance(e, socket.gaierror):
        why = e.strerror or str(e)
        if e.errno == getattr(socket, "EAI_ADDRFAMILY", -9) or "Address family" in why:
            return connect_error(target, "family", why)
        # Through a jump host, the destination's name is resolved there: a
        # name that cannot be resolved here is the jump host's.
        return connect_error(target, "unknown_host", (_host_of(target.jump.split(",")[0]), why) if target.jump else why)
    if isinstance(e, ConnectionRefusedError):
        return connect_error(target, "refused")
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return connect_error(target, "timeout")
    if isinstance(e, (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError)):
        return connect_error(target, "dropped", getattr(e, "reason", "") or str(e))
    if isinstance(e, asyncssh.DisconnectError):
        return connect_error(target, "closed", e.reason)
    if isinstance(e, OSError):
        return connect_error(target, "unreachable", e.strerror or str(e))
    return connect_error(target, "other", str(e))


class _Refused(ConnectionLost):
    """The server keeps refusing to open a channel."""


class _Conn:
    """One SSH connection and the number of channels open on it.

    A channel's slot is given back only once the channel is fully closed
    (both sides said so), not when we ask to close it: until then the
    server still counts it against its MaxSessions."""

    def __init__(self, conn: asyncssh.SSHClientConnection, capacity: int):
        self.conn = conn
        self.channels = 0  # slots taken, closing channels included
        self.closing = 0  # of which asked to close, not closed yet
        self.capacity = capacity  # lowered if the server allows fewer

    @property
    def closed(self) -> bool:
        return self.conn._transport is None or self.conn.is_closed()


class _SSHProcess(AgentProcess):
    def __init__(self, transport: "SSHTransport", conn: _Conn, proc: asyncssh.SSHClientProcess):
        self.transport = transport
        self.c = conn
        self.proc = proc  # a _Replay
        self._released = False

    async def read(self, n: int = 1 << 20) -> bytes:
        try:
            return await self.proc.stdout.read(n)
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost: %s" % (self.transport.host, e)) from None

    async def wait(self) -> int:
        try:
            result = await self.proc.wait()
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost: %s" % (self.transport.host, e)) from None
        if result.exit_status is None or result.exit_status < 0:
            if result.exit_signal:
                raise ConnectionLost("the agent on %s was killed by %s" % (self.transport.host, result.exit_signal[0]))
            raise ConnectionLost("connection to %s lost" % self.transport.host)
        return result.exit_status

    async def stderr(self) -> bytes:
        try:
            return await self.proc.read_stderr()
        except (asyncssh.Error, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            await self.proc.stdin.drain()
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost: %s" % (self.transport.host, e)) from None

    async def write_eof(self) -> None:
        try:
            self.proc.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass

    def close(self) -> None:
        if not self._released:
            self._released = True
            self.transport._close_channel(self.c, self.proc)


class SSHTransport(SSHTransportBase):
    """A host reached through asyncssh: one connection carries many
    channels (up to ``max_sessions``, the server's MaxSessions); past that,
    another connection (at most ``connect_limit`` being set up at once)."""

    def __init__(self, target: Target, **tuning):
        super().__init__(target, **tuning)
        self.hostname = target.destination
        self._conns: List[_Conn] = []
        self._lock = asyncio.Lock()
        self._slot_freed = asyncio.Event()
        self._closers: set = set()
        self._config_dir: Optional[str] = None

    # Connections -----------------------------------------------------------

    def config_files(self) -> List[str]:
        """The ssh config files asyncssh reads, as ``ssh`` would: ``-F``
        files, else ``~/.ssh/config`` and ``/etc/ssh/ssh_config``; led by
        a file of the ``-o`` options and ``-J`` (the command line wins)."""
        files = list(self.target.config) or [p for p in default_config_files(())
                                              if os.access(os.path.expanduser(p), os.R_OK)]
        lines = [option_line(o) for o in self.target.options]
        if self.target.jump:
            lines.append("ProxyJump %s" % self.target.jump)
        if lines:
            # For the destination only, as ssh's -o and -J are: asyncssh
            # reads these files for each jump host too, and a ProxyJump
            # there would send it through itself, without end.
            lines = ["Host %s" % self.hostname] + ["    " + line for line in lines]
            if self._config_dir is None:
                import tempfile

                self._config_dir = tempfile.mkdtemp(prefix="chaperone-asyncssh-")  # 0700
            path = os.path.join(self._config_dir, "options")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            files.insert(0, path)
        return [os.path.expanduser(p) for p in files]

    def connect_options(self) -> dict:
        target = self.target
        options = dict(
            # () would be asyncssh's own default (~/.ssh/config only); None
            # would turn the config off.
            config=self.config_files() or None,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=3,
            agent_forwarding=False,
        )
        if self.connect_timeout is not None:
            # Given explicitly: wins over the config's ConnectTimeout.
            options["connect_timeout"] = self.connect_timeout
        if target.port:
            options["port"] = target.port
        if target.user:
            options["username"] = target.user
        # (as ssh: an -i file that cannot be read is passed over, the other keys are tried)
        keys = [k for k in target.identities if os.access(os.path.expanduser(k), os.R_OK)]
        if keys:
            options["client_keys"] = keys
        if not target.check_host_keys:
            options["known_hosts"] = None
        elif target.known_hosts:
            options["known_hosts"] = target.known_hosts
        ciphers = _preferred_ciphers(options["config"] or ())
        if ciphers:
            options["encryption_algs"] = ciphers
        return options

    async def _new_connection(self) -> _Conn:
        if ssh_opts.verbose():
            if ssh_opts.verbose() > 1:
                asyncssh.set_debug_level(ssh_opts.verbose())
            logging.getLogger("chaperone.ssh").debug("connecting to %s with asyncssh", self.target.name)

        async def connect():
            try:
                # asyncssh applies the config's ConnectTimeout (to the whole
                # connect: DNS, TCP, handshake, login) unless connect_timeout is
                # given; DEFAULT_CONNECT_TIMEOUT bounds it when neither says.
                return await asyncio.wait_for(
                    asyncssh.connect(self.hostname, **self.connect_options()),
                    DEFAULT_CONNECT_TIMEOUT if self.connect_timeout is None else None)
            except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
                raise _connect_error(self.target, e) from None

        async with self.connecting():
            conn = await self.retrying(connect)
        return _Conn(conn, self.max_sessions)

    async def _channel_slot(self) -> _Conn:
        """A slot for one channel: on a connection with room, else (once
        the channels being closed are closed, if that is quick) on a new
        connection."""
        loop = asyncio.get_running_loop()
        give_up_waiting = loop.time() + 2.0
        while True:
            async with self._lock:
                self._conns = [c for c in self._conns if not c.closed]
                for c in self._conns:
                    if c.channels < c.capacity:
                        c.channels += 1
                        return c
                closing = any(c.closing for c in self._conns)
                if not closing or loop.time() >= give_up_waiting:
                    c = await self._new_connection()
                    self._conns.append(c)
                    c.channels += 1
                    return c
                self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), max(0.0, give_up_waiting - loop.time()))
            except asyncio.TimeoutError:
                pass

    def _free_slot(self, c: _Conn) -> None:
        c.channels -= 1
        self._slot_freed.set()

    def _close_channel(self, c: _Conn, proc) -> None:
        """Close ``proc``'s channel; its slot is free once it is closed."""
        try:
            proc.close()
        except Exception:
            pass
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._free_slot(c)
            return
        c.closing += 1

        async def when_closed():
            try:
                await asyncio.wait_for(proc.wait_closed(), 10.0)
            except Exception:
                pass
            finally:
                c.closing -= 1
                self._free_slot(c)

        task = loop.create_task(when_closed())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _create_process(self, c: _Conn, command: str):
        """``command`` in a new channel on ``c``, whose slot the caller
        holds.  A refused channel ("open failed": the server's sessions are
        all taken, e.g. by channels it has not finished closing yet) is tried
        again for a moment before :class:`_Refused` is raised."""
        delay, waited = 0.02, 0.0
        while True:
            try:
                return await c.conn.create_process(command, encoding=None)
            except asyncssh.ChannelOpenError as e:
                if waited >= 2.0:
                    raise _Refused("cannot open a channel to %s: %s" % (self.host, e.reason)) from None
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 0.25)
            except (asyncssh.Error, OSError) as e:
                self.drop_connections()
                raise ConnectionLost("connection to %s lost: %s" % (self.host, e)) from None

    async def _channel(self, command: str):
        """``(connection, process)``: ``command`` in a channel, in a slot
        of its own (moved to another connection if the server allows fewer
        sessions than ``max_sessions``)."""
        c = await self._channel_slot()
        try:
            try:
                return c, await self._create_process(c, command)
            except _Refused:
                if c.channels <= 1:
                    raise  # refused even alone: not a matter of room
                # Still refused: the server allows fewer sessions than
                # max_sessions.  Count this connection as full; go elsewhere.
                c.capacity = c.channels - 1
                self._free_slot(c)
                c = None
                c = await self._channel_slot()
                return c, await self._create_process(c, command)
        except BaseException:
            if c is not None:
                self._free_slot(c)
            raise

    async def connection(self) -> asyncssh.SSHClientConnection:
        """An open connection to the host (for port forwarding)."""
        c = await self._channel_slot()
        self._free_slot(c)
        return c.conn

    async def forward_remote(self, local_port: int) -> Tunnel:
        """Forward a fresh port on the host's 127.0.0.1 to ``local_port`` on
        127.0.0.1 here, over one of this transport's connections."""
        conn = await self.connection()
        try:
            listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", local_port)
        except Exception as e:  # asyncssh.Error, OSError: the connection just broke
            raise ConnectionLost("cannot forward a port from %s: %s" % (self.host, e)) from None
        return _ConnTunnel(conn, listener)

    async def close(self) -> None:
        for c in self._conns:
            c.conn.close()
        for c in self._conns:
            try:
                await c.conn.wait_closed()
            except Exception:
                pass
        self._conns = []
        if self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)
        if self._config_dir is not None:
            import shutil

            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def connections(self) -> int:
        return sum(1 for c in self._conns if not c.closed)

    def drop_connections(self) -> None:
        """Forget every connection (after one broke): the next call reconnects."""
        for c in self._conns:
            c.conn.abort()
        self._conns = []

    # Running the agent -----------------------------------------------------

    async def _ship_once(self) -> bytes:
        c, proc = await self._channel(ship_command(self.python))
        try:
            proc.stdin.write(agent_bytes())
            proc.stdin.write_eof()
            result = await proc.wait()  # until the channel is closed
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost while shipping the agent: %s" % (self.host, e)) from None
        finally:
            self._close_channel(c, proc)
        if result.exit_status != 0:
            raise ship_failure(result.exit_status, result.stderr, self.python, self.host)
        return result.stderr or b""

    async def _launch(self, command: str, stdin: bytes, keep_stdin: bool = False) -> Launch:
        c, proc = await self._channel(command)
        try:
            if stdin:
                proc.stdin.write(stdin)
            if not keep_stdin:
                proc.stdin.write_eof()
        except (asyncssh.Error, OSError):
            pass
        return _ChannelLaunch(self, c, proc)


class _ChannelLaunch(Launch):
    def __init__(self, transport: SSHTransport, c: _Conn, proc):
        self.transport = transport
        self.c = c
        self.proc = proc
        self.result = None

    async def first(self) -> bytes:
        try:
            return await self.proc.stdout.read(1 << 16)
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost: %s" % (self.transport.host, e)) from None

    async def more(self) -> bytes:
        return await self.first()

    async def finish(self):
        try:
            self.result = await self.proc.wait()  # until the channel is closed
        except (asyncssh.Error, OSError) as e:
            self.discard()
            raise ConnectionLost("connection to %s lost: %s" % (self.transport.host, e)) from None
        return self.result.exit_status, self.result.stderr or b""

    def process(self, first: bytes) -> AgentProcess:
        return _SSHProcess(self.transport, self.c, _Replay(self.proc, first, self.result))

    def discard(self) -> None:
        self.transport._close_channel(self.c, self.proc)


class _ConnTunnel(Tunnel):
    def __init__(self, conn, listener):
        self.conn = conn
        self.listener = listener
        self.port = listener.get_port()

    def closed(self) -> bool:
        return self.conn.is_closed()

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()

    def close(self) -> None:
        self.listener.close()


class _Replay:
    """An SSHClientProcess whose first stdout bytes were already read.

    asyncssh's ``wait()`` collects what is left of stdout and stderr into
    its result (a later ``stderr.read()`` gets nothing), so the result is
    kept, and the agent's stderr (its one-line error) read from it."""

    def __init__(self, proc, first: bytes, result=None):
        self._proc = proc
        self._first = first
        self._result = result
        self.stdout = self
        self.stdin = proc.stdin
        self.stderr = proc.stderr

    async def read(self, n: int = -1) -> bytes:
        if self._first:
            cut = len(self._first) if n < 0 else n
            data, self._first = self._first[:cut], self._first[cut:]
            return data
        return await self._proc.stdout.read(n)

    async def wait(self):
        if self._result is None:
            self._result = await self._proc.wait()
        return self._result

    async def read_stderr(self) -> bytes:
        if self._result is not None:
            return self._result.stderr or b""
        return await self._proc.stderr.read()

    def close(self) -> None:
        self._proc.close()

    async def wait_closed(self) -> None:
        await self._proc.wait_closed()
