"""The OpenSSH transport: every agent call is one ``ssh HOST COMMAND`` process.

The CLI's default when an ``ssh`` binary is installed.  A one-shot command
(``run``, ``status``, ``logs``, ``kill``) then costs what ``ssh HOST true``
costs plus the agent's Python start-up on the host: no asyncssh import
(about 0.2 s of CPU here) and OpenSSH's C handshake.  It also reads the
user's ssh config exactly as ``ssh`` does (Match, ProxyJump, ControlMaster,
certificates, FIDO keys, GSSAPI ...) because it *is* ``ssh``.

The library's default stays ``chaperone.ssh.SSHTransport`` (asyncssh): one
connection carries many channels, which is what a scheduler starting
hundreds of programs wants.  Both send the same remote commands
(``chaperone.sshcommon``), record the same description, and map failures to
the same errors, so a run started through one can be reconnected through
the other.

Stdlib only: importing this costs nothing on the CLI's start-up path.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import List, Optional, Sequence

from ...agent_source import agent_bytes
from ...errors import ChaperoneError, ConnectFailed, ConnectionLost
from . import master as masters
from . import options as ssh_opts
from .common import Launch, SSHTransportBase, Tunnel, connect_error, ship_command, ship_failure
from .failures import SSH_FAILED, ssh_error
from ..target import Target
from ..base import AgentProcess, AttachedProcess, PipeStdin, copy_pipe, feed_stdin, spawn, write_all

__all__ = ["OpenSSHTransport"]

class _Process(AgentProcess):
    def __init__(self, transport: "OpenSSHTransport", proc: asyncio.subprocess.Process, first: bytes,
                 stderr_task: "asyncio.Future[bytes]", feeder=None):
        self.transport = transport
        self.proc = proc
        self._first = first
        self._got_output = bool(first)
        self._stderr = stderr_task
        self._stdin = PipeStdin(proc.stdin, feeder, transport.host)

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def write_eof(self) -> None:
        await self._stdin.write_eof()

    async def read(self, n: int = 1 << 20) -> bytes:
        if self._first:
            cut = len(self._first) if n < 0 else n
            data, self._first = self._first[:cut], self._first[cut:]
            return data
        data = await self.proc.stdout.read(n)
        if data:
            self._got_output = True
        return data

    async def copy_to(self, fd: int, limit: Optional[int] = None) -> int:
        n = 0
        if self._first:
            data = self._first if limit is None else self._first[:limit]
            self._first = self._first[len(data):]
            write_all(fd, data)
            n = len(data)
            if limit is not None and n == limit:
                return n
        left = None if limit is None else limit - n
        copied = await copy_pipe(self.proc.stdout, fd, left)
        if copied is None:
            return n + await super().copy_to(fd, left)
        if copied:
            self._got_output = True
        return n + copied

    async def wait(self) -> int:
        code = await self.proc.wait()
        if code == SSH_FAILED:
            raise ssh_error(self.transport.target, await self.stderr(), self._got_output)
        if code < 0:  # ssh itself was killed (not by us: close() comes last)
            raise ConnectionLost("connection to %s lost: ssh was killed by signal %d"
                                 % (self.transport.host, -code))
        return code

    async def stderr(self) -> bytes:
        try:
            return await self._stderr
        except (asyncio.CancelledError, OSError):
            return b""

    def close(self) -> None:
        self.transport._forget(self.proc)


class _MasterTunnel(Tunnel):
    def __init__(self, master: masters.Master, port: int):
        self.master = master
        self.port = port

    def closed(self) -> bool:
        return not self.master.alive()

    async def wait_closed(self) -> None:
        await self.master.wait_exit()

    def close(self) -> None:
        self.master.stop()


async def read_stderr(stream) -> bytes:
    """All that ``ssh`` writes on stderr (its errors are read from it); with
    ``-v`` (:func:`~.options.set_verbose`) each chunk is also copied to this
    process's stderr as it comes."""
    if not ssh_opts.verbose():
        return await stream.read()
    import sys

    chunks = []
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        try:
            sys.stderr.flush()
            os.write(2, chunk)
        except OSError:
            pass


class OpenSSHTransport(SSHTransportBase):
    """Runs the agent through the ``ssh`` program: one control master per
    host that the calls share (MaxSessions of them at once; past that a
    call connects on its own), at most ``connect_limit`` connections being
    set up at once, each retried if sshd drops it before login."""

    def __init__(self, target: Target, *, ssh: Optional[str] = None, multiplex: Optional[bool] = None, **tuning):
        super().__init__(target, **tuning)
        if len(target.config) > 1:
            raise ChaperoneError("the ssh program reads one config file (-F); %d were given" % len(target.config))
        self.ssh = ssh or ssh_opts.ssh_binary() or "ssh"
        self.destination = target.destination
        self._procs: set = set()
        # One connection for every call (OpenSSH's ControlMaster), unless
        # the user's config does its own multiplexing.
        if multiplex is None:
            multiplex = not ssh_opts.multiplexes_itself(target.config) and not ssh_opts.verbose()
        self.multiplex = multiplex
        self._master: Optional[masters.Master] = None
        self._options: dict = {}
        self._muxed = 0  # calls running over the master

    # The ssh command -------------------------------------------------------

    def argv(self, command: str, muxed: bool = True) -> List[str]:
        """``ssh ... HOST COMMAND`` (COMMAND is one argument for the login
        shell), over the shared connection if there is one and ``muxed``."""
        if self._master is not None and muxed:
            return self.options() + ["-o", "ControlMaster=no", "-S", self._master.socket, "--", self.destination,
                                     command]
        return ssh_opts.direct_argv(self.options(), self.destination, command, self.multiplex)

    def options(self, forwardings: bool = False) -> List[str]:
        """``ssh`` and its options for this host (no host, no command);
        worked out once (it reads the config files), not at every call."""
        if forwardings not in self._options:
            self._options[forwardings] = ssh_opts.ssh_options(
                self.ssh, self.target, forwardings=forwardings, connect_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval)
        return list(self._options[forwardings])

    # The shared connection -------------------------------------------------

    def warm(self) -> None:
        """Start connecting now, in the background: a control master that
        the next calls share.  Needs no event loop.  Does nothing without
        multiplexing, when a master is already up, or when the CLI's head
        start has a session to this host standing by (a master now would
        only compete with it for the CPU, for a handshake the command may
        never need)."""
        if not masters.standing_by(self.options(), self.destination):
            self._start_master()

    def _start_master(self) -> None:
        """A master now, unless one is up (or there is no multiplexing)."""
        if not self.multiplex or (self._master is not None and self._master.alive()):
            return
        self._stop_master()
        try:
            self._master = masters.Master(self.options(), self.destination)
        except FileNotFoundError:
            raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh) from None

    async def _logged_in(self, master: "masters.Master") -> None:
        """Until ``master`` is logged in (its socket appears); its error if it failed."""
        while not master.ready():
            if not master.alive():
                err = master.stderr()
                code = master.exit_status()
                if master is self._master:
                    self._stop_master()
                if code == 127:
                    raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh)
                if code is not None and 128 < code < 255:  # (killed by a signal, before it logged in: try again)
                    raise ConnectionLost("connection to %s lost: ssh was killed by signal %d while logging in"
                                         % (self.host, code - 128))
                raise ssh_error(self.target, err, False)
            await asyncio.sleep(0.001)  # (a stat a ms while it logs in: the call goes out at once)

    async def _connected(self) -> None:
        """Wait until the master is logged in; start it (again) if needed,
        within the connection limit, retried if sshd drops it before login."""
        if not self.multiplex:
            return
        if self._master is not None and self._master.alive() and self._master.ready():
            return

        async def connect():
            self._start_master()  # (again, if the last one died: the connection broke)
            await self._logged_in(self._master)

        async with self.connecting():
            await self.retrying(connect)

    async def forward_remote(self, local_port: int) -> Tunnel:
        """Forward a fresh port on the host's 127.0.0.1 to ``local_port`` on
        127.0.0.1 here: a control master of its own (``ssh -N``) and ``ssh
        -O forward -R 0:...``, so the forwarded bytes are decrypted by ssh,
        in its own process, not by this one."""
        async def connect():
            master = masters.Master(self.options(), self.destination)
            try:
                await self._logged_in(master)
            except BaseException:
                master.stop()
                raise
            return master

        async with self.connecting():
            master = await self.retrying(connect)
        try:
            # (without ClearAllForwardings, which would clear this -R too)
            proc = await asyncio.create_subprocess_exec(
                *self.options(forwardings=True), "-S", master.socket, "-O", "forward",
                "-R", "127.0.0.1:0:127.0.0.1:%d" % int(local_port), "--", self.destination,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            port = out.split()[0] if out.split() else b""
            if proc.returncode != 0 or not port.isdigit():
                raise ConnectionLost("cannot forward a port from %s: %s" % (
                    self.host, err.decode("utf-8", "replace").strip() or "ssh -O forward failed"))
        except BaseException:
            master.stop()
            raise
        return _MasterTunnel(master, int(port))

    def connections(self) -> int:
        return int(self._master is not None and self._master.alive())

    def _stop_master(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            master.stop()

    async def _spawn(self, command: str, stdin: bytes, muxed: bool, keep_stdin: bool = False):
        argv = self.argv(command, muxed)
        if ssh_opts.verbose():
            import logging

            logging.getLogger("chaperone.ssh").debug("%s: %s COMMAND (an agent call)", self.target.name,
                                                     " ".join(argv[:-1]))
        try:
            proc = await spawn(argv)
        except FileNotFoundError:
            raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh) from None
        self._procs.add(proc)
        stderr_task = asyncio.ensure_future(read_stderr(proc.stderr))
        feeder = asyncio.ensure_future(feed_stdin(proc, stdin, close=not keep_stdin))
        return proc, stderr_task, feeder

    def _forget(self, proc) -> None:
        """Kill ``proc`` if it still runs; drop it once reaped."""
        if proc.returncode is not None:
            self._procs.discard(proc)
            return
        try:
            # os.kill, not proc.kill(): Popen.send_signal() first polls,
            # and that can reap the process behind the back of asyncio's
            # child watcher (which then reports status 255 and a warning).
            # A zombie is not reaped until the watcher does, so its pid
            # cannot be someone else's yet.
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        reaped = asyncio.ensure_future(proc.wait())
        reaped.add_done_callback(lambda _: self._procs.discard(proc))

    async def close(self) -> None:
        procs, self._procs = list(self._procs), set()
        for proc in procs:
            self._forget(proc)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass
        self._stop_master()
        await masters.reap_stopped()  # (its master's, and its tunnels' once closed: no zombie left)

    # Running the agent -----------------------------------------------------

    async def _ship_once(self) -> bytes:
        launch = await self._launch(ship_command(self.python), agent_bytes())
        try:
            await launch.proc.stdout.read()
            code, err = await launch.finish()
        finally:
            launch.discard()
        if code == SSH_FAILED:
            raise ssh_error(self.target, err, False)
        if code != 0:
            raise ship_failure(code, err, self.python, self.host)
        return err

    async def _adopt(self, command: str, stdin: bytes, keep_stdin: bool = False) -> "Optional[_SSHLaunch]":
        """A call on the head start's standby session if there is one for
        this host (already connecting, or connected), else None."""
        standby = masters.adopt_session(self.options(), self.destination, self.multiplex)
        if standby is None:
            return None
        try:
            proc = await AttachedProcess.attach(standby.proc, on_exit=standby.cut)
        except BaseException:
            standby.stop()
            raise
        self._procs.add(proc)
        stderr_task = asyncio.ensure_future(read_stderr(proc.stderr))
        # `exec`: the agent's Python then replaces the standby's shell, so
        # the processes on the host are those of a direct call (one shell
        # fewer); a follow whose client is gone ends by itself (the agent
        # watches its stdout).
        if not command.startswith("exec "):
            command = "exec " + command
        feeder = asyncio.ensure_future(feed_stdin(proc, masters.standby_input(command) + stdin,
                                                  close=not keep_stdin))
        return _SSHLaunch(self, proc, stderr_task, feeder, master=None, muxed=False)

    async def _launch(self, command: str, stdin: bytes, keep_stdin: bool = False) -> Launch:
        adopted = await self._adopt(command, stdin, keep_stdin)
        if adopted is not None:
            try:
                first = await adopted.first()
            except BaseException:
                adopted.discard()
                raise
            if first:
                return adopted
            code, err = await adopted.finish()
            error = ssh_error(self.target, err, False) if code == SSH_FAILED else None
            if not (isinstance(error, ConnectFailed) and error.retry_safe):
                return adopted  # (its exit says the rest: open() reads it)
            # sshd dropped the head start's session before login (its
            # MaxStartups): nothing ran; a connection of our own, retried.
        await self._connected()
        # The server allows MaxSessions channels per connection: past
        # max_sessions calls at once, a call gets a connection of its own
        # (slower, never stuck behind long follows).  (The slot is taken
        # before any await: calls made at once must not all see the same
        # free count.)
        muxed = self._master is not None and self._muxed < self.max_sessions
        if muxed:
            self._muxed += 1
            try:
                proc, stderr_task, feeder = await self._spawn(command, stdin, True, keep_stdin)
            except BaseException:
                self._muxed -= 1
                raise
            return _SSHLaunch(self, proc, stderr_task, feeder, master=self._master, muxed=True)

        async def connect():
            launch = _SSHLaunch(self, *await self._spawn(command, stdin, False, keep_stdin), master=None, muxed=False)
            try:
                first = await launch.first()
            except BaseException:
                launch.discard()
                raise
            if not first:
                code, err = await launch.finish()
                if code == SSH_FAILED:
                    error = ssh_error(self.target, err, False)
                    if isinstance(error, ConnectFailed) and error.retry_safe:
                        raise error
            return launch

        # A connection of its own: set up within the limit, and again if
        # sshd drops it before login (then nothing ran).
        async with self.connecting():
            return await self.retrying(connect)

    def _silent_exit(self, launch: Launch, code, err: bytes, relaunched: bool) -> bool:
        if code != SSH_FAILED:
            return False
        master = launch.master
        if master is not None and not relaunched and (not master.alive() or not err.strip()):
            # The shared connection broke (its master is exiting): once
            # more over a new one.
            if self._master is master:
                self._stop_master()
            return True
        raise ssh_error(self.target, err, False)


class _SSHLaunch(Launch):
    """One ``ssh`` process running an agent command."""

    def __init__(self, transport: OpenSSHTransport, proc, stderr_task, feeder, master, muxed: bool):
        self.transport = transport
        self.proc = proc
        self.stderr_task = stderr_task
        self.feeder = feeder
        self.master = master
        self._first: Optional[bytes] = None
        self._result = None
        if muxed:
            proc_wait = asyncio.ensure_future(proc.wait())
            proc_wait.add_done_callback(lambda _: transport.__setattr__("_muxed", transport._muxed - 1))

    async def first(self) -> bytes:
        if self._first is None:
            self._first = await self.proc.stdout.read(1 << 16)
        return self._first

    async def more(self) -> bytes:
        return await self.proc.stdout.read(1 << 16)

    async def finish(self):
        if self._result is None:
            code = await self.proc.wait()
            self.transport._procs.discard(self.proc)
            try:
                err = await self.stderr_task
            except asyncio.CancelledError:
                err = b""
            self._result = (code, err)
        return self._result

    def process(self, first: bytes) -> AgentProcess:
        if self._result is not None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(self._result[1])
            return _Process(self.transport, self.proc, first, done, self.feeder)
        return _Process(self.transport, self.proc, first, self.stderr_task, self.feeder)

    def discard(self) -> None:
        self.transport._forget(self.proc)
        self.feeder.cancel()
