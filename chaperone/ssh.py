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
import socket
from typing import List, Optional, Sequence

import asyncssh

from .agent_source import agent_bytes
from .errors import ChaperoneError, ConnectionLost
from .sshcommon import (REMOTE_DIR, SHIP_AGAIN, ConnectFailed, SSHDescribed, Tunnel, agent_command, agent_file,
                        no_python, report_ship_notes, ship_command, ship_failure, shipped_but_missing)
from .sshmaster import DEFAULT_CONNECT_TIMEOUT
from .transport import AgentProcess, Transport

__all__ = ["SSHTransport", "ConnectFailed", "SHIP_AGAIN", "REMOTE_DIR"]


def _cpu_has_aes() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _preferred_ciphers(config_files: Sequence[str]) -> Optional[List[str]]:
    """asyncssh's default ciphers with AES-GCM first when the CPU has AES
    instructions: every byte of output crosses this cipher in Python's one
    thread, and AES-GCM moves ~1.6x what chacha20-poly1305 does there
    (OpenSSH puts chacha first for CPUs without AES).  Only the order
    changes, and never when an ssh config names its own ``Ciphers``."""
    import os

    files = list(config_files) or [os.path.expanduser("~/.ssh/config")]
    for path in files:
        try:
            with open(path, errors="replace") as f:
                if any(line.strip().lower().startswith("ciphers") for line in f):
                    return None
        except OSError:
            continue
    if not _cpu_has_aes():
        return None
    from asyncssh.encryption import get_default_encryption_algs

    algs = [a.decode() for a in get_default_encryption_algs()]
    gcm = [a for a in algs if "-gcm@" in a]
    return gcm + [a for a in algs if a not in gcm]


def _connect_error(host: str, e: BaseException) -> ConnectFailed:
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return ConnectFailed(
            "host key verification failed for %s: the host key is unknown or has changed "
            "(add it to known_hosts, or pass --no-host-key-check)" % host)
    if isinstance(e, asyncssh.PermissionDenied):
        return ConnectFailed("authentication failed for %s: %s" % (host, e.reason or "permission denied"))
    if isinstance(e, socket.gaierror):
        return ConnectFailed("unknown host %s: %s" % (host, e.strerror or e))
    if isinstance(e, ConnectionRefusedError):
        return ConnectFailed("connection to %s refused" % host, transient=True)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return ConnectFailed("connection to %s timed out" % host, transient=True)
    if isinstance(e, asyncssh.DisconnectError):
        return ConnectFailed("%s closed the connection: %s" % (host, e.reason), transient=True)
    if isinstance(e, OSError):
        return ConnectFailed("cannot connect to %s: %s" % (host, e.strerror or e), transient=True)
    return ConnectFailed("cannot connect to %s: %s" % (host, e))


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

    def close(self) -> None:
        if not self._released:
            self._released = True
            self.transport._close_channel(self.c, self.proc)


class SSHTransport(SSHDescribed, Transport):
    def __init__(self, host: str, *, config: Sequence[str] = (), known_hosts: Optional[str] = None,
                 check_host_keys: bool = True, python: Optional[str] = None, port: Optional[int] = None,
                 username: Optional[str] = None, client_keys: Optional[Sequence[str]] = None,
                 connect_timeout: Optional[float] = None, max_sessions: int = 10, keepalive_interval: float = 3.0,
                 root: Optional[str] = None):
        if not host or host.startswith("-"):
            raise ChaperoneError("invalid host %r" % host)
        self.host = host
        user, sep, hostname = host.rpartition("@")
        self.hostname = hostname if sep else host
        self.username = username or (user if sep else None)
        self.port = port
        self.config = list(config)
        self.known_hosts = known_hosts
        self.check_host_keys = check_host_keys
        self.python = python or "python3"
        self.client_keys = list(client_keys) if client_keys else None
        self.connect_timeout = connect_timeout
        self.max_sessions = max_sessions
        self.keepalive_interval = keepalive_interval
        self.root = root  # the agent's spool root on the host (default ~/.chaperone/runs)
        self._conns: List[_Conn] = []
        self._lock = asyncio.Lock()
        self._slot_freed = asyncio.Event()
        self._closers: set = set()
        self._ship_lock = asyncio.Lock()
        self._shipped = 0  # how many times this transport shipped the agent
        self.agent_file = agent_file()

    # Connections -----------------------------------------------------------

    def connect_options(self) -> dict:
        options = dict(
            config=self.config or None,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=3,
            agent_forwarding=False,
        )
        if self.connect_timeout is not None:
            # Given explicitly: wins over the config's ConnectTimeout.
            options["connect_timeout"] = self.connect_timeout
        if self.port:
            options["port"] = self.port
        if self.username:
            options["username"] = self.username
        if self.client_keys:
            options["client_keys"] = self.client_keys
        if not self.check_host_keys:
            options["known_hosts"] = None
        elif self.known_hosts:
            options["known_hosts"] = self.known_hosts
        ciphers = _preferred_ciphers(self.config)
        if ciphers:
            options["encryption_algs"] = ciphers
        return options

    async def _new_connection(self) -> _Conn:
        try:
            # asyncssh applies the config's ConnectTimeout (to the whole
            # connect: DNS, TCP, handshake, login) unless connect_timeout is
            # given; DEFAULT_CONNECT_TIMEOUT bounds it when neither says.
            conn = await asyncio.wait_for(asyncssh.connect(self.hostname, **self.connect_options()),
                                          DEFAULT_CONNECT_TIMEOUT if self.connect_timeout is None else None)
        except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as e:
            raise _connect_error(self.host, e) from None
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

    def drop_connections(self) -> None:
        """Forget every connection (after one broke): the next call reconnects."""
        for c in self._conns:
            c.conn.abort()
        self._conns = []

    # Running the agent -----------------------------------------------------

    def _command(self, args: List[str]) -> str:
        return agent_command(self.python, self.root, args)

    async def _ship(self, c: _Conn, shipped_before: int) -> None:
        """Ship the agent (on ``c``, in the caller's slot), unless another
        open() of this transport did since ``shipped_before``."""
        async with self._ship_lock:
            if self._shipped == shipped_before:
                await self._do_ship(c)
                self._shipped += 1

    async def _do_ship(self, c: _Conn) -> None:
        try:
            proc = await self._create_process(c, ship_command(self.python))
            try:
                proc.stdin.write(agent_bytes())
                proc.stdin.write_eof()
                result = await proc.wait()  # until the channel is closed
            finally:
                proc.close()
        except (asyncssh.Error, OSError) as e:
            raise ConnectionLost("connection to %s lost while shipping the agent: %s" % (self.host, e)) from None
        if result.exit_status != 0:
            raise ship_failure(result.exit_status, result.stderr, self.python, self.host)
        report_ship_notes(self.host, result.stderr)

    async def open(self, args: List[str], stdin: bytes = b"") -> AgentProcess:
        c = await self._channel_slot()
        proc = None
        try:
            for attempt in (0, 1):
                shipped = self._shipped
                proc = None
                try:
                    proc = await self._create_process(c, self._command(args))
                except _Refused:
                    if c.channels <= 1:
                        raise  # refused even alone: not a matter of room
                    # Still refused: the server allows fewer sessions than
                    # max_sessions.  Count this connection as full; go elsewhere.
                    c.capacity = c.channels - 1
                    self._free_slot(c)
                    c = None
                    c = await self._channel_slot()
                    proc = await self._create_process(c, self._command(args))
                try:
                    if stdin:
                        proc.stdin.write(stdin)
                    proc.stdin.write_eof()
                except (asyncssh.Error, OSError):
                    pass
                # The agent always prints (a marker) unless the bootstrap
                # refused it: no output and status 97 mean "ship it again".
                first = await _peek(proc, self.host)
                if first is None:
                    result = await proc.wait()  # until the channel is closed
                    if result.exit_status == SHIP_AGAIN:
                        if attempt:
                            raise shipped_but_missing(self.host)
                        await self._ship(c, shipped)
                        continue
                    if result.exit_status == 127:
                        raise no_python(self.python, self.host)
                return _SSHProcess(self, c, _Replay(proc, first or b"", None if first else result))
            raise AssertionError("not reached")
        except BaseException:
            if c is None:
                pass
            elif proc is not None:
                self._close_channel(c, proc)
            else:
                self._free_slot(c)
            raise


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


async def _peek(proc, host: str) -> Optional[bytes]:
    """The first bytes of stdout, or None if it ended without any."""
    try:
        data = await proc.stdout.read(1 << 16)
    except (asyncssh.Error, OSError) as e:
        raise ConnectionLost("connection to %s lost: %s" % (host, e)) from None
    return data or None


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
            data, self._first = self._first, b""
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
