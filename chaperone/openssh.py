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

from .agent_source import agent_bytes
from .errors import ChaperoneError, ConnectionLost
from . import sshmaster
from .sshcommon import (SHIP_AGAIN, ConnectFailed, SSHDescribed, Tunnel, agent_command, agent_file, no_python,
                        report_ship_notes, ship_command, ship_failure, shipped_but_missing)
from .transport import AgentProcess, AttachedProcess, Transport, feed_stdin, spawn

__all__ = ["OpenSSHTransport"]

#: ``ssh`` exits with this when it (not the remote command) failed.
SSH_FAILED = 255


def ssh_error(host: str, stderr: bytes, got_output: bool) -> ChaperoneError:
    """The error for ``ssh`` exiting 255, from what it wrote on stderr:
    :class:`ConnectFailed` (``transient`` when worth retrying) before the
    agent said anything, :class:`ConnectionLost` after."""
    lines = [l.strip() for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    text = "\n".join(lines)
    if not lines:  # ssh says why it failed to connect; a silent 255 is a dropped connection
        return ConnectionLost("connection to %s lost" % host)
    last = lines[-1]
    if "Host key verification failed" in text or "IDENTIFICATION HAS CHANGED" in text:
        return ConnectFailed(
            "host key verification failed for %s: the host key is unknown or has changed "
            "(add it to known_hosts, or pass --no-host-key-check)" % host)
    if "Permission denied" in text and not got_output:
        return ConnectFailed("authentication failed for %s: permission denied" % host)
    if "Could not resolve hostname" in text:
        return ConnectFailed("unknown host %s: %s" % (host, last.rsplit(": ", 1)[-1]))
    if got_output or re.search(r"Timeout, server .* not responding|Broken pipe|Connection reset|"
                               r"closed by remote host|Connection closed by|client_loop|mux_client", text):
        if not got_output and "Connection closed by" in text:
            return ConnectFailed("%s closed the connection" % host, transient=True)
        return ConnectionLost("connection to %s lost: %s" % (host, last))
    if "Connection refused" in text:
        return ConnectFailed("connection to %s refused" % host, transient=True)
    if "timed out" in text:
        return ConnectFailed("connection to %s timed out" % host, transient=True)
    if re.search(r"No route to host|Network is unreachable|Connection reset|kex_exchange_identification",
                 text):
        return ConnectFailed("cannot connect to %s: %s" % (host, last), transient=True)
    return ConnectFailed("cannot connect to %s: %s" % (host, last))


class _Process(AgentProcess):
    def __init__(self, transport: "OpenSSHTransport", proc: asyncio.subprocess.Process, first: bytes,
                 stderr_task: "asyncio.Future[bytes]"):
        self.transport = transport
        self.proc = proc
        self._first = first
        self._got_output = bool(first)
        self._stderr = stderr_task

    async def read(self, n: int = 1 << 20) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        data = await self.proc.stdout.read(n)
        if data:
            self._got_output = True
        return data

    async def wait(self) -> int:
        code = await self.proc.wait()
        if code == SSH_FAILED:
            raise ssh_error(self.transport.host, await self.stderr(), self._got_output)
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
    def __init__(self, master: sshmaster.Master, port: int):
        self.master = master
        self.port = port

    def closed(self) -> bool:
        return not self.master.alive()

    async def wait_closed(self) -> None:
        await self.master.wait_exit()

    def close(self) -> None:
        self.master.stop()


class OpenSSHTransport(SSHDescribed, Transport):
    """Runs the agent through the ``ssh`` program; same settings and
    description as :class:`chaperone.ssh.SSHTransport`."""

    def __init__(self, host: str, *, config: Sequence[str] = (), known_hosts: Optional[str] = None,
                 check_host_keys: bool = True, python: Optional[str] = None, port: Optional[int] = None,
                 username: Optional[str] = None, client_keys: Optional[Sequence[str]] = None,
                 connect_timeout: Optional[float] = None, keepalive_interval: float = 3.0,
                 root: Optional[str] = None, ssh: Optional[str] = None, multiplex: Optional[bool] = None,
                 max_sessions: int = 10, **ignored):
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise ChaperoneError("invalid host %r" % host)
        config = list(config)
        if len(config) > 1:
            raise ChaperoneError("the ssh program reads one config file (-F); %d were given" % len(config))
        self.host = host
        self.config = config
        self.known_hosts = known_hosts
        self.check_host_keys = check_host_keys
        self.python = python or "python3"
        self.port = port
        self.username = username
        self.client_keys = list(client_keys) if client_keys else None
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.root = root
        self.ssh = ssh or sshmaster.ssh_binary() or "ssh"
        self.agent_file = agent_file()
        self._procs: set = set()
        self._ship_lock = asyncio.Lock()
        self._shipped = 0
        # One connection for every call (OpenSSH's ControlMaster), unless
        # the user's config does its own multiplexing.
        if multiplex is None:
            multiplex = not sshmaster.multiplexes_itself(self.config)
        self.multiplex = multiplex
        self._master: Optional[sshmaster.Master] = None
        self._options: dict = {}
        self.max_sessions = max_sessions
        self._muxed = 0  # calls running over the master

    # The ssh command -------------------------------------------------------

    def argv(self, command: str, muxed: bool = True) -> List[str]:
        """``ssh ... HOST COMMAND`` (COMMAND is one argument for the login
        shell), over the shared connection if there is one and ``muxed``."""
        if self._master is not None and muxed:
            return self.options() + ["-o", "ControlMaster=no", "-S", self._master.socket, "--", self.host, command]
        return sshmaster.direct_argv(self.options(), self.host, command, self.multiplex)

    def options(self, forwardings: bool = False) -> List[str]:
        """``ssh`` and its options for this host (no host, no command);
        worked out once (it reads the config files), not at every call."""
        if forwardings not in self._options:
            self._options[forwardings] = sshmaster.ssh_options(
                self.ssh, forwardings=forwardings, config=self.config, port=self.port,
                username=self.username, client_keys=self.client_keys, check_host_keys=self.check_host_keys,
                known_hosts=self.known_hosts, connect_timeout=self.connect_timeout,
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
        if not sshmaster.standing_by(self.options(), self.host):
            self._start_master()

    def _start_master(self) -> None:
        """A master now, unless one is up (or there is no multiplexing)."""
        if not self.multiplex or (self._master is not None and self._master.alive()):
            return
        self._stop_master()
        try:
            self._master = sshmaster.Master(self.options(), self.host)
        except FileNotFoundError:
            raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh) from None

    async def _connected(self) -> None:
        """Wait until the master is logged in (its socket appears); raise
        its error if it failed."""
        if not self.multiplex:
            return
        self._start_master()  # (again, if the last one died: the connection broke)
        master = self._master
        while not master.ready():
            if not master.alive():
                err = master.stderr()
                code = master.exit_status()
                self._stop_master()
                if code == 127:
                    raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh)
                raise ssh_error(self.host, err, False)
            await asyncio.sleep(0.001)  # (a stat a ms while it logs in: the call goes out at once)

    async def forward_remote(self, local_port: int) -> Tunnel:
        """Forward a fresh port on the host's 127.0.0.1 to ``local_port`` on
        127.0.0.1 here: a control master of its own (``ssh -N``) and ``ssh
        -O forward -R 0:...``, so the forwarded bytes are decrypted by ssh,
        in its own process, not by this one."""
        master = sshmaster.Master(self.options(), self.host)
        try:
            while not master.ready():
                if not master.alive():
                    raise ssh_error(self.host, master.stderr(), False)
                await asyncio.sleep(0.005)
            # (without ClearAllForwardings, which would clear this -R too)
            proc = await asyncio.create_subprocess_exec(
                *self.options(forwardings=True), "-S", master.socket, "-O", "forward",
                "-R", "127.0.0.1:0:127.0.0.1:%d" % int(local_port), "--", self.host,
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

    def _stop_master(self) -> None:
        master, self._master = self._master, None
        if master is not None:
            master.stop()

    async def _spawn(self, command: str, stdin: bytes):
        # The server allows MaxSessions channels per connection: past
        # max_sessions calls at once, a call gets a connection of its own
        # (slower, never stuck behind long follows).
        # (The slot is taken before the await: calls made at once must not
        # all see the same free count.)
        muxed = self._muxed < self.max_sessions
        if muxed:
            self._muxed += 1
        try:
            proc = await spawn(self.argv(command, muxed))
        except BaseException as e:
            if muxed:
                self._unmux()
            if isinstance(e, FileNotFoundError):
                raise ChaperoneError("no ssh program (%s): install OpenSSH's client" % self.ssh) from None
            raise
        self._procs.add(proc)
        if muxed:
            asyncio.ensure_future(proc.wait()).add_done_callback(lambda _: self._unmux())
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        feeder = asyncio.ensure_future(feed_stdin(proc, stdin))
        return proc, stderr_task, feeder

    def _unmux(self) -> None:
        self._muxed -= 1

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

    # Running the agent -----------------------------------------------------

    async def _finish(self, proc, stderr_task) -> "tuple[int, bytes]":
        code = await proc.wait()
        self._procs.discard(proc)
        try:
            err = await stderr_task
        except asyncio.CancelledError:
            err = b""
        return code, err

    async def _ship(self, shipped_before: int) -> None:
        async with self._ship_lock:
            if self._shipped != shipped_before:
                return  # another call shipped it meanwhile
            await self._connected()
            proc, stderr_task, feeder = await self._spawn(ship_command(self.python), agent_bytes())
            try:
                await proc.stdout.read()
                code, err = await self._finish(proc, stderr_task)
            finally:
                self._forget(proc)
                feeder.cancel()
            if code == SSH_FAILED:
                raise ssh_error(self.host, err, False)
            if code != 0:
                raise ship_failure(code, err, self.python, self.host)
            report_ship_notes(self.host, err)
            self._shipped += 1

    async def _adopt(self, command: str, stdin: bytes):
        """A call on the head start's standby session if there is one for
        this host (already connecting, or connected), else None."""
        standby = sshmaster.adopt_session(self.options(), self.host, self.multiplex)
        if standby is None:
            return None
        try:
            proc = await AttachedProcess.attach(standby.proc, on_exit=standby.cut)
        except BaseException:
            standby.stop()
            raise
        self._procs.add(proc)
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        # `exec`: the agent's Python then replaces the standby's shell, so
        # the processes on the host are those of a direct call (one shell
        # fewer); a follow whose client is gone ends by itself (the agent
        # watches its stdout).
        feeder = asyncio.ensure_future(feed_stdin(proc, sshmaster.standby_input("exec " + command) + stdin))
        return proc, stderr_task, feeder

    async def open(self, args: List[str], stdin: bytes = b"") -> AgentProcess:
        command = agent_command(self.python, self.root, args)
        shipped_again = reconnected = False
        adopted = await self._adopt(command, stdin)
        while True:
            shipped = self._shipped
            if adopted is not None:
                master = None
                (proc, stderr_task, feeder), adopted = adopted, None
            else:
                await self._connected()
                master = self._master
                proc, stderr_task, feeder = await self._spawn(command, stdin)
            try:
                # The agent always prints (a marker) unless the bootstrap
                # refused it: no output and status 97 mean "ship it again".
                first = await proc.stdout.read(1 << 16)
            except BaseException:
                self._forget(proc)
                feeder.cancel()
                raise
            if first:
                return _Process(self, proc, first, stderr_task)
            code, err = await self._finish(proc, stderr_task)
            if code == SHIP_AGAIN:
                if shipped_again:
                    raise shipped_but_missing(self.host)
                shipped_again = True
                await self._ship(shipped)
                continue
            if code == SSH_FAILED:
                if master is not None and not reconnected and (not master.alive() or not err.strip()):
                    # The shared connection broke (its master is exiting):
                    # once more over a new one.
                    reconnected = True
                    if self._master is master:
                        self._stop_master()
                    continue
                raise ssh_error(self.host, err, False)
            if code == 127:
                raise no_python(self.python, self.host)
            done = asyncio.get_running_loop().create_future()
            done.set_result(err)
            return _Process(self, proc, b"", done)
