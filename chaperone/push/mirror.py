"""The local copy of a run's output.

Every byte of a run's stdout and stderr lands here, whichever path delivered
it (the agent's HTTPS callback or an SSH catch-up).  Appends are idempotent
by offset: the number of bytes held is the file's size, a chunk that starts
past it is refused (:class:`OffsetGap`), a chunk that is already held is
ignored and a chunk that overlaps the end contributes only its new tail.  The
check and the write happen under an exclusive ``flock`` on a lock file in the
directory, so two processes (the scheduler and a CLI) appending the same
chunks never store a byte twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Union

from ..models import STREAMS
from ..errors import OffsetGap  # noqa: F401 (defined there; exported here too)

LOCK_NAME = ".lock"
#: The most pieces one writev takes (Linux, macOS: 1024).
IOV_MAX = 1024


def check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}: expected one of {', '.join(STREAMS)}")
    return stream


def plan_append(held: int, offset: int, length: int) -> int:
    """Sans-IO offset decision: how many leading bytes of a ``length``-byte
    chunk starting at ``offset`` are already held (skip them, write the rest).

    Returns ``length`` for a pure duplicate (nothing to write); raises
    :class:`OffsetGap` when ``offset > held``; :class:`ValueError` for a
    negative offset or length.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if offset > held:
        raise OffsetGap(held, offset)
    return min(held - offset, length)


class OutputMirror:
    """``<directory>/stdout`` and ``<directory>/stderr`` (0600, directory 0700)."""

    def __init__(self, directory: Path, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._open: Dict[str, list] = {}  # stream -> [its Appender, users] (appending())
        old = os.umask(0o077)  # missing parents (mirror/) are private too
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)

    def path(self, stream: str) -> Path:
        return self.directory / check_stream(stream)

    def held(self, stream: str) -> int:
        """Bytes held for ``stream`` (the file's size)."""
        try:
            return os.stat(self.path(stream)).st_size
        except FileNotFoundError:
            return 0

    def _lock(self, blocking: bool = True) -> int:
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, stream: str, offset: int, data: Union[bytes, Sequence[bytes]],
               blocking: bool = True) -> int:
        """Store ``data`` found at ``offset`` of ``stream``; return the bytes held.

        ``data``: bytes, or a list of bytes-like pieces that follow each
        other (written with one ``writev``, never joined: no copy of them).
        Idempotent: a duplicate writes nothing, an overlap writes only the new
        tail; ``offset > held`` raises :class:`OffsetGap` and writes nothing.
        Not ``blocking``: :class:`BlockingIOError` (nothing written) when
        another process holds the lock, instead of waiting for it.
        """
        shared = None if blocking else self._open.get(stream)
        if shared is not None:  # (inside appending(): this thread's files, opened once)
            return shared[0].append(offset, data, blocking=False)
        with Appender(self, stream) as appender:
            return appender.append(offset, data, blocking)

    @contextlib.contextmanager
    def appending(self, stream: str) -> Iterator[None]:
        """Within it, the non-blocking appends to ``stream`` (the event
        loop's: the pieces of a body as they arrive) go through one pair of
        open files instead of opening the lock file and the stream's file
        at every append.  Blocking appends (a thread waiting for another
        process's lock) open their own, as always: a ``flock`` excludes
        other open files, not other users of the same one."""
        shared = self._open.get(stream)
        if shared is None:
            shared = self._open[stream] = [Appender(self, stream), 0]
        shared[1] += 1
        try:
            yield
        finally:
            shared[1] -= 1
            if shared[1] == 0:
                del self._open[stream]
                shared[0].close()

    def read(self, stream: str, offset: int = 0, length: Optional[int] = None) -> bytes:
        """Up to ``length`` bytes (all when ``None``) of ``stream`` from ``offset``."""
        path = self.path(stream)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be >= 0")
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return b""


class Appender:
    """Appends to one stream of a mirror (:meth:`OutputMirror.append`),
    its lock file and its stream's file opened by the first append and
    closed by :meth:`close`: the same checks under the same ``flock``."""

    def __init__(self, mirror: OutputMirror, stream: str) -> None:
        self.path = str(mirror.path(stream))
        self.lock_path = str(mirror.directory / LOCK_NAME)
        self.fsync = mirror.fsync
        self._lock_fd: Optional[int] = None
        self._fd: Optional[int] = None

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)  # (the lock file's: releases any flock)

    def append(self, offset: int, data: Union[bytes, Sequence[bytes]], blocking: bool = True) -> int:
        """:meth:`OutputMirror.append` of this stream."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"invalid offset {offset!r}")
        pieces = [memoryview(p).cast("B") for p in (data if isinstance(data, (list, tuple)) else [data])]
        length = sum(len(p) for p in pieces)
        if self._lock_fd is None:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fd = self._fd
            held = os.fstat(fd).st_size
            skip = plan_append(held, offset, length)
            todo = []
            for p in pieces:  # (what is held already is skipped)
                if skip >= len(p):
                    skip -= len(p)
                else:
                    todo.append(p[skip:])
                    skip = 0
            wrote = False
            while todo:
                n = os.writev(fd, todo[:IOV_MAX])
                held += n
                wrote = True
                while n:
                    if n >= len(todo[0]):
                        n -= len(todo.pop(0))
                    else:
                        todo[0], n = todo[0][n:], 0
            if self.fsync and wrote:
                os.fsync(fd)
            return held
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
