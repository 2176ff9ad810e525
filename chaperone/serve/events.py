"""The run list's change feed: numbered events kept for resuming.

Event ids increase, also across restarts of the server: each server numbers
its events from the time it started, in microseconds since the epoch (a
restarted server starts above every id of the one before, unless that one
published more than a million events a second).  A client that resumes
``since`` an id this server still holds gets exactly the events after it; any
other id (from before a restart, too old, or not an id this server gave)
gets a fresh snapshot first.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Deque, List, Optional, Tuple

#: Events kept for resuming.
KEEP = 20000


class EventBus:
    def __init__(self, keep: int = KEEP):
        self.base = time.time_ns() // 1000
        self.last = self.base
        self._events: Deque[Tuple[int, str, str]] = collections.deque(maxlen=keep)
        self._new = asyncio.Event()

    def publish(self, kind: str, payload: dict) -> int:
        self.last += 1
        self._events.append((self.last, kind, json.dumps(payload, separators=(",", ":"))))
        self._new.set()
        self._new = asyncio.Event()
        return self.last

    def since(self, event_id: Optional[int]) -> Optional[List[Tuple[int, str, str]]]:
        """The events after ``event_id``; None when this server cannot say
        (no id, an id from before it started or dropped, or a future id):
        the client needs a snapshot."""
        if event_id is None or event_id > self.last or event_id < self.base:
            return None
        if event_id == self.last:
            return []
        first = self._events[0][0] if self._events else self.last + 1
        if event_id < first - 1:
            return None
        return [e for e in self._events if e[0] > event_id]

    async def wait(self, after: int, timeout: float) -> None:
        """Until an event after ``after`` exists, or ``timeout`` passed."""
        if self.last > after:
            return
        try:
            await asyncio.wait_for(self._new.wait(), timeout)
        except asyncio.TimeoutError:
            pass
