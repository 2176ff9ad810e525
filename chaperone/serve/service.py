"""What `chaperone serve` does besides HTTP: it watches every run, numbers
the changes of the run list, tells when a host went silent and polls its
spool then, and counts for ``/metrics``.

All library calls go through :class:`chaperone.serve.runs.Runs`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import ChaperoneError, NoSuchRun
from .events import EventBus
from .metrics import Metrics
from .runs import Runs
from .view import FINAL, run_view

log = logging.getLogger("chaperone.serve")

STREAMS = ("stdout", "stderr")
#: Seconds between two looks at the run list in SQLite (runs started or
#: cleaned by other processes).
SYNC_INTERVAL = 2.0
#: Calls at once per host when polling its spool.
POLL_CONCURRENCY = 8


class Service:
    def __init__(self, home=None, *, ssh_config: Sequence[str] = (), heartbeat: float = 10.0,
                 callback_bind: str = "127.0.0.1", callback_port: int = 0, flush_interval: float = 0.1,
                 tick: float = 0.5):
        if not heartbeat > 0:
            raise ValueError("heartbeat must be > 0")
        self.heartbeat = float(heartbeat)
        #: No news from a run's agent for this long: poll its spool over SSH.
        self.poll_after = 2 * self.heartbeat + 2
        #: ... and for this long: its host is silent (a badge, not a state).
        self.silent_after = 3 * self.heartbeat + 2
        #: After a failed poll, the host's next one.
        self.poll_retry = min(max(2 * self.heartbeat, 2.0), 30.0)
        self.flush_interval = flush_interval
        self.tick = tick
        self.metrics = Metrics()
        self.runs = Runs(home, ssh_config=ssh_config, heartbeat=self.heartbeat, callback_bind=callback_bind,
                         callback_port=callback_port, on_change=self._on_change, on_callback=self._on_callback,
                         on_catch_up=self._on_catch_up)
        self.bus: Optional[EventBus] = None
        self.started = time.time()
        self.heard: Dict[str, float] = {}  # run -> when its agent was last heard from
        self._since: Dict[str, float] = {}  # run -> since when this server watches it
        self._open: Dict[str, str] = {}  # unfinished run -> host
        self.silent: Set[str] = set()
        self._known: Dict[str, str] = {}  # run -> recorded state at the last sync
        self._emitted: Dict[str, dict] = {}  # run -> the view last published (without its duration)
        self._final_views: Dict[str, dict] = {}
        self._dirty: Set[str] = set()
        self._events: Dict[str, asyncio.Event] = {}
        self._held: Dict[Tuple[str, str], int] = {}
        self._finishers: Dict[str, asyncio.Task] = {}
        self._polls: Dict[str, asyncio.Task] = {}
        self._next_poll: Dict[str, float] = {}
        self._fetching: Dict[str, asyncio.Task] = {}
        self._fetch_after: Dict[str, float] = {}
        self._gone: Set[str] = set()  # ended, and its spool is gone: what is held is all there is
        self._tasks: List[asyncio.Task] = []
        self.attached: Optional[asyncio.Event] = None
        self.clients = 0

    # Life -------------------------------------------------------------------------

    async def open(self) -> None:
        self.bus = EventBus()
        self.attached = asyncio.Event()
        self.metrics.live(counts=self.runs.counts, silent=self._silent_counts, ssh=self.runs.ssh_connections,
                          clients=lambda: self.clients)
        await self.runs.open()
        self._sync(initial=True)
        self._tasks = [asyncio.ensure_future(self._attach_all()), asyncio.ensure_future(self._flush_loop()),
                       asyncio.ensure_future(self._monitor_loop())]

    async def close(self) -> None:
        tasks = self._tasks + list(self._finishers.values()) + list(self._polls.values()) + \
            list(self._fetching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.runs.close()

    async def _attach_all(self) -> None:
        """After a (re)start: every unfinished run comes back under watch."""
        now = time.time()
        for rid in list(self._open):
            for s in STREAMS:
                self._held[(rid, s)] = self.runs.held(rid, s)
        results = await self.runs.attach_all()
        for rid, error in results.items():
            if error is None:
                self.heard[rid] = time.time()
                self._finisher(rid)
            elif isinstance(error, NoSuchRun):
                if not self.runs.not_on_host(rid):  # (its start may be on its way: the poll looks again)
                    self.runs.forget(rid)
            else:
                self.runs.forget(rid)  # the poll of a silent host tries again
                log.warning("re-attaching run %s failed: %s", rid, error)
            self._mark(rid)
        log.info("re-attached %d of %d unfinished runs in %.1f s",
                 sum(1 for e in results.values() if e is None), len(results), time.time() - now)
        self.attached.set()

    def _finisher(self, rid: str) -> None:
        if rid in self._finishers:
            return

        async def finish():
            try:
                await self.runs.wait(rid)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("run %s: waiting for its end failed: %s", rid, e)
            finally:
                self._finishers.pop(rid, None)
                self._mark(rid)

        self._finishers[rid] = asyncio.ensure_future(finish())

    # Changes ------------------------------------------------------------------------

    def event(self, rid: str) -> asyncio.Event:
        """Set at the run's next change (take it before looking)."""
        ev = self._events.get(rid)
        if ev is None:
            ev = self._events[rid] = asyncio.Event()
        return ev

    def _mark(self, rid: str) -> None:
        self._dirty.add(rid)
        self._final_views.pop(rid, None)
        ev = self._events.pop(rid, None)
        if ev is not None:
            ev.set()

    def _on_change(self, rid: str) -> None:
        for s in STREAMS:
            held = self.runs.held(rid, s)
            before = self._held.get((rid, s), 0)
            if held > before:
                self.metrics.output_bytes.labels(s).inc(held - before)
            self._held[(rid, s)] = held
        self._mark(rid)

    def _on_callback(self, rid: Optional[str], kind: str, status: int) -> None:
        self.metrics.callbacks.labels(kind, str(status)).inc()
        if status >= 400 and status != 409:  # 409: an offset gap, answered with what is held
            self.metrics.callbacks_rejected.labels(str(status)).inc()
            return
        if rid is not None:
            self.heard[rid] = time.time()
            self._mark(rid)

    def _on_catch_up(self, rid: str, ok: bool) -> None:
        self.metrics.catch_ups.labels("ok" if ok else "failed").inc()

    # Views ----------------------------------------------------------------------------

    def view(self, rid: str, record=None, now: Optional[float] = None) -> Optional[dict]:
        cached = self._final_views.get(rid)
        if cached is not None:
            return cached
        rec = record if record is not None else self.runs.record(rid)
        if rec is None:
            return None
        now = time.time() if now is None else now
        v = run_view(rec, self.runs.state(rid), held={s: self.runs.held(rid, s) for s in STREAMS},
                     last_heard=self.heard.get(rid), silent=rid in self.silent, now=now)
        if v["state"] in FINAL and rid not in self._open:
            self._final_views[rid] = v
        return v

    def views(self, hosts: Sequence[str] = (), states: Sequence[str] = ()) -> List[dict]:
        now = time.time()
        out = []
        for rec in self.runs.records():
            if hosts and rec.host not in hosts:
                continue
            v = self.view(rec.id, rec, now)
            if states and v["state"] not in states:
                continue
            out.append(v)
        return out

    def final(self, rid: str) -> bool:
        v = self.view(rid)
        return v is not None and v["state"] in FINAL

    def stream_end(self, rid: str, stream: str) -> Optional[int]:
        """The size of ``stream`` once the run ended (None while it runs)."""
        v = self.view(rid)
        if v is None or v["state"] not in FINAL:
            return None
        held = self.runs.held(rid, stream)
        if rid in self._gone:
            return held
        st = self.runs.state(rid) or {}
        return int(st.get(stream + "_bytes") or 0)

    def complete(self, rid: str) -> bool:
        """Ended, and every byte of its output is here."""
        for s in STREAMS:
            end = self.stream_end(rid, s)
            if end is None or self.runs.held(rid, s) < end:
                return False
        return True

    def fetch(self, rid: str) -> None:
        """An ended run whose output is not all here (its end came by a
        path that did not bring all of it, or it ran before this server):
        catch up from its spool, in the background."""
        if rid in self._fetching or rid in self._gone or time.time() < self._fetch_after.get(rid, 0):
            return

        async def go():
            try:
                await self.runs.catch_up(rid)
            except NoSuchRun:
                self._gone.add(rid)
            except (ChaperoneError, OSError) as e:
                log.info("run %s: catching up its output failed: %s", rid, e)
                self._fetch_after[rid] = time.time() + self.poll_retry
            finally:
                self._fetching.pop(rid, None)
                self._mark(rid)

        self._fetching[rid] = asyncio.ensure_future(go())

    def _silent_counts(self):
        counts: Dict[str, int] = {}
        for rid in self.silent:
            host = self._open.get(rid)
            if host is not None:
                counts[host] = counts.get(host, 0) + 1
        return sorted(counts.items())

    # Acting -----------------------------------------------------------------------------

    async def start(self, host: str, argv=None, *, command=None, run_id=None, env=None, cwd=None,
                    timeout=None, spool=None) -> Tuple[dict, bool]:
        rid, new = await self.runs.start(host, argv, command=command, run_id=run_id, env=env, cwd=cwd,
                                         timeout=timeout, spool=spool)
        # (a start that failed is recorded "failed": the next sync shows it)
        if new:
            now = time.time()
            self._known.setdefault(rid, "starting")
            self._open[rid] = host
            self._since[rid] = now
            self.heard[rid] = now
            self._finisher(rid)
        self._mark(rid)
        return self.view(rid), new

    async def signal(self, rid: str, sig: str, grace: Optional[float]) -> dict:
        await self.runs.signal(rid, sig, grace)
        self._mark(rid)
        return self.view(rid)

    async def clean(self, rid: str, force: bool) -> None:
        task = self._finishers.pop(rid, None)
        try:
            await self.runs.clean(rid, force)
        finally:
            if self.runs.record(rid) is None:
                if task is not None:
                    task.cancel()
                self._forget(rid)
            elif task is not None:
                self._finishers[rid] = task
            self._mark(rid)

    def _forget(self, rid: str) -> None:
        task = self._finishers.pop(rid, None)
        if task is not None:
            task.cancel()
        for d in (self.heard, self._since, self._open, self._known, self._fetch_after):
            d.pop(rid, None)
        self.silent.discard(rid)
        self._gone.discard(rid)
        for s in STREAMS:
            self._held.pop((rid, s), None)

    async def wait(self, rid: str, timeout: float) -> Optional[dict]:
        """The run's view once it ended with all its output here, or after
        ``timeout`` seconds as it is then; None if there is no such run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ev = self.event(rid)
            v = self.view(rid)
            if v is None:
                return None
            if v["state"] in FINAL:
                if self.complete(rid):
                    return v
                self.fetch(rid)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return v
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    # Loops ------------------------------------------------------------------------------

    def _sync(self, initial: bool = False) -> None:
        """Take in runs recorded or removed by other processes (``initial``:
        all of them, at start, without an event each: a client's snapshot
        has them)."""
        ids = self.runs.ids()
        now = time.time()
        for rid, state in ids.items():
            if self._known.get(rid) != state:
                self._known[rid] = state
                if not initial:
                    self._mark(rid)
                if state not in FINAL and rid not in self._open:
                    rec = self.runs.record(rid)
                    if rec is not None:
                        self._open[rid] = rec.host
                        self._since.setdefault(rid, now)
        for rid in [r for r in self._known if r not in ids]:
            self._forget(rid)
            self._mark(rid)

    async def _flush_loop(self) -> None:
        """Publish the changed runs, at most once per ``flush_interval``."""
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                self._flush()
            except Exception:
                log.exception("publishing changes failed")

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        now = time.time()
        for rid in sorted(dirty):
            v = self.view(rid, now=now)
            if v is None:
                self._emitted.pop(rid, None)
                self.bus.publish("removed", {"id": rid})  # (also for a run only ever in snapshots)
                continue
            key = dict(v, duration=None)
            if self._emitted.get(rid) != key:
                self._emitted[rid] = key
                self.bus.publish("run", {"run": v})

    async def _monitor_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            await asyncio.sleep(self.tick)
            try:
                if time.monotonic() - last_sync >= SYNC_INTERVAL:
                    last_sync = time.monotonic()
                    self._sync()
                self._watch()
            except Exception:
                log.exception("watching the runs failed")

    def _watch(self) -> None:
        """Silent hosts get their badge; their spools get polled."""
        now = time.time()
        due: Dict[str, List[str]] = {}
        for rid, host in list(self._open.items()):
            v = self.view(rid, now=now)
            if v is None or v["state"] in FINAL:
                self._open.pop(rid, None)
                if v is not None and v["state"] in ("lost", "failed") and rid in self._finishers:
                    self._finishers.pop(rid).cancel()  # (marked here: the scheduler would wait on)
                if rid in self.silent:
                    self.silent.discard(rid)
                self._mark(rid)
                continue
            quiet = now - self.heard.get(rid, self._since.get(rid, now))
            silent = quiet > self.silent_after
            if silent != (rid in self.silent):
                (self.silent.add if silent else self.silent.discard)(rid)
                self._mark(rid)
            if quiet > self.poll_after:
                due.setdefault(host, []).append(rid)
        for host, ids in due.items():
            if host in self._polls or now < self._next_poll.get(host, 0):
                continue
            self._polls[host] = asyncio.ensure_future(self._poll_host(host, ids))

    async def _poll_host(self, host: str, ids: List[str]) -> None:
        """Cylc's reconcile: read the spools of ``host``'s quiet runs; the
        first failure to reach the host stops this round."""
        sem = asyncio.Semaphore(POLL_CONCURRENCY)
        unreachable = []

        async def one(rid):
            async with sem:
                if unreachable:
                    return
                watching = self.runs.watching(rid)
                try:
                    if watching:
                        await self.runs.catch_up(rid)
                    else:
                        await self.runs.attach(rid)
                        self._finisher(rid)
                    self.heard[rid] = time.time()
                except NoSuchRun:
                    if not self.runs.not_on_host(rid) and not watching:
                        self.runs.forget(rid)  # (its start may be on its way: the next poll looks again)
                except (ChaperoneError, OSError) as e:
                    if not watching:
                        self.runs.forget(rid)  # the next poll re-attaches from scratch
                    unreachable.append(e)
                finally:
                    self._mark(rid)

        try:
            await asyncio.gather(*(one(rid) for rid in ids))
            if unreachable:
                log.info("host %s: polling failed: %s", host, unreachable[0])
                self._next_poll[host] = time.time() + self.poll_retry
        finally:
            self._polls.pop(host, None)
