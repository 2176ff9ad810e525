"""OpenSSH connections started ahead of their use.

* :class:`Master`: one background ``ssh -N -M`` connection that later ``ssh
  -S SOCKET HOST CMD`` calls share (no handshake of their own).
* :class:`Standby`: one ``ssh HOST`` session that logs in at once and
  then waits for the command it is to run, on its stdin.

Stdlib only and light to import: the CLI starts a standby session to the
host it is about to use before it imports anything else (:func:`speculate_session`),
so the SSH handshake runs while Python loads the rest of chaperone; the
transport then runs its first call on that session if it was started with
the very same options (:func:`adopt_session`).

Neither ever outlives the process that started it: both run under the
watchdog (:func:`chaperone.transports.ssh.process.watched`).
"""

from __future__ import annotations

import atexit
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Dict, List, Optional, Sequence

from ...errors import TimeoutExpired
from .options import direct_argv
from .process import DEVNULL, PIPE, close_fd, wait_exited, watched, _rmtree


class Master:
    """``ssh -N -M -S SOCKET HOST`` in the background, under a watchdog."""

    def __init__(self, options: Sequence[str], host: str):
        _reap()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="chaperone-ssh-")  # 0700
        self.socket = os.path.join(self.dir, "ctl")
        self._stderr = os.path.join(self.dir, "stderr")
        argv = list(options) + ["-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                                "-S", self.socket, "--", host]
        try:
            fd = os.open(self._stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self.proc, self._lifeline = watched(argv, self.dir, stdin=DEVNULL, stdout=DEVNULL, stderr=fd)
            finally:
                os.close(fd)
        except BaseException:
            _rmtree(self.dir)
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def wait_exit(self) -> None:
        """Until the master exited (its connection is gone)."""
        await wait_exited(self.proc)

    def ready(self) -> bool:
        """Logged in: its socket is there (made only after the login)."""
        return os.path.exists(self.socket)

    def exit_status(self) -> Optional[int]:
        return self.proc.poll()

    def stderr(self) -> bytes:
        try:
            with open(self._stderr, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def stop(self, wait: bool = False) -> None:
        """End the connection: the watchdog kills ssh once its pipe is
        closed.  Without ``wait`` the exit is not waited for (ssh takes a
        few ms to say goodbye); it is reaped later (:func:`_reap`)."""
        close_fd(self._lifeline)
        self._lifeline = None
        if wait:
            try:
                self.proc.wait(5)
            except TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc.poll() is None:
            _stopping.append(self.proc)
        _rmtree(self.dir)


#: The remote command of a standby session (:class:`Standby`): the login
#: shell runs ``sh`` without being replaced by it (``; exit``: a ``start``
#: finds the login shell's environment above it, see
#: common.agent_command), which reads one line from stdin -- the real command,
#: escaped by :func:`standby_input` -- and runs it; the rest of stdin is
#: that command's.  (``read`` takes a pipe byte by byte: nothing past the
#: line is consumed.)  An empty stdin ends it doing nothing.
STANDBY_COMMAND = """sh -c 'IFS= read -r c || exit 0; eval "$(printf %b "$c")"'; exit"""


def standby_input(command: str) -> bytes:
    """The line that makes a standby session run ``command`` (a command
    for ``sh``): backslashes and newlines escaped for ``printf %b``."""
    return (command.replace("\\", "\\\\").replace("\n", "\\n") + "\n").encode()


class Standby:
    """An ``ssh HOST`` session started before its caller knows what it will
    run: it connects and logs in while the caller is still loading (the
    CLI's head start), then waits for its command on stdin
    (:data:`STANDBY_COMMAND`).  Like a master it runs under the watchdog:
    ``lifeline`` open keeps it alive, and it never outlives this process.
    Stopped unused, its stdin is closed (the remote side ends doing
    nothing) and ssh is killed."""

    def __init__(self, options: Sequence[str], host: str, multiplex: bool):
        _reap()
        self.key = (tuple(options), host, multiplex)
        self.proc, self.lifeline = watched(direct_argv(options, host, STANDBY_COMMAND, multiplex),
                                           stdin=PIPE, stdout=PIPE, stderr=PIPE)

    def stop(self) -> None:
        proc = self.proc
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        self.cut()
        if proc.poll() is None:
            _stopping.append(proc)

    def cut(self) -> None:
        """Close the lifeline: the watchdog kills ssh if it still runs."""
        close_fd(self.lifeline)
        self.lifeline = None


#: Stopped masters not reaped yet.
_stopping: List[Child] = []


def _reap() -> None:
    _stopping[:] = [p for p in _stopping if p.poll() is None]


async def reap_stopped(within: float = 1.0) -> None:
    """Wait (up to ``within`` seconds) until the stopped masters and
    standby sessions exited, and reap them: a long-lived process (a
    scheduler) that closes its connections must not keep zombies."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + within
    _reap()
    while _stopping and loop.time() < end:
        await asyncio.sleep(0.01)
        _reap()


#: The head start's session, until a transport adopts it.
_standby: Optional[Standby] = None


def _stop_standby() -> None:
    global _standby
    standby, _standby = _standby, None
    if standby is not None:
        standby.stop()


def speculate_session(options: Sequence[str], host: str, multiplex: bool) -> None:
    """Start a :class:`Standby` session now, for a transport that will
    likely make a call to this host first (:func:`adopt_session`); stopped
    at exit if none does."""
    global _standby
    _stop_standby()
    _standby = Standby(options, host, multiplex)
    atexit.register(_stop_standby)


def standing_by(options: Sequence[str], host: str) -> bool:
    """Whether a standby session with these options to this host waits to
    be adopted."""
    return (_standby is not None and _standby.key[:2] == (tuple(options), host)) or (tuple(options), host) in _more


def adopt_session(options: Sequence[str], host: str, multiplex: bool) -> Optional[Standby]:
    """The standby session if it has these options, host and sharing (it is
    then the caller's, its stdin not written yet); else None."""
    global _standby
    standby = _standby
    if standby is not None and standby.key == (tuple(options), host, multiplex):
        _standby = None
        return standby
    more = _more.get((tuple(options), host))
    if more is not None and more.key[2] == multiplex:
        return _more.pop((tuple(options), host))
    return None


#: The head start's sessions to many hosts (``run -H``: chaperone/fleet/headstart.py), by options and host.
_more: Dict[tuple, Standby] = {}


def speculate_more(options: Sequence[str], host: str, multiplex: bool) -> None:
    """:func:`speculate_session` for one of many hosts (each kept until
    adopted, all stopped at exit)."""
    if not _more:
        atexit.register(_stop_more)
    old = _more.pop((tuple(options), host), None)
    if old is not None:
        old.stop()
    _more[(tuple(options), host)] = Standby(options, host, multiplex)


def _stop_more() -> None:
    while _more:
        _more.popitem()[1].stop()
