"""Fan-out: one task per job over many hosts, bounded, results as they come.

Generic: a *job* is anything (a :class:`~.inventory.HostEntry`, a
``(host, argv)`` pair ...); a *task* is ``async def task(job)``; how a run
is started is the task's business.  Pure asyncio.

    async with Fanout(hosts, task, forks=32, per_host=8, timeout=60) as fan:
        async for result in fan:      # HostResult, in order of completion
            ...                       # leaving the block early cancels the rest
    # from a SIGINT handler: fan.interrupt()

Limits and their defaults:

* ``forks``: tasks at once overall (clush ``-f``, Ansible ``-f``, pssh
  ``-p``).  Default :func:`default_forks`: 64 (clush's fanout), less on a
  small machine (16 a core: a handshake costs the client a few ms of CPU,
  so past that many at once they only queue on the CPU and time out
  together), less if the open-file limit could not take 8 descriptors a
  task.
* ``per_host``: tasks at once on one host (the key :func:`host_key` gives:
  the job's ``hostname`` and ``port`` for a HostEntry).  Default
  :data:`DEFAULT_PER_HOST`, 8: OpenSSH's ``MaxStartups 10:30:100`` starts
  dropping unauthenticated connections past 10 at once, and ``MaxSessions
  10`` caps the channels of one connection; 8 leaves room for the user's
  own ssh.  Jobs for a busy host wait while jobs for other hosts start (no
  head-of-line blocking).
* ``timeout``: seconds per task (None: none, as clush).  A task over it is
  cancelled and its host's result says ``timeout``.
* ``buffer``: results finished but not yet taken by the consumer.  When it
  is full, nothing new starts (back-pressure: a slow consumer slows the
  fan-out instead of piling up results); tasks already running finish.
  Default: 16.

A task that raises fails only its own job (state ``failed``, ``reason`` a
line from the exception); nothing else stops.  :meth:`Fanout.interrupt`
(wire it to SIGINT): the first call stops starting jobs and calls
``on_interrupt(job)`` for every running one (forward a SIGINT to the
run); the second cancels every running task.  Jobs never started come out
as ``cancelled`` with reason ``not started: interrupted``, so every job
has exactly one result.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, Dict, Hashable, Iterable, Optional

__all__ = ["Fanout", "HostResult", "fanout", "default_forks", "host_key", "DEFAULT_PER_HOST", "DEFAULT_BUFFER",
           "HostFailure", "OK", "FAILED", "TIMEOUT", "CANCELLED"]

OK, FAILED, TIMEOUT, CANCELLED = "ok", "failed", "timeout", "cancelled"
DEFAULT_BUFFER = 16
# (default_forks and the defaults live in .limits: light, for the CLI's head start)
from .limits import DEFAULT_PER_HOST, MAX_DEFAULT_FORKS, default_forks  # noqa: E402,F401
from ..errors import HostFailure  # noqa: F401 (defined there; exported here too)


def host_key(job: Any) -> Hashable:
    """Which host a job runs on, for ``per_host``: (hostname, port) for a
    HostEntry-like job (one sshd, whatever the user), the first item of a
    tuple, else the job."""
    if hasattr(job, "hostname"):
        return (job.hostname, getattr(job, "port", None))
    if isinstance(job, tuple) and job:
        return host_key(job[0])
    return job


def _reason(exc: BaseException) -> str:
    """One line about an exception."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if isinstance(exc, HostFailure):
        return text or "failed"
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


@dataclass
class HostResult:
    """The outcome of one job: ``state`` is ok, failed, timeout or cancelled;
    ``value`` what the task returned (ok only); ``error`` the exception;
    ``reason`` one line for a summary (None when ok); times from the
    fan-out's clock (``started`` None: never started)."""

    job: Any
    state: str
    value: Any = None
    error: Optional[BaseException] = field(default=None, repr=False)
    reason: Optional[str] = None
    started: Optional[float] = None
    ended: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.state == OK

    @property
    def duration(self) -> Optional[float]:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


class Fanout:
    """See the module docstring.  Iterate it once (``async for``)."""

    def __init__(self, jobs: Iterable[Any], task: Callable[[Any], Awaitable[Any]], *,
                 forks: Optional[int] = None, per_host: Optional[int] = DEFAULT_PER_HOST,
                 timeout: Optional[float] = None, buffer: int = DEFAULT_BUFFER,
                 on_interrupt: Optional[Callable[[Any], Any]] = None,
                 key: Callable[[Any], Hashable] = host_key, clock: Callable[[], float] = time.monotonic) -> None:
        self.forks = forks if forks is not None else default_forks()
        if self.forks < 1:
            raise ValueError("forks must be 1 or more")
        if per_host is not None and per_host < 1:
            raise ValueError("per_host must be 1 or more (or None: no limit)")
        if buffer < 0:
            raise ValueError("buffer must be 0 or more")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None)")
        self.per_host = per_host
        self.timeout = timeout
        self.task = task
        self.on_interrupt = on_interrupt
        self.key = key
        self.clock = clock
        self._pending: Deque[Any] = deque(jobs)
        self.total = len(self._pending)
        self._buffer = buffer
        self._running: Dict[asyncio.Task, Any] = {}
        self._started_at: Dict[asyncio.Task, float] = {}
        self._busy: Dict[Hashable, int] = {}
        self._interrupts = 0
        self._iterated = False
        self._wake: Optional[asyncio.Event] = None
        #: Counts, for a progress line.
        self.done = 0
        self.failed = 0

    # -- control ---------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def interrupt(self) -> int:
        """First call: start nothing more and call ``on_interrupt(job)`` for
        every running job; second: cancel every running task.  Returns how
        many times it was called."""
        self._interrupts += 1
        if self._interrupts == 1:
            for t, job in list(self._running.items()):
                if self.on_interrupt is not None and not t.done():
                    try:
                        res = self.on_interrupt(job)
                        if inspect.isawaitable(res):
                            asyncio.ensure_future(res)
                    except Exception:  # a failed forward must not stop the others
                        pass
        else:
            for t in list(self._running):
                t.cancel()
        if self._wake is not None:
            self._wake.set()
        return self._interrupts

    # -- iteration ---------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[HostResult]:
        if self._iterated:
            raise RuntimeError("a Fanout is iterated once")
        self._iterated = True
        self._gen = self._run()
        return self._gen

    async def aclose(self) -> None:
        """Cancel whatever still runs and wait for it (what leaving
        ``async with`` does; a ``break`` out of ``async for`` alone leaves
        the clean-up to the garbage collector, as for any async generator)."""
        gen = getattr(self, "_gen", None)
        if gen is not None:
            await gen.aclose()
        left = list(self._running)
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    async def __aenter__(self) -> "Fanout":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _startable(self) -> Optional[int]:
        """Index in the pending queue of the first job whose host has room."""
        if self.per_host is None:
            return 0 if self._pending else None
        for i, job in enumerate(self._pending):
            if self._busy.get(self.key(job), 0) < self.per_host:
                return i
        return None

    async def _call(self, job: Any) -> Any:
        if self.timeout is None:
            return await self.task(job)
        return await asyncio.wait_for(self.task(job), self.timeout)

    def _start_some(self) -> None:
        while self._interrupts == 0 and len(self._running) < self.forks and self._pending:
            i = self._startable()
            if i is None:
                return
            job = self._pending[i]
            del self._pending[i]
            k = self.key(job)
            self._busy[k] = self._busy.get(k, 0) + 1
            t = asyncio.ensure_future(self._call(job))
            self._running[t] = job
            self._started_at[t] = self.clock()
            t.add_done_callback(self._task_done)

    def _task_done(self, _t: asyncio.Task) -> None:
        if self._wake is not None:
            self._wake.set()

    def _finish(self, t: asyncio.Task) -> HostResult:
        job = self._running.pop(t)
        started = self._started_at.pop(t)
        k = self.key(job)
        self._busy[k] -= 1
        if not self._busy[k]:
            del self._busy[k]
        ended = self.clock()
        if t.cancelled():
            res = HostResult(job, CANCELLED, reason="cancelled: interrupted twice" if self._interrupts >= 2
                             else "cancelled", started=started, ended=ended)
        else:
            exc = t.exception()
            if exc is None:
                res = HostResult(job, OK, value=t.result(), started=started, ended=ended)
            elif isinstance(exc, asyncio.TimeoutError):
                res = HostResult(job, TIMEOUT, error=exc, reason="timed out after %g s" % self.timeout,
                                 started=started, ended=ended)
            else:
                res = HostResult(job, FAILED, error=exc, reason=_reason(exc), started=started, ended=ended)
        self.done += 1
        if not res.ok:
            self.failed += 1
        return res

    async def _drive(self) -> None:
        """Start jobs while there is room (and the consumer keeps up),
        collect finished tasks."""
        try:
            while True:
                self._wake.clear()
                for t in [t for t in self._running if t.done()]:
                    self._ready.append(self._finish(t))
                if len(self._ready) < max(self._buffer, 1):
                    self._start_some()
                if self._ready:
                    self._has_ready.set()
                if not self._running and (not self._pending or self._interrupts):
                    break
                await self._wake.wait()
            while self._pending:
                job = self._pending.popleft()
                self.done += 1
                self.failed += 1
                self._ready.append(HostResult(job, CANCELLED, reason="not started: interrupted"))
        finally:
            self._finished = True
            self._has_ready.set()

    async def _run(self) -> AsyncIterator[HostResult]:
        self._wake = asyncio.Event()
        self._has_ready = asyncio.Event()
        self._ready: Deque[HostResult] = deque()
        self._finished = False
        driver = asyncio.ensure_future(self._drive())
        try:
            while True:
                if self._ready:
                    res = self._ready.popleft()
                    self._wake.set()  # room in the buffer: the driver may start more
                    yield res
                    continue
                if self._finished:
                    break
                self._has_ready.clear()
                await self._has_ready.wait()
            if driver.done() and not driver.cancelled() and driver.exception() is not None:
                raise driver.exception()
        finally:
            # The consumer stopped early (break, exception, cancellation):
            # no task may outlive the iteration.
            driver.cancel()
            left = list(self._running)
            for t in left:
                t.cancel()
            await asyncio.gather(driver, *left, return_exceptions=True)


async def fanout(jobs: Iterable[Any], task: Callable[[Any], Awaitable[Any]], *, forks: Optional[int] = None,
                 per_host: Optional[int] = DEFAULT_PER_HOST, timeout: Optional[float] = None,
                 buffer: int = DEFAULT_BUFFER, on_interrupt: Optional[Callable[[Any], Any]] = None,
                 key: Callable[[Any], Hashable] = host_key) -> AsyncIterator[HostResult]:
    """``async for result in fanout(hosts, task, forks=N, per_host=M, timeout=T)``:
    :class:`Fanout` without a handle (use the class to interrupt, or to
    stop early without leaving the clean-up to the garbage collector)."""
    async with Fanout(jobs, task, forks=forks, per_host=per_host, timeout=timeout, buffer=buffer,
                      on_interrupt=on_interrupt, key=key) as fan:
        async for r in fan:
            yield r
