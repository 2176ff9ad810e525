"""``chaperone logs ID > file`` with ssh writing straight into the file, as
``ssh HOST cat FILE > file`` does: the head start (``chaperone.__main__``)
tries it first, before click, asyncio or the library load.

The normal path reads the agent's reply from ssh's stdout (a pipe), skips
what login scripts printed before the agent's marker, and copies the rest
to the file: one more copy of every byte.  Here ssh is given this process's
stdout, the file itself, and the agent is asked for ``output --direct``:
its marker and the counts (``N M``) go to stderr, then (both streams) the
M bytes of the run's stderr, which are held here; stdout gets the N bytes
of data and nothing else.  Once ssh has exited, the file must have grown by
exactly N bytes: then the held stderr is written, and that is all.  Else
(a login script that printed to stdout, a connection lost midway, the
agent not on the host yet, no such run) the file is cut back to where it
was and the normal path does it all, as always; a connection that could
not be made is said at once, as the normal path would say it.

Only the plain case: ``[-F CFG]... logs [--stdout|--stderr] ID`` with the
exact id of a run on a host reached with OpenSSH, stdout a regular file
(and, for both streams, stderr another file), no server running.
``CHAPERONE_FAST_LOGS=0`` turns this off (``CHAPERONE_FAST_CALLS=0``: this and
the other direct calls, chaperone/cli/fastcall.py).
"""

import os
import sys

from .fastcall import write_all

OFF = ("0", "off", "no", "false")


def attempt(argv) -> None:
    """Deliver the output and exit, or return for the normal path."""
    from . import fastcall

    if os.environ.get("CHAPERONE_FAST_LOGS", "").lower() not in OFF:
        fastcall.attempt(argv, "logs", ("--stdout", "--stderr"), _deliver)


def _deliver(rec, target, flags):
    """The exit status, or None (nothing written: the normal path)."""
    import fcntl
    import stat

    from .fastcall import new_marker, say, ssh_argv, ssh_failed
    from ..transports.ssh.process import DEVNULL, PIPE, close_fd, watched

    one = set(flags)
    streams = ["stdout"] if one == {"--stdout"} else ["stderr"] if one == {"--stderr"} else ["stdout", "stderr"]
    out = os.fstat(1)
    if not stat.S_ISREG(out.st_mode):
        return None
    if len(streams) == 2:
        err = os.fstat(2)
        if (err.st_dev, err.st_ino) == (out.st_dev, out.st_ino):
            return None  # (both to one file: in the order written, the normal path's timeline)
    marker = new_marker()
    stream = streams[0] if len(streams) == 1 else "both"
    argv = ssh_argv(target, ["--marker", marker, "output", rec.id, "--stream", stream, "--direct"])
    if argv is None:
        return None
    appends = bool(fcntl.fcntl(1, fcntl.F_GETFL) & os.O_APPEND)
    sys.stdout.flush()
    start = _position(appends)
    proc, lifeline = watched(argv, stdin=DEVNULL, stdout=None, stderr=PIPE)
    try:
        try:
            err = _Stderr(proc.stderr, marker)
            counts = err.counts()
            # (the run's stderr is held until stdout is known to be right:
            # a call handed to the normal path must not have written it)
            held = err.take(counts[1]) if counts is not None else None
            tail = err.rest()
            code = proc.wait()
        finally:
            close_fd(lifeline)
        grew = _position(appends) - start
        if counts is not None and code == 0 and held.size == counts[1] and grew == counts[0]:
            held.write_to(2)
            return 0
    except Exception:
        _undo(start)  # (else raises: the normal path must not write it all again)
        return None
    # Not as it should be: what ssh wrote goes, and nothing else was written.
    # No head from the agent: a connection that failed is said once (the
    # normal path would only try it again); anything else (the agent to be
    # shipped, no such run) and a head with something wrong after it (a
    # login script's output in the file, a connection lost midway) go to
    # the normal path, which skips the noise and says what went wrong.
    _undo(start)
    failed = ssh_failed(target, code, tail) if counts is None else None
    if failed is not None:
        say("chaperone: %s" % failed)
        return failed.exit_code
    return None


def _position(appends):
    return os.fstat(1).st_size if appends else os.lseek(1, 0, os.SEEK_CUR)


def _undo(start):
    """Cut stdout back to ``start``: what ssh wrote there goes."""
    os.ftruncate(1, start)
    os.lseek(1, start, os.SEEK_SET)


class _Held:
    """Bytes kept until they may be written: in memory, past 8 MiB in an
    unlinked temporary file."""

    LIMIT = 8 << 20

    def __init__(self):
        self.parts, self.file, self.size = [], None, 0

    def add(self, data):
        self.size += len(data)
        if self.file is None and self.size > self.LIMIT:
            import tempfile

            self.file = tempfile.TemporaryFile()
            for part in self.parts:
                self.file.write(part)
            self.parts = []
        if self.file is not None:
            self.file.write(data)
        else:
            self.parts.append(data)

    def write_to(self, fd):
        if self.file is None:
            write_all(fd, b"".join(self.parts))
            return
        self.file.seek(0)
        while True:
            data = self.file.read(1 << 20)
            if not data:
                break
            write_all(fd, data)


class _Stderr:
    """ssh's stderr: login scripts' noise, the agent's marker line and its
    counts line, then (both streams) the run's stderr bytes; or, on a
    failure, the error lines."""

    def __init__(self, pipe, marker):
        self.pipe = pipe
        self.needle = b"\n" + marker.encode() + b"\n"
        self.buf = b""

    def _more(self):
        data = self.pipe.read(1 << 16)
        self.buf += data
        return bool(data)

    def counts(self):
        while True:
            at = self.buf.find(self.needle)
            if at >= 0:
                line, nl, rest = self.buf[at + len(self.needle):].partition(b"\n")
                if nl:
                    fields = line.split()
                    if len(fields) != 2 or not all(f.isdigit() for f in fields):
                        return None
                    self.buf = rest
                    return int(fields[0]), int(fields[1])
            if not self._more():
                return None

    def take(self, size):
        """The next ``size`` bytes (fewer at the end), held (:class:`_Held`)."""
        held = _Held()
        while held.size < size:
            if not self.buf and not self._more():
                break
            piece, self.buf = self.buf[:size - held.size], self.buf[size - held.size:]
            held.add(piece)
        return held

    def rest(self):
        while self._more():
            pass
        return self.buf
