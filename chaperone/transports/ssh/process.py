"""Child processes for the OpenSSH client, light to import (the CLI's head
start uses them before anything else is loaded).

* :class:`Child`: ``os.posix_spawn`` with the bits of ``subprocess.Popen`` used here.
* :func:`watched`: a child under a small ``sh`` watchdog that kills it when a
  pipe from this process closes, however this process ended (even SIGKILL).
* :func:`wait_exited`: await a child asyncio's child watcher does not know.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import List, Optional, Sequence

from ...errors import TimeoutExpired

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
        import _signal as signal  # (the C module: `signal` builds its enums at import)

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
