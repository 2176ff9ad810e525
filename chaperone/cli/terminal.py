"""``chaperone run -t``: this terminal attached to the program's terminal on
the host, as ``ssh -t`` attaches it.

While attached, this terminal is in raw mode (what is typed goes to the
program byte for byte: Ctrl-C is the program's interrupt, Ctrl-Z its
suspend, Ctrl-D its end of file), its window size follows this one
(SIGWINCH), and it is restored when the run ends, is detached, or this
process is stopped by a signal, whatever happens.  ssh's escapes, after a
newline: ``~.`` detaches (the program goes on; ``chaperone attach ID``
comes back to it), ``~~`` types one ``~``, ``~?`` lists them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import AsyncIterator, Callable, Optional

#: ssh's escape character, and what follows it.
ESCAPE = b"~"
HELP = ("Supported escape sequences:\r\n"
        " ~.   - detach (the program goes on: chaperone attach ID)\r\n"
        " ~?   - this message\r\n"
        " ~~   - send the escape character by typing it twice\r\n"
        "(Note that escapes are only recognized immediately after newline.)\r\n")


class RawMode:
    """This terminal (``fd``) in raw mode as ssh puts it, until
    :meth:`restore` (idempotent; called on every way out: the CLI ends with
    os._exit, so an atexit hook would never run)."""

    def __init__(self, fd: int = 0) -> None:
        import termios

        self.fd = fd
        self.saved: Optional[list] = termios.tcgetattr(fd)

    def enter(self) -> "RawMode":
        import termios
        import tty

        tty.setraw(self.fd, termios.TCSADRAIN)
        return self

    def restore(self) -> None:
        import termios

        if self.saved is not None:
            saved, self.saved = self.saved, None
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except (OSError, termios.error):  # (the terminal is gone: termios.error is no OSError)
                pass

    def say(self, text: str) -> None:
        """A line of chaperone's own on stderr, readable in raw mode."""
        data = text.replace("\r\n", "\n")
        if self.saved is not None:
            data = data.replace("\n", "\r\n")
        try:
            sys.stderr.write(data)
            sys.stderr.flush()
        except OSError:  # (the terminal is gone: nobody to tell)
            pass


class Escapes:
    """ssh's escapes in what is typed: ``feed(data)`` gives what goes to
    the program; ``~.`` after a newline (or at the start) calls
    ``on_detach``; ``~?`` calls ``on_help``."""

    def __init__(self, on_detach: Callable[[], None], on_help: Callable[[], None]) -> None:
        self.on_detach = on_detach
        self.on_help = on_help
        self.line_start = True
        self.pending = False  # an escape character typed at a line's start, waiting for the next

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            c = bytes((b,))
            if self.pending:
                self.pending = False
                if c == b".":
                    self.on_detach()
                    return bytes(out)
                if c == b"?":
                    self.on_help()
                    continue
                if c != ESCAPE:
                    out += ESCAPE  # (not an escape: the ~ goes too)
                out += c
            elif self.line_start and c == ESCAPE:
                self.pending = True
                continue
            else:
                out += c
            self.line_start = c in (b"\r", b"\n")
        return bytes(out)


async def keystrokes(fd: int, escapes: Escapes, on_gone: Optional[Callable[[], None]] = None
                     ) -> AsyncIterator[bytes]:
    """What is typed on ``fd``, escapes taken out, as it comes.

    ``on_gone``: for a terminal in raw mode, which has no end of its own
    (Ctrl-D is a byte for the program): its end, or an error reading it,
    is the terminal gone (its window closed): ``on_gone()`` is called and
    this never ends, so the program's input is not ended (a terminal
    attached later types to it again)."""
    from ..feed import read_fd

    try:
        async for data in read_fd(fd, 4096):
            data = escapes.feed(data)
            if data:
                yield data
    except OSError:
        if on_gone is None:
            raise
    if on_gone is not None:
        on_gone()
        await asyncio.Event().wait()  # (cancelled with the rest, at the detach)


class Resizer:
    """Sends this window's size to the run's terminal at each SIGWINCH, the
    latest only (one resize call in flight at a time)."""

    def __init__(self, ch, run_id: str) -> None:
        self.ch = ch
        self.run_id = run_id
        self.task: Optional[asyncio.Task] = None
        self.again = False

    def changed(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        from ..api import window_size
        from ..errors import ChaperoneError

        while True:
            self.again = False
            size = window_size()
            if size is not None:
                try:
                    await self.ch.resize(self.run_id, *size)
                except ChaperoneError:
                    pass  # (ended, or out of reach: the next change tries again)
            if not self.again:
                return

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Attached:
    """This terminal attached to a run: raw mode (with ``raw``: the run has
    a terminal there), what is typed (:meth:`keys`, escapes taken out),
    the window's size followed (``raw``), Ctrl-C/SIGTERM/SIGHUP and
    ``~.`` detaching, the terminal restored at the end whatever happens.
    :meth:`drive` prints a run's events and returns its state, or the
    exit status of a detach."""

    def __init__(self, ch, run_id: str, *, raw: bool, quiet: bool = False) -> None:
        from .display import OutageNotice

        self.ch = ch
        self.run_id = run_id
        self.raw = RawMode(0) if raw else None
        self.detached: list = []
        self.task: Optional[asyncio.Task] = None
        self.escapes = Escapes(on_detach=self.detach, on_help=lambda: self.say(HELP))
        self.resizer = Resizer(ch, run_id) if raw else None
        self.notice = OutageNotice(quiet, write=self.say)

    def say(self, text: str) -> None:
        if self.raw is not None:
            self.raw.say(text)
        else:
            sys.stderr.write(text.replace("\r\n", "\n"))
            sys.stderr.flush()

    def detach(self, sig: Optional[int] = None) -> None:
        self.detached.append(sig)
        if self.task is not None:
            self.task.cancel()

    def keys(self) -> AsyncIterator[bytes]:
        import signal

        gone = (lambda: self.detach(signal.SIGHUP)) if self.raw is not None else None
        return keystrokes(0, self.escapes, on_gone=gone)

    def swallow_keys(self) -> None:
        """Output only, on a terminal: what is typed is read and dropped
        (``~.`` still detaches), not left for the shell after the detach."""
        async def swallow():
            try:
                async for _ in self.keys():
                    pass
            except OSError:
                pass

        self.swallower = asyncio.ensure_future(swallow())

    async def drive(self, events: AsyncIterator) -> "tuple[dict, Optional[int]]":
        """``(the run's last state, None)`` at its end, or ``({}, exit
        status)`` when detached (130 for ``~.``, 128+N for signal N)."""
        import signal

        from ..protocol import OutputChunk, StateUpdate

        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        handled = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
        for sig in handled:
            loop.add_signal_handler(sig, self.detach, sig)
        if self.resizer is not None:
            loop.add_signal_handler(signal.SIGWINCH, self.resizer.changed)
        if self.raw is not None:
            self.raw.enter()
        state: dict = {}
        try:
            async for event in events:
                self.notice.recovered()
                if isinstance(event, OutputChunk):
                    out[event.stream].write(event.data)
                    out[event.stream].flush()
                elif isinstance(event, StateUpdate):
                    state = event.state
        except asyncio.CancelledError:
            if not self.detached:
                raise
            self.restore()
            from .display import detached_note

            self.say("\n%s\n" % detached_note(self.run_id))
            sig = self.detached[0]
            return {}, 128 + sig if sig else 130
        finally:
            self.restore()
            if getattr(self, "swallower", None) is not None:
                self.swallower.cancel()
            for sig in handled:
                loop.remove_signal_handler(sig)
            if self.resizer is not None:
                loop.remove_signal_handler(signal.SIGWINCH)
                self.resizer.close()
        return state, None

    def restore(self) -> None:
        if self.raw is not None:
            self.raw.restore()
