"""The agent's stdout, parsed without I/O (sans-IO).

What the agent prints, after whatever a login script printed first:

* a marker line (``\\n<marker>\\n``) the client chose, so that noise before it
  is skipped;
* for ``start``/``status``/``signal``/``list``/``clean``/``control``: one JSON
  line;
* for ``start --follow`` and ``follow``: the JSON state line (``start`` only),
  then frames: a header ``!cQI`` (kind, offset, length) and ``length`` bytes.
  Kinds: ``1`` stdout, ``2`` stderr, ``S`` a state JSON, ``E`` the end;
  ``X`` a run ``watch`` cannot read, ``T`` when the next output was written
  (``logs``).

:class:`StreamDecoder` turns bytes into events; feed it whatever the transport
read, in any split.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Union
from .errors import ForeignBytes, ProtocolError  # noqa: F401 (defined there; exported here too)

FRAME = struct.Struct("!cQI")
#: The output streams of a run (the agent mirrors this; tests check it).
STREAMS = ("stdout", "stderr")
KIND_STREAM = {b"1": STREAMS[0], b"2": STREAMS[1]}
#: Every kind of frame the agent sends, and the longest frame it sends (a
#: stream's are at most its CHUNK, 1 MiB; a state at most 1 MiB too).
FRAME_KINDS = frozenset((b"1", b"2", b"S", b"T", b"X", b"E", b"."))
MAX_FRAME = 16 << 20


@dataclass(frozen=True)
class OutputChunk:
    stream: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class StateUpdate:
    state: dict

    @property
    def final(self) -> bool:
        return self.state.get("state") in ("done", "error", "lost")


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class RunError:
    """``watch``: one of the runs cannot be read (``code``: the agent's exit
    status for it alone, 4 for "no such run")."""

    run_id: str
    error: str
    code: int


@dataclass(frozen=True)
class Written:
    """``logs``: the output frames that follow were written by ``time``
    (seconds since the epoch), after the previous :class:`Written`'s;
    ``None``: when is not known (a run without a timeline)."""

    time: Optional[float]


Event = Union[OutputChunk, StateUpdate, End, RunError, Written]


#: What a reply without its marker line means.
NO_MARKER = "the agent's reply has no marker (is python3 working there?)"


class AfterMarker:
    """What follows the marker line in the agent's stdout, whatever the
    splits of the bytes fed (sans-IO): the login scripts' output before it
    is skipped and counted (``noise``)."""

    def __init__(self, marker: str):
        self._needle = b"\n" + marker.encode() + b"\n"
        self._head = b""
        self.found = False
        self.noise = 0  # bytes skipped before the marker

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` after the marker (b"" until it came)."""
        if self.found:
            return data
        head = self._head + data
        at = head.find(self._needle)
        if at < 0:
            keep = len(self._needle) - 1
            if len(head) > keep:
                self.noise += len(head) - keep
                head = head[-keep:]
            self._head = head
            return b""
        self.found, self._head = True, b""
        self.noise += at
        return head[at + len(self._needle):]


class StreamDecoder:
    """Decode the agent's stdout into events.

    ``json_line``: a JSON line follows the marker (``start``); ``framed``:
    frames follow (``--follow``).
    """

    def __init__(self, marker: str, json_line: bool = True, framed: bool = False):
        self._after = AfterMarker(marker)
        self._json_line = json_line
        self._framed = framed
        self._buf = bytearray()
        self._stage = "marker"
        self.ended = False
        # A frame's data longer than what came so far: its header, and its
        # data's pieces as they come, joined once whole (one copy of each
        # byte, not one per read).
        self._head: Optional[tuple] = None
        self._parts: List[bytes] = []
        self._have = 0
        #: Where each stream's next frame starts (known from its first).
        self._next_offset: Dict[str, int] = {}
        #: A stream's data, until the header after it checks out.
        self._held: Optional[OutputChunk] = None
        self._events: List[Event] = []

    @property
    def noise(self) -> int:
        """Bytes skipped before the marker."""
        return self._after.noise

    def feed(self, data: bytes) -> List[Event]:
        """The events ``data`` completes.  A stream's data is given out once
        the header after it checked out (the next frame, or the agent's
        ``.`` seal when it goes idle): bytes another process wrote into a
        frame are caught there (:class:`ForeignBytes`) before that frame's
        data is given out."""
        events = self._events = []
        if self._stage == "marker":
            data = self._after.feed(data)
            if not self._after.found:
                return events
            self._stage = "json" if self._json_line else "frames"
        if self._head is not None:
            kind, offset, length = self._head
            need = length - self._have
            if len(data) < need:
                self._parts.append(data)
                self._have += len(data)
                return events
            self._parts.append(data[:need])
            body = b"".join(self._parts)
            self._head, self._parts, self._have = None, [], 0
            self._deliver(self._frame(kind, offset, body))
            data = data[need:]
            if self.ended:
                return events
        self._buf += data
        while self._next():
            pass
        return events

    def _deliver(self, event: Optional[Event]) -> None:
        if isinstance(event, OutputChunk):
            self._held = event  # (until the next header checks out)
        elif event is not None:
            self._events.append(event)

    def _next(self) -> bool:
        """Decode what the buffer holds next; False when it needs more."""
        buf = self._buf
        if self._stage == "json":
            at = buf.find(b"\n")
            if at < 0:
                return False
            line = bytes(buf[:at])
            del buf[: at + 1]
            self._stage = "frames" if self._framed else "done"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ProtocolError("the agent sent invalid JSON: %s" % e) from None
            self._deliver(StateUpdate(obj) if isinstance(obj, dict) else StateUpdate({"list": obj}))
            return True
        if self._stage == "frames":
            if len(buf) < FRAME.size:
                return False
            kind, offset, length = FRAME.unpack_from(buf)
            self._check(kind, offset, length)
            if len(buf) < FRAME.size + length:
                # (the rest of its data comes in feed's later calls)
                self._head = (kind, offset, length)
                self._parts = [bytes(buf[FRAME.size:])]
                self._have = len(self._parts[0])
                del buf[:]
                return False
            with memoryview(buf) as view:
                data = view[FRAME.size: FRAME.size + length].tobytes()
            del buf[: FRAME.size + length]
            self._deliver(self._frame(kind, offset, data))
            return not self.ended
        return False

    def _check(self, kind: bytes, offset: int, length: int) -> None:
        """A frame's header as the agent writes them: a known kind, a sane
        length, and a stream's frames one after the other; else bytes that
        are not the agent's came in (:class:`ForeignBytes`).  A header that
        checks out shows the frame before it was whole: its data is given
        out."""
        stream = KIND_STREAM.get(kind)
        if kind not in FRAME_KINDS or length > MAX_FRAME or (
                stream is not None and self._next_offset.get(stream, offset) != offset) or (
                kind in (b"S", b"X", b"E", b".") and offset != 0) or (kind in (b"E", b".") and length != 0):
            raise ForeignBytes("bytes that are not the agent's came in its frames (something else writes to the "
                               "session's output: a job the login scripts left running?)")
        if stream is not None:
            self._next_offset[stream] = offset + length
        if self._held is not None:
            self._events.append(self._held)
            self._held = None

    def _frame(self, kind: bytes, offset: int, data: bytes) -> Optional[Event]:
        if kind == b".":  # (the agent's seal: the frames before it were whole)
            return None
        if kind in KIND_STREAM:
            return OutputChunk(KIND_STREAM[kind], offset, data)
        if kind in (b"S", b"X"):
            try:
                obj = json.loads(data)
            except ValueError:  # (the agent's are always whole JSON: these bytes were cut by others)
                raise ForeignBytes("a frame of the agent's was cut by bytes that are not its own (something else "
                                   "writes to the session's output: a job the login scripts left running?)") from None
            if kind == b"X":
                return RunError(str(obj.get("id")), str(obj.get("error")), int(obj.get("code") or 3))
            return StateUpdate(obj)
        if kind == b"T":
            return Written(offset / 1e6 if offset else None)
        if kind == b"E":
            self._stage = "done"
            self.ended = True
            return End()
        raise ProtocolError("the agent sent an unknown frame kind %r" % kind)


def payload_after_marker(data: bytes, marker: str) -> bytes:
    after = AfterMarker(marker)
    payload = after.feed(data)
    if not after.found:
        raise ProtocolError(NO_MARKER)
    return payload
