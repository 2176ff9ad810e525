"""Every pending ``wait()`` on one host, answered by few agent calls.

A ``wait()`` used to be one ``follow`` per run: one SSH channel (or
connection) and one polling Python process on the host each.  With many
runs waited at once, the calls queued behind the server's MaxSessions and
the host's CPU, and ends reached their waiters seconds late.  Here each
host has one :class:`HostWatcher`: the runs waited on it are watched by the
agent's ``watch`` command (one call for many runs, no polling there while
nothing happens), at most :attr:`HostWatcher.MAX_CALLS` calls at a time.
A new ``wait()`` joins a call started for it and any others of the same
turn of the event loop; past the limit, the oldest call is replaced by one
that covers its runs and the new ones.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Dict, List, Optional, Set

from .client import AgentClient
from .errors import AgentFailed, ChaperoneError, ConnectionLost, NoSuchRun
from .protocol import End, RunError, StateUpdate
from .transports.base import Transport

Reconnect = Optional[Callable[[Exception, float], None]]


class _Waiter:
    __slots__ = ("future", "on_reconnect", "give_up", "reconnect_for")

    def __init__(self, future: "asyncio.Future[dict]", on_reconnect: Reconnect, reconnect_for: float):
        self.future = future
        self.on_reconnect = on_reconnect
        self.reconnect_for = reconnect_for
        self.give_up: Optional[float] = None


class HostWatcher:
    """The final states of runs on one host, for whoever waits for them.
    ``on_final(run_id, state)`` is called once per run answered (the
    records)."""

    #: Watch calls to one host at once (each is one SSH channel).
    MAX_CALLS = 2
    #: Run ids in one call (the agent takes up to 65536).
    MAX_IDS = 4096

    def __init__(self, transport: Transport, on_final: Optional[Callable[[str, dict], None]] = None):
        self.client = AgentClient(transport)
        self.on_final = on_final
        self.waiters: Dict[str, List[_Waiter]] = {}
        self.pending: Set[str] = set()  # waited, in no call yet
        self.calls: Dict["asyncio.Task[None]", Set[str]] = {}  # oldest first
        self._kick: Optional[asyncio.Handle] = None

    async def wait(self, run_id: str, *, on_reconnect: Reconnect = None, reconnect_for: float = 3600.0) -> dict:
        """The run's final state (a dict), once the agent saw it final.
        Raises :class:`NoSuchRun` if the host does not know the run, the
        agent's error if it cannot read it, and what the connection
        raised once reconnecting failed for ``reconnect_for`` seconds."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), on_reconnect, reconnect_for)
        self.waiters.setdefault(run_id, []).append(waiter)
        if not any(run_id in ids for ids in self.calls.values()):
            self.pending.add(run_id)
            if self._kick is None:
                self._kick = loop.call_soon(self._launch)
        try:
            return await waiter.future
        finally:
            self._drop(run_id, waiter)

    def close(self, error: BaseException) -> None:
        """Stop: the calls end, every waiter gets ``error``."""
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        for task in list(self.calls):
            task.cancel()
        self.calls.clear()
        self.pending.clear()
        for run_id in list(self.waiters):
            self._fail(run_id, error)

    def _drop(self, run_id: str, waiter: _Waiter) -> None:
        waiters = self.waiters.get(run_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self.waiters[run_id]
        for task, ids in list(self.calls.items()):
            if not any(i in self.waiters for i in ids):
                task.cancel()  # nobody waits for any of its runs any more

    def _launch(self) -> None:
        self._kick = None
        wanted = {i for i in self.pending if i in self.waiters}
        self.pending.clear()
        if not wanted:
            return
        if len(self.calls) >= self.MAX_CALLS:
            # Replace the oldest call by one for its runs and the new ones.
            task, ids = next(iter(self.calls.items()))
            del self.calls[task]
            task.cancel()
            wanted |= {i for i in ids if i in self.waiters}
        ordered = sorted(wanted)
        for at in range(0, len(ordered), self.MAX_IDS):
            ids = set(ordered[at:at + self.MAX_IDS])
            task = asyncio.ensure_future(self._call(ids))
            self.calls[task] = ids
            task.add_done_callback(self._finished)

    def _finished(self, task: "asyncio.Task[None]") -> None:
        self.calls.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            # (a bug here must not leave waiters hanging)
            error = task.exception()
            for run_id in list(self.waiters):
                if not any(run_id in ids for ids in self.calls.values()):
                    self._fail(run_id, error)

    def _answer(self, run_id: str, state: dict) -> None:
        if self.on_final is not None:
            self.on_final(run_id, state)
        for waiter in self.waiters.get(run_id, []):
            if not waiter.future.done():
                waiter.future.set_result(state)

    def _fail(self, run_id: str, error: BaseException) -> None:
        for waiter in self.waiters.get(run_id, []):
            if not waiter.future.done():
                waiter.future.set_exception(error)

    async def _call(self, ids: Set[str]) -> None:
        """Watch ``ids`` until each is answered; reconnect when the
        connection breaks (each waiter gives up after its reconnect_for)."""
        loop = asyncio.get_running_loop()
        remaining = ids  # (the set self.calls holds: what this call still answers)
        delay = 0.25
        while remaining:
            began = loop.time()
            try:
                events = self.client.watch(sorted(remaining))
                try:
                    async for event in events:
                        if isinstance(event, StateUpdate):
                            run_id = event.state.get("id")
                            if run_id in remaining:
                                remaining.discard(run_id)
                                if not remaining:
                                    # (the last answer: the channel is given
                                    # back before wait() returns)
                                    await events.aclose()
                                self._answer(run_id, event.state)
                        elif isinstance(event, RunError):
                            remaining.discard(event.run_id)
                            error: ChaperoneError = NoSuchRun(event.error) if event.code == 4 \
                                else AgentFailed(event.error, event.code)
                            self._fail(event.run_id, error)
                        elif isinstance(event, End):
                            break
                finally:
                    await events.aclose()  # frees the channel now
                if remaining:
                    raise ChaperoneError("the agent on %s ended its watch without an answer for %s"
                                         % (self.client.transport.host, ", ".join(sorted(remaining))))
            except ChaperoneError as e:
                if not (isinstance(e, ConnectionLost) or getattr(e, "transient", False)):
                    for run_id in remaining:
                        self._fail(run_id, e)
                    return
                now = loop.time()
                up = now - began > 1.0  # (it was connected: the outage starts now)
                if up:
                    delay = 0.25
                for run_id in list(remaining):
                    for waiter in self.waiters.get(run_id, []):
                        if waiter.future.done():
                            continue
                        if waiter.give_up is None or up:
                            waiter.give_up = now + waiter.reconnect_for
                        if now + delay > waiter.give_up:
                            waiter.future.set_exception(e)
                        elif waiter.on_reconnect is not None:
                            waiter.on_reconnect(e, delay)
                for run_id in list(remaining):
                    if not any(not w.future.done() for w in self.waiters.get(run_id, [])):
                        remaining.discard(run_id)
                if not remaining:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
