"""The adapter: every call `chaperone serve` makes into the library.

Nothing else in :mod:`chaperone.serve` imports :mod:`chaperone.scheduler`
or :mod:`chaperone.api`'s ``Chaperone``; re-point this module and the server
follows.  What it uses today (``Scheduler``'s push updates, mirror and
reattach; ``Chaperone``'s records and agent calls) and what it had to reach
into (marked *private* below) is what the one library API should offer.

:class:`Runs` methods:

* ``open()``, ``close()``: the callback endpoint (HTTPS) up / down.
* reading, local files only: ``ids()``, ``records()``, ``record(id)``,
  ``state(id)``, ``held(id, stream)``, ``read(id, stream, offset, length)``,
  ``counts()``, ``watching(id)``, ``ssh_connections()``.
* acting: ``start(...)``, ``signal(id, sig, grace)``, ``clean(id, force)``,
  ``wait(id)`` (final state, all output held, agent released),
  ``attach(id)`` / ``attach_all()`` (re-attach after a restart: callbacks
  re-pointed, catch-up from the spool), ``catch_up(id)`` (poll the spool),
  ``mark_lost(id, why)``.
* subscriptions (constructor arguments): ``on_change(id)`` after any new
  state or output of a run; ``on_callback(id, kind, status)`` for every
  callback request answered; ``on_catch_up(id, ok)`` for every catch-up.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from aiohttp import web

from ..callback import CallbackServer
from ..errors import ChaperoneError, NoSuchRun, UsageError
from ..models import FINAL_STATES, STREAMS, check_run_id
from ..scheduler import Scheduler

class Conflict(UsageError):
    """The run id is taken (by another run, or by a start in progress)."""


#: Agent calls at once per host while re-attaching.
ATTACH_CONCURRENCY = 8


class _CountingCallbackServer(CallbackServer):
    """The Scheduler's callback endpoint, telling who called and how it was
    answered (metrics, and when each agent was last heard from)."""

    def __init__(self, max_body: int, on_request: Callable[[Optional[str], str, int], None]):
        super().__init__(max_body=max_body)
        self._on_request = on_request

    @web.middleware
    async def _middleware(self, request, handler):
        response = await CallbackServer._middleware(self, request, handler)
        path = request.path
        kind = ("state" if path.endswith("/state") else "completed" if path.endswith("/completed")
                else "output" if "/output/" in path else "other")
        try:
            self._on_request(request.match_info.get("id"), kind, response.status)
        except Exception:  # (a hook must never fail a callback)
            pass
        return response


class _Scheduler(Scheduler):
    def __init__(self, *args, runs: "Runs", **kw):
        super().__init__(*args, **kw)
        self._runs = runs
        self.server = _CountingCallbackServer(self.server.max_body, runs._callback)

    def _wake(self, run_id: str) -> None:  # private: every new state or output passes here
        super()._wake(run_id)
        self._runs.on_change(run_id)

    async def catch_up(self, run_id: str) -> dict:
        try:
            state = await super().catch_up(run_id)
        except BaseException:
            self._runs.on_catch_up(run_id, False)
            raise
        self._runs.on_catch_up(run_id, True)
        return state


class Runs:
    def __init__(self, home=None, *, ssh_config: Sequence[str] = (), heartbeat: Optional[float] = None,
                 callback_bind: str = "127.0.0.1", callback_port: int = 0,
                 on_change: Callable[[str], None] = lambda run_id: None,
                 on_callback: Callable[[Optional[str], str, int], None] = lambda run_id, kind, status: None,
                 on_catch_up: Callable[[str, bool], None] = lambda run_id, ok: None):
        self.on_change = on_change
        self.on_callback = on_callback
        self.on_catch_up = on_catch_up
        self._s = _Scheduler(home, ssh_config=ssh_config, heartbeat=heartbeat, bind=callback_bind,
                             port=callback_port, runs=self)
        self.home: Path = self._s.ch.home
        self._starting: set = set()

    def _callback(self, run_id, kind, status) -> None:
        self.on_callback(run_id, kind, status)

    async def open(self) -> None:
        await self._s.open()

    async def close(self) -> None:
        await self._s.close()

    @property
    def callback_url(self) -> str:
        return self._s.server.url

    # Reading (local files only) -----------------------------------------------

    @property
    def _records(self):
        return self._s.ch.records

    def ids(self) -> Dict[str, str]:
        """Every recorded run's id and recorded state (one query)."""
        return dict(self._records.db.execute("SELECT id, state FROM runs"))  # private: no such Records call

    def records(self) -> list:
        return list(self._records.all())

    def record(self, run_id: str):
        """The run's record, or None (also for an invalid id)."""
        try:
            check_run_id(run_id)
        except ValueError:
            return None
        return self._records.get(run_id)

    def state(self, run_id: str) -> Optional[dict]:
        """The latest state known: pushed or caught up here, else the record's."""
        st = self._s.state(run_id)
        if st is not None:
            return st
        rec = self.record(run_id)
        return rec.last if rec is not None else None

    def counts(self) -> List[Tuple[str, str, int]]:
        """(host, state, number of runs) for every recorded run."""
        return self._records.db.execute("SELECT host, state, count(*) FROM runs GROUP BY host, state").fetchall()

    def _mirror_path(self, run_id: str, stream: str) -> Path:
        if stream not in STREAMS:
            raise ValueError("unknown stream %r" % stream)
        check_run_id(run_id)
        return self.home / "mirror" / run_id / stream

    def held(self, run_id: str, stream: str) -> int:
        """Bytes of ``stream`` held in the mirror (what the server can serve)."""
        try:
            return os.stat(self._mirror_path(run_id, stream)).st_size
        except FileNotFoundError:
            return 0

    def read(self, run_id: str, stream: str, offset: int, length: int) -> bytes:
        try:
            with open(self._mirror_path(run_id, stream), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            return b""

    def watching(self, run_id: str) -> bool:
        """Whether callbacks of this run come here (started or re-attached)."""
        return run_id in self._s._hosts  # private

    def ssh_connections(self) -> int:
        """SSH connections open now (calls and callback tunnels)."""
        seen, n = set(), 0
        transports = list(self._s.ch._transports.values()) + list(self._s._hosts.values())  # private
        for t in transports:
            if id(t) in seen:
                continue
            seen.add(id(t))
            conns = getattr(t, "_conns", None)  # asyncssh: its connections
            if conns is not None:
                n += sum(1 for c in conns if not c.closed)
            master = getattr(t, "_master", None)  # OpenSSH: its control master
            if master is not None and master.alive():
                n += 1
        for tunnel in self._s._tunnels.values():
            t = tunnel["tunnel"]
            if type(t).__name__ == "_MasterTunnel" and not t.closed():  # a master of its own
                n += 1
        return n

    # Acting ---------------------------------------------------------------------

    def validate(self, argv: Sequence[str], *, run_id: Optional[str] = None, env: Optional[dict] = None,
                 cwd: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Check a program as a start would, changing nothing
        (:class:`UsageError` saying what is wrong)."""
        self._s.ch.program_spec(argv, run_id=run_id, env=env, cwd=cwd, timeout=timeout, config=self._s.config)

    async def start(self, host: str, argv: Optional[Sequence[str]] = None, *, command: Optional[str] = None,
                    run_id: Optional[str] = None, env: Optional[dict] = None, cwd: Optional[str] = None,
                    timeout: Optional[float] = None, spool: Optional[str] = None) -> Tuple[str, bool]:
        """Start a run; (its id, whether it is new).  The same id with the
        same host and command is the same run (not started again); with
        another one, :class:`UsageError`."""
        if run_id is not None:
            shown = ["/bin/sh", "-c", command] if command is not None else list(argv or ())
            rec = self.record(run_id)
            if rec is not None:
                if rec.host != host or rec.argv != shown:
                    raise Conflict("run id %s is already used by another run" % run_id)
                return run_id, False
            if run_id in self._starting:
                raise Conflict("run id %s is being started by another request" % run_id)
            self._starting.add(run_id)
        else:
            from ..api import new_run_id

            run_id = new_run_id()
        try:
            # (Scheduler.start on an existing id would give the running
            # agent's callbacks a token it does not know: never called so.)
            await self._s.start(host, argv, command=command, run_id=run_id, env=env, cwd=cwd, timeout=timeout,
                                ssh={"root": spool} if spool else None)
        finally:
            self._starting.discard(run_id)
        return run_id, True

    async def signal(self, run_id: str, sig: str, grace: Optional[float] = None) -> dict:
        return await self._s.signal(run_id, sig, grace)

    async def clean(self, run_id: str, force: bool = False) -> None:
        await self._s.clean(run_id, force)

    async def wait(self, run_id: str, safety_net: float = 3600.0) -> dict:
        """The final state once every byte is held (then the agent is told
        to stop calling back)."""
        return await self._s.wait(run_id, safety_net=safety_net)

    async def catch_up(self, run_id: str) -> dict:
        return await self._s.catch_up(run_id)

    async def attach(self, run_id: str) -> dict:
        """Take back one unfinished run (what ``Scheduler.reattach`` does for
        each, but for one run: an unreachable host fails only its runs)."""
        s = self._s
        rec = s.ch.record(run_id)
        if rec.id not in s._hosts:  # private
            transport = s.ch._transport_for(rec)  # private
            s._hosts[rec.id] = transport
            if rec.last and rec.id not in s._states:
                s._states[rec.id] = rec.last
        try:
            await s._rewire(rec.id, s._hosts[rec.id])  # private
        except ChaperoneError:
            pass  # not running any more, or not reachable yet: catch_up says which
        return await s.catch_up(rec.id)

    def forget(self, run_id: str) -> None:
        """Stop watching a run whose attach failed, so that a later attach
        starts from scratch."""
        self._s._hosts.pop(run_id, None)  # private

    async def attach_all(self) -> Dict[str, Optional[BaseException]]:
        """Re-attach every unfinished recorded run, several at a time per
        host; {id: None, or the error that run's attach ended with}."""
        by_host: Dict[str, List[str]] = {}
        for rec in self._records.all():
            if rec.state not in FINAL_STATES and rec.state != "failed" and not self.watching(rec.id):
                by_host.setdefault(rec.host, []).append(rec.id)
        results: Dict[str, Optional[BaseException]] = {}

        async def one(sem, run_id):
            async with sem:
                try:
                    await self.attach(run_id)
                    results[run_id] = None
                except (ChaperoneError, OSError) as e:
                    results[run_id] = e

        await asyncio.gather(*(one(sem, rid) for ids in by_host.values()
                               for sem in [asyncio.Semaphore(ATTACH_CONCURRENCY)] for rid in ids))
        return results

    def mark_lost(self, run_id: str, why: str) -> None:
        self._records.mark(run_id, "lost", why)
        self.on_change(run_id)


__all__ = ["Runs", "Conflict", "NoSuchRun", "UsageError", "ChaperoneError"]
