"""Transports: how agent commands reach a host.

One small interface (like httpx's ``BaseTransport``): :meth:`Transport.open`
runs ``agent.py ARGS`` on the host with ``stdin`` bytes and returns an
:class:`AgentProcess` to read its stdout from (and, opened with
``keep_stdin``, to go on writing its stdin: ``agent.py stdin``).  The transports:
``local.LocalTransport`` (a local subprocess), ``memory.MemoryTransport`` (an
in-memory host, for tests), ``ssh.via_asyncssh.SSHTransport`` and
``ssh.via_openssh.OpenSSHTransport``; ``factory`` is the one place that
decides which one reaches a host.  Everything above is the same for all.
"""

from __future__ import annotations

import abc
import asyncio
import os
from typing import List, Optional



class AgentProcess(abc.ABC):
    """A running agent command."""

    @abc.abstractmethod
    async def read(self, n: int = 1 << 20) -> bytes:
        """Up to ``n`` bytes of the agent's stdout; ``b""`` at the end."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """The agent's exit status (after its stdout ended)."""

    @abc.abstractmethod
    async def stderr(self) -> bytes:
        """What the agent wrote on stderr (after it exited)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop reading: kill the local process or close the SSH channel."""

    async def write(self, data: bytes) -> None:
        """More of the agent's stdin (opened with ``keep_stdin=True``);
        waits while the pipe or channel is full.  :class:`ConnectionLost`
        when it cannot be written any more (the agent or the connection is
        gone)."""
        raise NotImplementedError("%s does not keep an agent's stdin open" % type(self).__name__)

    async def write_eof(self) -> None:
        """The end of the agent's stdin (opened with ``keep_stdin=True``)."""
        raise NotImplementedError("%s does not keep an agent's stdin open" % type(self).__name__)

    async def copy_to(self, fd: int, limit: Optional[int] = None) -> int:
        """Write the rest of the agent's stdout (or its next ``limit``
        bytes) to ``fd`` (blocking writes); the number of bytes (fewer than
        ``limit`` only at the end).  Transports whose stdout is a local
        pipe copy in the kernel (:func:`copy_pipe`)."""
        n = 0
        while limit is None or n < limit:
            data = await self.read() if limit is None else await self.read(min(1 << 20, limit - n))
            if not data:
                break
            write_all(fd, data)
            n += len(data)
        return n


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def copy_pipe(reader: asyncio.StreamReader, fd: int, limit: Optional[int] = None) -> Optional[int]:
    """Copy what is left of a subprocess pipe behind ``reader`` (or its
    next ``limit`` bytes: what the reader holds, then the pipe itself) to
    ``fd``, in a thread, with ``os.splice`` where it can (no copy through
    Python): ``logs ID > file`` of a GiB at the speed of ``ssh HOST cat``.
    The number of bytes (fewer than ``limit`` only at the end); None
    (nothing taken) when the reader is not a plain pipe's."""
    transport = getattr(reader, "_transport", None)
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    buffer = getattr(reader, "_buffer", None)
    if pipe is None or buffer is None or reader.exception() is not None or transport.is_closing():
        return None  # (is_closing: it has read the end, and closes the pipe)
    transport.pause_reading()
    try:
        # What the transport read is handed to the reader by call_soon (a
        # subprocess's pipes): let what is on its way arrive first (without
        # this, 64 KiB read but not yet delivered went missing under load).
        for _ in range(2):
            await asyncio.sleep(0)
        if reader.exception() is not None:
            raise reader.exception()
        take = len(buffer) if limit is None else min(limit, len(buffer))
        held = bytes(buffer[:take])  # (asyncio's: read from the pipe, not yet by us)
        del buffer[:take]
        write_all(fd, held)
        left = None if limit is None else limit - take
        if left == 0:
            return take
        # (a copy of the descriptor: were the transport closed meanwhile,
        # its number could be another file's)
        src = os.dup(pipe.fileno())
        return take + await asyncio.get_running_loop().run_in_executor(None, _copy_fd, src, fd, left)
    finally:
        transport.resume_reading()  # (it reads the end: wait() and close() as ever)


def _copy_fd(src: int, dst: int, limit: Optional[int] = None) -> int:
    """Copy ``src`` (a pipe; closed here) to its end, or ``limit`` bytes,
    into ``dst``."""
    blocking = os.get_blocking(src)
    os.set_blocking(src, True)
    try:
        import fcntl

        fcntl.fcntl(src, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)  # (fewer, larger copies)
    except (OSError, ImportError):
        pass
    n = 0
    try:
        splice = getattr(os, "splice", None)  # (Python 3.10+)
        while limit is None or n < limit:
            size = 1 << 20 if limit is None else min(1 << 20, limit - n)
            if splice is not None:
                try:
                    k = splice(src, dst, size)
                except OSError:  # (dst a terminal, or opened with O_APPEND: copy)
                    splice = None
                    continue
            else:
                data = os.read(src, size)
                write_all(dst, data)
                k = len(data)
            if not k:
                break
            n += k
        return n
    finally:
        os.set_blocking(src, blocking)
        os.close(src)


class Transport(abc.ABC):
    #: Name of the host as records show it ("local" for this machine).
    host: str = "local"

    @abc.abstractmethod
    async def open(self, args: List[str], stdin: bytes = b"", *, keep_stdin: bool = False) -> AgentProcess:
        """Run ``agent.py *args`` on the host, ``stdin`` on its stdin; then
        its stdin is closed, or, with ``keep_stdin``, left open for
        :meth:`AgentProcess.write` and :meth:`AgentProcess.write_eof`."""

    async def close(self) -> None:
        return None

    def warm(self) -> None:
        """Start connecting now, in the background, if connecting is slow
        and the transport can (the OpenSSH client's shared connection)."""
        return None

    def describe(self) -> dict:
        """How the host was reached, for the run's record (reconnect later)."""
        return {"host": self.host}

    def connections(self) -> int:
        """Connections to the host open now (for metrics)."""
        return 0


async def spawn(argv: List[str], env: Optional[dict] = None) -> asyncio.subprocess.Process:
    """``argv`` with pipes for stdin, stdout and stderr, in a session of its
    own: out of the terminal's process group, so a Ctrl-C is for chaperone
    to decide about, never delivered to the agent (or ssh) behind its back.
    ``env``: its environment (default: this process's)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=1 << 20,
        env=env,
    )
    # (a larger pipe for what it writes: fewer, larger reads of a long
    # output; the transport may have closed it already, a quick exit)
    try:
        import fcntl

        pipe = proc.stdout._transport.get_extra_info("pipe")
        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (OSError, ValueError, ImportError, AttributeError):
        pass
    return proc


class AttachedProcess:
    """A child started before the event loop ran (a ``ssh.process.Child``,
    or anything with Popen's ``pid``, ``returncode``, ``poll()``,
    ``wait()`` and pipes for stdin, stdout and stderr), with the interface of an
    ``asyncio.subprocess.Process`` that :func:`feed_stdin` and the
    transports use: ``stdin`` (a StreamWriter), ``stdout`` and ``stderr``
    (StreamReaders), ``pid``, ``returncode``, ``wait()``.  asyncio's child
    watcher does not know it; it is reaped here (pidfd), never twice.
    ``on_exit``: called once it is reaped."""

    def __init__(self, popen, on_exit=None):
        self.popen = popen
        self.pid = popen.pid
        self.stdin = self.stdout = self.stderr = None
        self._pipes: list = []
        self._on_exit = on_exit

    @classmethod
    async def attach(cls, popen, on_exit=None) -> "AttachedProcess":
        self = cls(popen, on_exit)
        loop = asyncio.get_running_loop()
        try:
            for name in ("stdout", "stderr"):
                reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
                transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader, loop=loop), getattr(popen, name))
                self._pipes.append(transport)
                setattr(self, name, reader)
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop=loop), popen.stdin)
            self._pipes.append(transport)
            self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        except BaseException:
            self.close_pipes()
            raise
        return self

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode

    async def wait(self) -> int:
        from .ssh.process import wait_exited

        code = await wait_exited(self.popen)
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            on_exit()
        return code

    def close_pipes(self) -> None:
        for transport in self._pipes:
            transport.close()


async def feed_stdin(proc: asyncio.subprocess.Process, data: bytes, close: bool = True) -> None:
    """Write ``data`` to ``proc``'s stdin and close it unless not ``close``
    (an early exit of the process is not an error here: its status will
    say why)."""
    try:
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
        if close:
            proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass


class PipeStdin:
    """:meth:`AgentProcess.write` and :meth:`AgentProcess.write_eof` over
    a process's stdin pipe (an asyncio StreamWriter), after the bytes
    ``feeder`` (a task) writes first."""

    def __init__(self, writer, feeder: "Optional[asyncio.Future]", host: str):
        self._writer = writer
        self._feeder = feeder
        self._host = host

    async def _ready(self) -> None:
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            await feeder

    async def write(self, data: bytes) -> None:
        from ..errors import ConnectionLost

        await self._ready()
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as e:
            raise ConnectionLost("connection to %s lost: %s" % (self._host, str(e) or "the agent's stdin is closed")) \
                from None

    async def write_eof(self) -> None:
        await self._ready()
        try:
            self._writer.close()
        except (BrokenPipeError, ConnectionResetError):
            pass


