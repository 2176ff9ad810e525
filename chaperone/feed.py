"""A run's stdin as it comes: the input is sent to the host while the
program runs, spooled there, and fed to the program from the spool.

``Chaperone.start(..., stdin=SOURCE)`` takes the input as ``bytes`` (small
ones go with program.json, larger ones are streamed), or as a stream: an
async iterable of bytes, an :class:`asyncio.StreamReader`, or a file
descriptor (:func:`read_fd`).  A stream makes program.json's stdin
``{"stream": true}``, and a :class:`Feeder` appends the input with the
agent's ``stdin`` command, idempotent by offset: every byte is held on
the host once whatever the connection does (a reconnect resumes at the
offset the host holds), and the end of the input is recorded once, so the
program reads end of file once.  At most :data:`WINDOW` bytes are held
here that the host has not acknowledged: memory stays bounded whatever
the input's size.
"""

from __future__ import annotations

import asyncio
import os
import select
import stat
from typing import AsyncIterator, Callable, Optional, Union

from .errors import ChaperoneError, ConnectionLost, UsageError

#: Input sent with program.json when it is bytes of at most this size.
INLINE = 1 << 20
#: Bytes sent and not yet acknowledged by the host, at most.
WINDOW = 4 << 20
#: Bytes in one frame (the agent takes up to 1 MiB).
FRAME = 1 << 18

Source = Union[bytes, bytearray, memoryview, AsyncIterator[bytes], asyncio.StreamReader]


def inline(source) -> Optional[bytes]:
    """``source`` as bytes to send with program.json, or None when it is a
    stream (or too large to go that way)."""
    if isinstance(source, (bytes, bytearray, memoryview)) and len(source) <= INLINE:
        return bytes(source)
    return None


def check_source(source) -> None:
    """A usage error for what cannot be a program's input."""
    if not isinstance(source, (bytes, bytearray, memoryview, asyncio.StreamReader)) \
            and not hasattr(source, "__aiter__"):
        raise UsageError("stdin must be bytes, an async iterable of bytes or an asyncio.StreamReader, not %s"
                         % type(source).__name__)


async def chunks(source) -> AsyncIterator[bytes]:
    """The bytes of ``source`` (see :data:`Source`), in pieces."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for at in range(0, len(view), FRAME):
            yield bytes(view[at:at + FRAME])
        return
    if isinstance(source, asyncio.StreamReader):
        while True:
            data = await source.read(FRAME)
            if not data:
                return
            yield data
    async for data in source:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError("stdin yielded %s, not bytes" % type(data).__name__)
        if data:
            yield bytes(data)


async def read_fd(fd: int, size: int = FRAME) -> AsyncIterator[bytes]:
    """What file descriptor ``fd`` gives, as it comes: pipes, sockets and
    terminals when they are readable (their mode is left as it is), files
    and devices that cannot be polled (``/dev/zero``) in a thread."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    polled = not stat.S_ISREG(os.fstat(fd).st_mode)
    if polled:
        try:
            loop.add_reader(fd, ready.set)
        except (PermissionError, ValueError, OSError):
            polled = False
    try:
        while True:
            if polled:
                await ready.wait()
                ready.clear()
                # (the event may be stale: the loop saw it readable before the
                # last read emptied it; a read of a blocking descriptor that
                # is empty would stop the whole event loop)
                if not select.select([fd], [], [], 0)[0]:
                    continue
                try:
                    data = os.read(fd, size)
                except BlockingIOError:
                    continue
            else:
                data = await loop.run_in_executor(None, os.read, fd, size)
            if not data:
                return
            yield data
    finally:
        if polled:
            loop.remove_reader(fd)


class Feeder:
    """Sends ``source`` as the input of run ``run_id`` (whose program.json
    says ``{"stream": true}``) through ``client()`` (an AgentClient to its
    host, made again at each reconnect), until the host holds all of it
    and its end, or the run is over.  A dropped connection is reconnected
    with backoff (``on_reconnect(error, delay)`` is told) for up to
    ``reconnect_for`` seconds at a time; the host's answer says where to
    resume.  :meth:`run` returns the number of bytes the host holds."""

    def __init__(self, client: Callable, run_id: str, source, *,
                 on_reconnect: Optional[Callable[[Exception, float], None]] = None, reconnect_for: float = 3600.0,
                 append: bool = False):
        #: ``append``: ``source`` comes after what the host holds already
        #: (another process sent the first part: ``Chaperone.send_input``),
        #: not from the input's first byte.
        self.append = append
        self.client = client
        self.run_id = run_id
        self.source = source
        self.on_reconnect = on_reconnect
        self.reconnect_for = reconnect_for
        self.pending = bytearray()  # the input from `base` on, not acknowledged yet
        self.base = 0
        self.acked = 0  # bytes the host holds
        self.total: Optional[int] = None  # the input's length, once the source ended
        self.failure: Optional[BaseException] = None  # the source's own error
        self.closed = False  # the run was over before all of it was held
        self._acked = asyncio.Event()
        self._it = None
        self._next: Optional[asyncio.Future] = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._it = chunks(self.source).__aiter__()
        delay = 0.25
        give_up = loop.time() + self.reconnect_for
        try:
            while True:
                before = self.acked
                try:
                    await self._session()
                    break
                except ChaperoneError as e:
                    if not (isinstance(e, ConnectionLost) or getattr(e, "transient", False)):
                        raise
                    if self.acked > before:
                        delay, give_up = 0.25, loop.time() + self.reconnect_for
                    if loop.time() + delay > give_up:
                        raise
                    if self.on_reconnect:
                        self.on_reconnect(e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            if self._next is not None:
                self._next.cancel()
            aclose = getattr(self._it, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass
        if self.failure is not None:
            raise ChaperoneError("reading the input of run %s failed after %d bytes: %s"
                                 % (self.run_id, self.acked, self.failure)) from self.failure
        return self.acked

    def _ack(self, answer: dict) -> None:
        held = answer.get("held")
        if self.append and isinstance(held, int) and held >= 0:
            self.append = False  # (the first answer: this input starts there)
            self.base = self.acked = held
        if not isinstance(held, int) or held < self.acked:
            if isinstance(held, int) and held < self.acked:
                raise ChaperoneError("run %s: the host holds %d bytes of its input, fewer than the %d it acknowledged"
                                     % (self.run_id, held, self.acked))
            raise ChaperoneError("run %s: the agent's stdin answer makes no sense: %r" % (self.run_id, answer))
        if held > self.base + len(self.pending):
            raise ChaperoneError("run %s: the host holds %d bytes of its input, more than were sent"
                                 % (self.run_id, held))
        self.acked = held
        del self.pending[:held - self.base]
        self.base = held
        self._acked.set()

    def _finished(self, answer: dict) -> bool:
        if answer.get("closed"):
            self.closed = self.total is None or self.acked < self.total
            return True
        return bool(answer.get("end")) and (self.total is None or self.acked >= self.total)

    async def _answers(self, call) -> None:
        """Read the call's answers until the input is all held with its end
        (or the run is over)."""
        while True:
            answer = await call.answer()
            if answer is None:
                raise ConnectionLost("the stdin call to run %s ended early" % self.run_id)
            self._ack(answer)
            if self._finished(answer):
                return

    async def _session(self) -> None:
        call = await self.client().open_stdin(self.run_id)
        try:
            first = await call.answer()
            if first is None:
                raise ConnectionLost("the stdin call to run %s ended early" % self.run_id)
            self._ack(first)
            if self._finished(first):
                return
            answers = asyncio.ensure_future(self._answers(call))
            try:
                await self._send(call, answers)
            finally:
                answers.cancel()
            try:
                await call.finish()
            except ChaperoneError:
                pass
        finally:
            call.close()

    @staticmethod
    async def _put(call, answers: asyncio.Future, kind: bytes, offset: int, data: bytes = b"") -> bool:
        """Send a frame; False when the call ended because the work is done
        (the run is over, or the answers said all of it is held: the agent
        ends then, and a frame still on its way finds it gone)."""
        try:
            await call.send(kind, offset, data)
            return True
        except ChaperoneError:
            try:
                await asyncio.wait_for(asyncio.shield(answers), 1.0)
            except Exception:
                pass
            if answers.done() and not answers.cancelled() and answers.exception() is None:
                return False
            raise

    async def _send(self, call, answers: asyncio.Future) -> None:
        pos = self.acked
        sent_end = False
        while True:
            if answers.done():
                answers.result()  # (its error, if any)
                return
            end = self.base + len(self.pending)
            if pos < end and pos - self.acked < WINDOW:
                data = bytes(self.pending[pos - self.base:pos - self.base + FRAME])
                if not await self._put(call, answers, b"D", pos, data):
                    return
                pos += len(data)
                continue
            if self.total is not None and pos == self.total and not sent_end:
                if not await self._put(call, answers, b"E", pos):
                    return
                sent_end = True
                continue
            waits = {answers}
            if self.total is None and pos == end and end - self.acked < WINDOW:
                if self._next is None:
                    self._next = asyncio.ensure_future(self._it.__anext__())
                waits.add(self._next)
            self._acked.clear()
            acked = asyncio.ensure_future(self._acked.wait())
            waits.add(acked)
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                acked.cancel()
            if self._next is not None and self._next in done:
                fut, self._next = self._next, None
                try:
                    self.pending += fut.result()
                except StopAsyncIteration:
                    self.total = self.base + len(self.pending)
                except Exception as e:  # (the input could not be read: it ends here)
                    self.failure = e
                    self.total = self.base + len(self.pending)


class SharedInput:
    """One input for many runs (``run -H``, ``run_many(stdin=a stream)``):
    the source is read once, as it comes, into a private temporary file
    here, and each run reads that file at its own pace (:meth:`reader`),
    waiting for it to grow until the source ends.  Memory stays bounded
    whatever the input's size and however slow a host is, and a host that
    starts late still gets every byte from the first; the file is removed
    by :meth:`close`."""

    def __init__(self, source) -> None:
        import tempfile

        check_source(source)
        self.source = source
        fd, path = tempfile.mkstemp(prefix="chaperone-input-")  # (0600)
        os.unlink(path)  # (nothing to leave behind, whatever happens to this process)
        self.fd = fd
        self.size = 0
        self.ended = False
        self.failure: Optional[BaseException] = None
        self._grew = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for data in chunks(self.source):
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(self.fd, view, self.size + len(data) - len(view)):]
                self.size += len(data)
                self._grew.set()
        except Exception as e:  # (the input could not be read: it ends here, and says why)
            self.failure = e
        finally:
            self.ended = True
            self._grew.set()

    async def reader(self) -> AsyncIterator[bytes]:
        """Every byte of the input, from the first, as it comes."""
        self._start()
        offset = 0
        while True:
            if offset < self.size:
                data = os.pread(self.fd, min(FRAME, self.size - offset), offset)
                offset += len(data)
                yield data
                continue
            if self.ended:
                if self.failure is not None:
                    raise ChaperoneError("reading the input failed after %d bytes: %s"
                                         % (self.size, self.failure)) from self.failure
                return
            self._grew.clear()
            await self._grew.wait()

    def close(self) -> None:
        """Stop reading the source; readers still reading fail."""
        if self._task is not None:
            self._task.cancel()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
