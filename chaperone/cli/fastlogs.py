"""``chaperone logs ID > file`` with ssh writing straight into the file, as
``ssh HOST cat FILE > file`` does: the head start (``chaperone.__main__``)
tries it first, before click, asyncio or the library load.

The normal path reads the agent's reply from ssh's stdout (a pipe), skips
what login scripts printed before the agent's marker, and copies the rest
to the file: one more copy of every byte.  Here ssh is given this process's
stdout, the file itself, and the agent is asked for ``output --direct``:
its marker and the counts (``N M``) go to stderr, then (both streams) the
M bytes of the run's stderr, which are copied to this process's stderr;
stdout gets the N bytes of data and nothing else.  Once ssh has exited,
the file must have grown by exactly N bytes.  More means a login script
wrote to stdout before the agent ran: those bytes are at the start of what
was written, and the data is moved back over them.

Only the plain case: ``[-F CFG]... logs [--stdout|--stderr] ID`` with the
exact id of a run on a host reached with OpenSSH, stdout a regular file
(and, for both streams, stderr another file), no server running.
Anything else, or a call that fails before a byte was written (no such
run, the agent missing on the host, no connection), returns to the normal
path, which then does (and says) what it always did.
``CHAPERONE_FAST_LOGS=0`` turns this off (``CHAPERONE_FAST_CALLS=0``: this and
the other direct calls, chaperone/cli/fastcall.py).
"""

import os
import sys

OFF = ("0", "off", "no", "false")


def attempt(argv) -> None:
    """Deliver the output and exit, or return for the normal path."""
    from .fastcall import finish, plan

    try:
        planned = None if os.environ.get("CHAPERONE_FAST_LOGS", "").lower() in OFF else \
            plan(argv, "logs", ("--stdout", "--stderr"))
        code = None if planned is None else _deliver(*planned)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        return
    finish(code)


def _deliver(rec, target, flags):
    """The exit status, or None (nothing written: the normal path)."""
    import fcntl
    import stat

    from .fastcall import new_marker, ssh_argv, ssh_failed
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
        err = _Stderr(proc.stderr, marker)
        counts = err.counts()
        copied = err.copy_to(2, counts[1]) if counts is not None else 0
        tail = err.rest()
        code = proc.wait()
    finally:
        close_fd(lifeline)
    grew = _position(appends) - start
    if counts is None or code != 0 or copied < counts[1] or grew < counts[0]:
        if grew == 0 and copied == 0:
            failed = ssh_failed(target, code, tail) if counts is None else None
            if failed is not None:  # (cannot connect: said once, not tried again by the normal path)
                _say("chaperone: %s" % failed)
                return failed.exit_code
            return None  # (nothing written: the normal path says what went wrong, or ships the agent)
        os.ftruncate(1, start)
        os.lseek(1, start, os.SEEK_SET)
        _say("chaperone: connection to %s lost: %d of %d bytes came%s" % (
            target.name, grew + copied, sum(counts or (0, 0)), _last_line(tail)))
        return 255
    if grew > counts[0] and not _shift(start, grew - counts[0], counts[0]):
        os.ftruncate(1, start)  # (a file it cannot read back: the normal path writes it again)
        os.lseek(1, start, os.SEEK_SET)
        return None
    return 0


def _position(appends):
    return os.fstat(1).st_size if appends else os.lseek(1, 0, os.SEEK_CUR)


def _shift(start, noise, size):
    """Move ``size`` bytes at ``start + noise`` of stdout back to ``start``
    (what a login script printed first goes), and cut the file there.
    False if the file cannot be read back (opened again, read-write)."""
    try:
        fd = os.open("/proc/self/fd/1", os.O_RDWR)
    except OSError:
        return False
    try:
        done = 0
        while done < size:
            data = os.pread(fd, min(1 << 20, size - done), start + noise + done)
            if not data:
                break
            _pwrite_all(fd, data, start + done)
            done += len(data)
        os.ftruncate(fd, start + size)
    finally:
        os.close(fd)
    os.lseek(1, start + size, os.SEEK_SET)
    return True


def _pwrite_all(fd, data, at):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


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

    def copy_to(self, fd, size):
        done = 0
        while done < size:
            if not self.buf and not self._more():
                break
            take, self.buf = self.buf[:size - done], self.buf[size - done:]
            _write_all(fd, take)
            done += len(take)
        return done

    def rest(self):
        while self._more():
            pass
        return self.buf


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _last_line(data):
    lines = [l for l in data.decode("utf-8", "replace").splitlines() if l.strip()]
    return (": " + lines[-1].replace("chaperone-agent: ", "", 1)) if lines else ""


def _say(text):
    try:
        _write_all(2, (text + "\n").encode("utf-8", "surrogateescape"))
    except OSError:
        pass
