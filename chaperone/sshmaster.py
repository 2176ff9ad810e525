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

Neither ever outlives the process that started it: both run under a small
``sh`` watchdog that kills ssh when a pipe from its parent closes, however
the parent ended (even SIGKILL).
"""

from __future__ import annotations

import atexit
import os

# Nothing here imports typing, tempfile or shutil at load (together 10-15
# ms in a fresh interpreter): the CLI's head start imports this module
# before it starts the SSH handshake.
TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import List, Optional, Sequence

#: Seconds to connect and log in when neither ``connect_timeout`` nor the
#: SSH config's ``ConnectTimeout`` says.
DEFAULT_CONNECT_TIMEOUT = 15

# $1 is a fd: the read end of a pipe whose write end only the parent
# holds; $2 a directory to remove at the end ("" for none); the rest the
# command, which gets the script's stdin, stdout and stderr.  Its exit
# status is the script's (128+N if it was killed by signal N).  When that
# pipe reaches EOF -- the parent closed it, or died, even by SIGKILL -- the
# watchdog kills the command and removes the directory.  Once it has
# begun, it ignores the TERM with which the main shell ends it when the
# command exits (else that could cut it off before the rm).  A TERM to the
# main shell is passed on to the command.  (The pipe moves to fd 3 first,
# opened as /dev/fd/N: dash takes fds up to 9 only, and N may be 4; where
# there is no /dev/fd, N is duplicated, which works for N up to 9.  A
# background list gets /dev/null as stdin unless redirected: hence fd 4.)
_WATCHDOG = ('l=$1; d=$2; shift 2; { command exec 3</dev/fd/$l; } 2>/dev/null || exec 3<&$l; exec 4<&0; '
             '"$@" <&4 3<&- 4<&- & p=$!; exec 4<&-; '
             '{ read _ <&3; trap "" TERM; kill $p 2>/dev/null; [ -z "$d" ] || rm -rf "$d"; } </dev/null & w=$!; '
             'exec 3<&-; trap "kill $p 2>/dev/null" TERM; '
             'while :; do wait $p; s=$?; kill -0 $p 2>/dev/null || break; done; '
             'kill $w 2>/dev/null; exit $s')


#: For :class:`Child`: a pipe to this process, or /dev/null.
PIPE, DEVNULL = -1, -3


class TimeoutExpired(Exception):
    pass


class Child:
    """A child process started with ``os.posix_spawn``, with the bits of
    ``subprocess.Popen`` used here: ``pid``, ``returncode``, ``poll()``,
    ``wait()``, ``kill()`` and its ``stdin``/``stdout``/``stderr`` pipes
    (unbuffered file objects, or None).  (Importing subprocess costs 5-8
    ms in a fresh interpreter, on the head start's path.)

    Like ``Popen(close_fds=True, start_new_session=True,
    restore_signals=True)``: only fds 0-2 and ``keep`` are inherited, the
    child is in a session of its own, and SIGPIPE/SIGXFSZ (ignored by
    Python) are back to their defaults.  Each of ``stdin``, ``stdout``,
    ``stderr`` is PIPE, DEVNULL, a file descriptor, or None (this
    process's own)."""

    def __init__(self, argv: Sequence[str], *, stdin=None, stdout=None, stderr=None, keep=()):
        import signal

        self.returncode: Optional[int] = None
        self.stdin = self.stdout = self.stderr = None
        ours = {}  # fd in the child -> this process's end of its pipe
        theirs = []  # the child's ends, closed here once it has them
        actions = []
        try:
            for fd, how in enumerate((stdin, stdout, stderr)):
                if how == PIPE:
                    r, w = os.pipe()
                    ours[fd], child = (w, r) if fd == 0 else (r, w)
                    theirs.append(child)
                    actions.append((os.POSIX_SPAWN_DUP2, child, fd))
                elif how == DEVNULL:
                    actions.append((os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0))
                elif how is not None:
                    actions.append((os.POSIX_SPAWN_DUP2, how, fd))
            for fd in _inherited_fds():
                if fd > 2 and fd not in keep:
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            for fd in keep:
                os.set_inheritable(fd, True)
            try:
                self.pid = os.posix_spawn(argv[0], list(argv), os.environ, file_actions=actions, setsid=True,
                                          setsigdef=[getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ")
                                                     if hasattr(signal, n)])
            finally:
                for fd in keep:
                    os.set_inheritable(fd, False)
        except BaseException:
            for fd in list(ours.values()) + theirs:
                os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        for fd, name, mode in ((0, "stdin", "wb"), (1, "stdout", "rb"), (2, "stderr", "rb")):
            if fd in ours:
                setattr(self, name, open(ours[fd], mode, buffering=0))

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = 255
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if timeout is None:
            while self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    self.returncode = 255
                    break
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutExpired()
            time.sleep(0.005)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


def _inherited_fds() -> List[int]:
    """This process's file descriptors a child would inherit (not close-on-exec)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the usual range
        fds = list(range(3, 256))
    out = []
    for fd in fds:
        try:
            if os.get_inheritable(fd):
                out.append(fd)
        except OSError:
            pass
    return out


def watched(argv: Sequence[str], directory: str = "", **std) -> "tuple[Child, int]":
    """Start ``argv`` under the watchdog (``std``: its stdin, stdout,
    stderr, as for :class:`Child`): ``(process, fd)``.  The process ends
    when ``fd`` is closed or this process dies; ``directory`` (if any) is
    then removed."""
    r, w = os.pipe()
    try:
        proc = Child(["/bin/sh", "-c", _WATCHDOG, "sh", str(r), directory, *argv], keep=(r,), **std)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return proc, w


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def close_fd(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def ssh_binary() -> Optional[str]:
    """The ``ssh`` client to use (``$CHAPERONE_SSH`` or ``ssh`` on PATH)."""
    return which(os.environ.get("CHAPERONE_SSH") or "ssh")


def which(name: str) -> Optional[str]:
    """``shutil.which(name)`` for an executable file."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or os.curdir, name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    for path in candidates:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def default_client() -> str:
    """The SSH client chaperone uses unless told: ``$CHAPERONE_SSH_CLIENT``
    (``openssh`` or ``asyncssh``), else OpenSSH's ``ssh`` when it is
    installed, else asyncssh."""
    return os.environ.get("CHAPERONE_SSH_CLIENT") or ("openssh" if ssh_binary() else "asyncssh")


def multiplexes_itself(config: Sequence[str]) -> bool:
    """Whether the user's ssh config does its own connection sharing
    (ControlMaster/ControlPath/ControlPersist): chaperone then starts no
    master of its own."""
    return config_mentions(default_config_files(config), r"Control(Master|Path|Persist)")


def config_mentions(paths: Sequence[str], keyword: str) -> bool:
    """Whether any of these ssh config files sets ``keyword`` (a regular
    expression; a textual check: enough to decide whether to supply a
    default)."""
    import re

    pattern = re.compile(r"\s*(%s)\b" % keyword, re.IGNORECASE)
    for path in paths:
        try:
            with open(os.path.expanduser(path), errors="replace") as f:
                if any(pattern.match(line) for line in f):
                    return True
        except OSError:
            continue
    return False


def default_config_files(config: Sequence[str]) -> List[str]:
    return list(config) or ["~/.ssh/config", "/etc/ssh/ssh_config"]


def ssh_options(ssh: str, *, config: Sequence[str] = (), port: Optional[int] = None,
                username: Optional[str] = None, client_keys: Optional[Sequence[str]] = None,
                check_host_keys: bool = True, known_hosts: Optional[str] = None,
                connect_timeout: Optional[float] = None, keepalive_interval: float = 3.0,
                forwardings: bool = False) -> List[str]:
    """``ssh`` and its options (everything but the host and the command).
    Command-line options win over the config (ssh keeps the first value).
    Port forwardings from the config are cleared unless ``forwardings``
    (that would clear those on the command line too)."""
    argv = [ssh]
    if config:
        argv += ["-F", config[0]]
    argv += [
        "-T", "-x", "-a",  # no tty, no X11 or agent forwarding
        "-o", "BatchMode=yes",  # never a prompt
        "-o", "ServerAliveInterval=%d" % max(1, round(keepalive_interval)),
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]
    if not forwardings:
        argv += ["-o", "ClearAllForwardings=yes"]  # a LocalForward in the config is not for us
    if connect_timeout is not None:
        argv += ["-o", "ConnectTimeout=%d" % max(1, round(connect_timeout))]
    elif not config_mentions(default_config_files(config), "ConnectTimeout"):
        argv += ["-o", "ConnectTimeout=%d" % DEFAULT_CONNECT_TIMEOUT]
    if port:
        argv += ["-p", str(int(port))]
    if username:
        argv += ["-l", username]
    for key in client_keys or ():
        argv += ["-i", key]
    if not check_host_keys:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    elif known_hosts:
        argv += ["-o", "UserKnownHostsFile=%s" % known_hosts]
    return argv


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


async def wait_exited(proc: Child) -> int:
    """Until ``proc`` (a child not known to asyncio's child watcher) exited:
    its status, reaped."""
    import asyncio

    try:
        fd = os.pidfd_open(proc.pid)  # Linux 5.3+: readable once it exits
    except (AttributeError, OSError):
        while proc.poll() is None:
            await asyncio.sleep(0.01)
        return proc.returncode
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        if proc.poll() is None:
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


def direct_argv(options: Sequence[str], host: str, command: str, multiplex: bool) -> List[str]:
    """``ssh ... HOST COMMAND`` on a connection of its own.  ``multiplex``:
    chaperone shares connections itself (the user's config does not), so
    this call must neither use nor become a control master."""
    argv = list(options)
    if multiplex:
        argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return argv + ["--", host, command]


#: The remote command of a standby session (:class:`Standby`): the login
#: shell runs ``sh``, which reads one line from stdin -- the real command,
#: escaped by :func:`standby_input` -- and runs it; the rest of stdin is
#: that command's.  (``read`` takes a pipe byte by byte: nothing past the
#: line is consumed.)  An empty stdin ends it doing nothing.
STANDBY_COMMAND = """sh -c 'IFS= read -r c || exit 0; eval "$(printf %b "$c")"'"""


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
    return _standby is not None and _standby.key[:2] == (tuple(options), host)


def adopt_session(options: Sequence[str], host: str, multiplex: bool) -> Optional[Standby]:
    """The standby session if it has these options, host and sharing (it is
    then the caller's, its stdin not written yet); else None."""
    global _standby
    standby = _standby
    if standby is not None and standby.key == (tuple(options), host, multiplex):
        _standby = None
        return standby
    return None
