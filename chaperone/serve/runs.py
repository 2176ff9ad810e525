"""The adapter: every call `chaperone serve` makes into the library.

Nothing else in :mod:`chaperone.serve` imports :mod:`chaperone.api`; the
server is a ``Chaperone(push=True)`` (the agents call back here), its
records, and the hooks the push side offers (``on_change``,
``on_catch_up``, the endpoint's ``on_request``).

:class:`Runs` methods:

* ``open()``, ``close()``: the callback endpoint (HTTPS) up / down.
* reading, local files only: ``ids()``, ``records()``, ``record(id)``,
  ``state(id)``, ``held(id, stream)``, ``read(id, stream, offset, length)``,
  ``counts()``, ``watching(id)``, ``ssh_connections()``.
* acting: ``start(...)``, ``signal(id, sig, grace)``, ``clean(id, force)``,
  ``wait(id)`` (final state, all output held, agent released),
  ``attach(id)`` / ``attach_all()`` (re-attach after a restart: callbacks
  re-pointed, catch-up from the spool), ``catch_up(id)`` (poll the spool),
  ``not_on_host(id)``.
* subscriptions (constructor arguments): ``on_change(id)`` after any new
  state or output of a run; ``on_callback(id, kind, status)`` for every
  callback request answered; ``on_catch_up(id, ok)`` for every catch-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..api import Chaperone
from ..errors import ChaperoneError, NoSuchRun, UsageError
from ..models import FINAL_STATES, STREAMS, check_run_id
from ..errors import Conflict  # noqa: F401 (defined there; exported here too)

log = logging.getLogger("chaperone.serve")


ATTACH_CONCURRENCY = 8


class Runs:
    def __init__(self, home=None, *, ssh_config: Sequence[str] = (), heartbeat: Optional[float] = None,
                 callback_bind: str = "127.0.0.1", callback_port: int = 0,
                 on_change: Callable[[str], None] = lambda run_id: None,
                 on_callback: Callable[[Optional[str], str, int], None] = lambda run_id, kind, status: None,
                 on_catch_up: Callable[[str, bool], None] = lambda run_id, ok: None):
        self.on_change = on_change
        self.on_callback = on_callback
        self.on_catch_up = on_catch_up
        self.ch = Chaperone(home, push=True, ssh_config=ssh_config or None, heartbeat=heartbeat,
                            bind=callback_bind, port=callback_port)
        self.push = self.ch.push
        self.push.on_change.append(lambda run_id: self.on_change(run_id))
        self.push.on_catch_up.append(lambda run_id, ok: self.on_catch_up(run_id, ok))
        self.push.server.on_request = lambda run_id, kind, status: self.on_callback(run_id, kind, status)
        self.home: Path = self.ch.home
        self._starting: set = set()

    async def open(self) -> None:
        await self.ch.open()

    async def close(self) -> None:
        await self.ch.close()

    @property
    def callback_url(self) -> str:
        return self.push.server.url

    # Reading (local files only) -----------------------------------------------

    @property
    def _records(self):
        return self.ch.records

    def ids(self) -> Dict[str, str]:
        """Every recorded run's id and recorded state (one query)."""
        return self._records.states()

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
        st = self.push.states.get(run_id)
        if st is not None:
            return st
        rec = self.record(run_id)
        return rec.last if rec is not None else None

    def counts(self) -> List[Tuple[str, str, int]]:
        """(host, state, number of runs) for every recorded run."""
        return self._records.counts()

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
        return self.push.knows(run_id)

    def ssh_connections(self) -> int:
        """SSH connections open now (calls and callback tunnels)."""
        return self.ch.transports.connections() + self.push.tunnels_open()

    # Acting ---------------------------------------------------------------------

    def validate(self, argv: Sequence[str], *, run_id: Optional[str] = None, env: Optional[dict] = None,
                 cwd: Optional[str] = None, timeout: Optional[float] = None) -> None:
        """Check a program as a start would, changing nothing
        (:class:`UsageError` saying what is wrong)."""
        self.ch.program_spec(argv, run_id=run_id, env=env, cwd=cwd, timeout=timeout)

    async def start(self, host: str, argv: Optional[Sequence[str]] = None, *, command: Optional[str] = None,
                    run_id: Optional[str] = None, env: Optional[dict] = None, cwd: Optional[str] = None,
                    timeout: Optional[float] = None, spool: Optional[str] = None) -> Tuple[str, bool]:
        """Start a run; (its id, whether it is new).  The same id with the
        same host and command is the same run (not started again); with
        another one, :class:`UsageError`."""
        what = command if command is not None else list(argv or ())
        if run_id is not None:
            shown = self.ch._argv(what)[0]
            rec = self.record(run_id)
            if rec is not None:
                if rec.host != self.ch.target(host).name or rec.argv != shown:
                    raise Conflict("run id %s is already used by another run" % run_id)
                return run_id, False
            if run_id in self._starting:
                raise Conflict("run id %s is being started by another request" % run_id)
            self._starting.add(run_id)
        else:
            from ..api import new_run_id

            run_id = new_run_id()
        try:
            await self.ch.start(host, what, id=run_id, env=env, cwd=cwd, timeout=timeout,
                                ssh={"spool": spool} if spool else None)
        finally:
            self._starting.discard(run_id)
        return run_id, True

    async def signal(self, run_id: str, sig: str, grace: Optional[float] = None) -> dict:
        return (await self.ch.signal(run_id, sig, grace)).model_dump()

    async def clean(self, run_id: str, force: bool = False) -> None:
        await self.ch.clean(run_id, force)

    async def wait(self, run_id: str, safety_net: float = 3600.0) -> dict:
        """The final state once every byte is held (then the agent is told
        to stop calling back)."""
        return await self.push.wait(run_id, safety_net=safety_net)

    async def catch_up(self, run_id: str) -> dict:
        return await self.push.catch_up(run_id)

    async def attach(self, run_id: str) -> dict:
        """Take back one unfinished run (callbacks re-pointed, catch-up from
        its spool): an unreachable host fails only its runs."""
        rec = self.ch.record(run_id)
        await self.push.adopt(rec.id, rec.last)
        return self.push.states.get(rec.id) or {}

    def forget(self, run_id: str) -> None:
        """Stop watching a run whose attach failed, so that a later attach
        starts from scratch."""
        self.push.drop(run_id)

    async def attach_all(self) -> Dict[str, Optional[BaseException]]:
        """Re-attach every unfinished recorded run, several at a time per
        host; {id: None, or the error that run's attach ended with}."""
        by_host: Dict[str, List[str]] = {}
        for rec in self._records.all():
            if rec.state not in FINAL_STATES and not self.watching(rec.id):
                by_host.setdefault(rec.host, []).append(rec.id)
        results: Dict[str, Optional[BaseException]] = {}

        async def one(sem, run_id):
            async with sem:
                try:
                    await self.attach(run_id)
                    results[run_id] = None
                except (ChaperoneError, OSError) as e:
                    results[run_id] = e
                except Exception as e:  # (a bug: that run's, not every other run's)
                    log.exception("re-attaching run %s", run_id)
                    results[run_id] = e

        await asyncio.gather(*(one(sem, rid) for ids in by_host.values()
                               for sem in [asyncio.Semaphore(ATTACH_CONCURRENCY)] for rid in ids))
        return results

    def not_on_host(self, run_id: str) -> bool:
        """Its host does not have the run: as the library decides it (a
        start that may still be on its way stays ``starting``; one that
        never reached the host is ``failed``; a run whose spool went is
        ``lost``).  False while it may still be on its way."""
        from ..errors import StartPending

        rec = self._records.get(run_id)
        if rec is None:
            return True
        pending = isinstance(self.ch._gone(rec), StartPending)
        self.on_change(run_id)
        return not pending


__all__ = ["Runs", "Conflict", "NoSuchRun", "UsageError", "ChaperoneError"]
