"""One command on many hosts through the one API: one normal run per host,
all of them in one group.

    async with Chaperone() as ch:
        async with ch.run_many("@gpu&@rack2", "nvidia-smi -L", forks=32) as many:
            print(many.group)                     # the group id, in every run's record
            async for r in many:                  # a HostRun per host, as each completes
                print(r.name, r.state, r.exit_status, r.stdout)
        # detached: ch.start_many(...) yields as soon as each run has started

**Hosts** (:func:`resolve_hosts`): a host pattern (``"node[01-20]"``,
``"@gpu:!db"``: :mod:`.patterns`), a list of patterns, :class:`~.inventory.HostEntry`
or :class:`~chaperone.transports.target.Target` objects, or an
:class:`~.inventory.Inventory` (all its hosts); ``inventory`` (an
Inventory, or paths to read; default: ``$CHAPERONE_INVENTORY``, else
``~/.config/chaperone/inventory.yaml`` if there is one), ``exclude``,
``hostfiles``, ``pick``/``seed`` as :func:`~.inventory.select_hosts`.  Each
host once (the first spelling wins).

**Each host's run** is a normal run: its own id (``GROUP-NAME``, the name
made safe for an id), spool and record, with the group id in its record
(``RunInfo.group``), so ``status``/``logs``/``wait``/``kill``/``clean``
work on it alone or on the whole group.  Per-host settings come from the
inventory (``user``, ``port``, ``python``, ``spool``, ``env``); what the
call gives (``ssh=``, ``env=``) wins over them, key by key for ``env``.

**Limits, and how they combine.**  ``forks`` bounds the runs *being
started* at once over all hosts (connect, log in, hand the program to the
agent); ``per_host`` bounds those being started on one sshd (hostname and
port; default 8).  A run that has started gives its slot back: following
its output is one more channel on its host's connection, so a long command
on 500 hosts does not hold 500 fork slots (clush and pssh hold one for the
whole command).  Under those, each host's transport sets up at most
``connect_limit`` connections at once (default 4, below OpenSSH's
``MaxStartups 10``; connections sshd drops before login are retried with
backoff) and puts at most ``max_sessions`` channels on one connection
(default 10, OpenSSH's ``MaxSessions``; past that, another connection).
So no host ever sees more than 4 connections being set up by this process,
nor more than 10 sessions on one of them, whatever ``forks`` says.

**Failures stay with their host**, each after a bounded time: a start that
fails (refused, host key, login, no Python) fails its run at once with
ssh's reason (state ``failed``, its record ``failed``); a host that does
not answer within ``start_timeout`` (60 s; ssh's ``ConnectTimeout``, 15 s
by default, usually ends it first) fails with ``timeout``; a connection
that breaks while following is re-made with backoff, as for one run, for
up to ``reconnect_for`` seconds (60) in a row, then the host is
``unreachable`` (its run goes on there: ``chaperone wait ID`` finds it
later).  ``host_timeout`` (None) stops waiting for a host's run after that
many seconds (state ``timeout``; the run goes on).

**Results** (:class:`HostRun`, a :class:`~.output.HostOutcome`) come in
order of completion with back-pressure: when ``buffer`` results wait for
the consumer, no new run starts (runs being started finish starting; runs
started go on, and their results wait too).  ``collect`` keeps each host's output in
``stdout``/``stderr`` (bytes, exact); ``on_output(name, stream, data)``
is called with each piece as it arrives (live output).

**Ctrl-C**: :meth:`ManyRuns.interrupt` the first time starts nothing more
and sends SIGINT to every run (a run still starting gets it as soon as it
has started); the second time stops following: every run not over yet
comes out ``detached`` (it runs on).  Every host has exactly one result.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .fanout import CANCELLED, DEFAULT_BUFFER, DEFAULT_PER_HOST, FAILED, TIMEOUT, Fanout, HostFailure, HostResult
from .inventory import HostEntry, Inventory, load_inventory, select_hosts
from .nodeset import natural_key
from .output import EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_UNREACHABLE, HostOutcome
from ..records import generated_id

if TYPE_CHECKING:  # pragma: no cover
    from ..api import Chaperone, Run
    from ..transports.target import Target

__all__ = ["ManyRuns", "HostRun", "resolve_hosts", "run_ids_for", "group_run_ids", "group_ids_like",
           "follow_runs", "DEFAULT_START_TIMEOUT", "DEFAULT_RECONNECT_FOR"]

#: Seconds a host has to take a start (connect, log in, start the agent).
DEFAULT_START_TIMEOUT = 60.0
#: Seconds in a row a broken connection to a host is re-made before the
#: host counts as unreachable (its run goes on there).
DEFAULT_RECONNECT_FOR = 60.0

Hosts = Union[str, Inventory, Sequence[Union[str, HostEntry, "Target"]]]


@dataclass
class HostRun(HostOutcome):
    """One host's result (a :class:`~.output.HostOutcome`, so the output
    functions take it): ``name``, ``state`` (the run's final state
    ``done``/``error``/``lost``; with ``start_many`` ``running``; or
    ``failed`` (never started), ``unreachable`` (contact lost while
    following), ``timeout``, ``cancelled`` (never started: Ctrl-C),
    ``detached`` (Ctrl-C twice)), ``exit_status`` (the shell-like status
    it contributes), ``reason`` (why it did not succeed, one line),
    ``stdout``/``stderr`` (with ``collect``), ``run_id``, ``final`` (the
    state dict), ``run`` (the :class:`~chaperone.api.Run`; None when it
    never got a record), ``reconnects``."""

    run: Optional["Run"] = field(default=None, repr=False, compare=False)
    entry: Optional[HostEntry] = field(default=None, repr=False, compare=False)
    reconnects: int = 0


# --- hosts -----------------------------------------------------------------------------------------------


def resolve_hosts(hosts: Hosts, *, inventory: Union[None, Inventory, str, Sequence[str]] = None,
                  exclude: Sequence[str] = (), hostfiles: Sequence[str] = (), pick: Optional[int] = None,
                  seed: Any = None) -> List[Union[HostEntry, "Target"]]:
    """The hosts meant by ``hosts`` (see the module docstring), in natural
    order of their names: HostEntry objects, and Target objects given as
    such.  Raises :class:`~.inventory.SelectionError` or
    :class:`~.inventory.InventoryError` (ValueErrors, one line)."""
    from ..transports.target import Target

    if isinstance(hosts, Inventory):
        inventory, hosts = hosts, ["all"]
    elif isinstance(hosts, (str, HostEntry, Target)):
        hosts = [hosts]
    patterns = [h for h in hosts if isinstance(h, str)]
    given = [h for h in hosts if not isinstance(h, str)]
    bad = [h for h in given if not isinstance(h, (HostEntry, Target))]
    if bad:
        raise TypeError("hosts are patterns (str), HostEntry or Target objects, not %r" % (bad[0],))
    inv: Optional[Inventory] = None
    if patterns or hostfiles or exclude:
        if isinstance(inventory, Inventory):
            inv = inventory
        else:
            paths = [inventory] if isinstance(inventory, str) else list(inventory or ())
            inv = load_inventory(paths)
    chosen: Dict[str, Union[HostEntry, Target]] = {}
    if patterns or hostfiles:
        for e in select_hosts(patterns, inventory=inv, exclude=exclude, hostfiles=hostfiles):
            chosen.setdefault(e.name, e)
    for h in given:
        chosen.setdefault(h.name, h)
    if exclude and given:
        from .patterns import select

        gone = set()
        for x in exclude:
            gone.update(select(x, inv))
        for name in gone:
            chosen.pop(name, None)
    if not chosen:
        from .inventory import SelectionError

        raise SelectionError("no host selected")
    names = sorted(chosen, key=natural_key)
    if pick is not None:
        from .inventory import SelectionError

        if pick < 1:
            raise SelectionError("--pick needs a number of hosts, 1 or more (got %d)" % pick)
        if pick < len(names):
            import random

            names = sorted(random.Random(seed).sample(names, pick), key=natural_key)
    return [chosen[n] for n in names]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def run_ids_for(group: str, names: Sequence[str]) -> Dict[str, str]:
    """``{name: run id}``: ``GROUP-NAME`` with the name made safe for a run
    id (other characters become ``_``; ``..`` cannot occur), unique (a
    clash gets ``-2``, ``-3`` ...), at most 128 characters (a long name is
    cut and given a hash)."""
    out: Dict[str, str] = {}
    used = set()
    room = 128 - len(group) - 1
    for name in names:
        safe = _UNSAFE.sub("_", name).replace("..", "._")
        if len(safe) > room:
            digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            safe = safe[:max(1, room - 13)] + "-" + digest
        rid = "%s-%s" % (group, safe)
        n = 2
        while rid in used:
            rid = "%s-%s-%d" % (group, safe[:max(1, room - 6)], n)
            n += 1
        used.add(rid)
        out[name] = rid
    return out


# --- records of groups ---------------------------------------------------------------------------------


def group_run_ids(ch: "Chaperone", group: str) -> List[str]:
    """The ids of a group's recorded runs, in natural order of their hosts."""
    rows = ch.records.db.execute("SELECT id, host FROM runs WHERE grp = ?", (group,)).fetchall()
    rows.sort(key=lambda r: (natural_key(r[1]), r[0]))
    return [r[0] for r in rows]


def group_ids_like(ch: "Chaperone", prefix: str) -> List[str]:
    """Recorded group ids equal to ``prefix``, else the generated ones
    starting with it (a name given with ``--id`` is never taken by a prefix)."""
    db = ch.records.db
    if db.execute("SELECT 1 FROM runs WHERE grp = ? LIMIT 1", (prefix,)).fetchone():
        return [prefix]
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return [r[0] for r in db.execute("SELECT DISTINCT grp FROM runs WHERE grp LIKE ? ESCAPE '\\' LIMIT 200",
                                     (like,)) if generated_id(r[0])][:10]


# --- the fan-out -------------------------------------------------------------------------------------------


class _Job:
    """One host of a ManyRuns: how to reach it, its run id, how far it got."""

    __slots__ = ("entry", "target", "given", "run_id", "started", "interrupted", "forwarded", "detached", "follower",
                 "state", "out", "err", "reconnects", "lost_since", "last_error", "t0", "signal_error")

    def __init__(self, entry: HostEntry, run_id: str, given: Optional["Target"] = None) -> None:
        self.entry = entry
        self.given = given
        self.target: Optional["Target"] = None
        self.run_id = run_id
        self.started = False
        self.interrupted = False
        self.forwarded = False
        self.detached = False
        self.follower: Optional[asyncio.Task] = None
        self.state: Optional[dict] = None
        self.out = bytearray()
        self.err = bytearray()
        self.reconnects = 0
        self.lost_since: Optional[float] = None
        self.last_error: Optional[str] = None
        self.t0: Optional[float] = None
        self.signal_error: Optional[str] = None

    @property
    def name(self) -> str:
        return self.entry.name

    def key(self):
        """The sshd this job's run is started on (for ``per_host``)."""
        t = self.given
        if t is not None:
            return (t.destination, t.port)
        return (self.entry.hostname, self.entry.port)


def _entry_of(target: "Target") -> HostEntry:
    return HostEntry(name=target.name, hostname=target.destination, port=target.port, user=target.user,
                     python=target.python, spool=target.spool)


class _GaveUp(Exception):
    pass


def _stdin_spec(stdin) -> dict:
    """program_spec's input arguments for ``stdin`` of every run."""
    if stdin is None:
        return {}
    from ..feed import inline

    if inline(stdin) is not None:
        return {"stdin": inline(stdin)}
    return {"stdin_stream": True}


class ManyRuns:
    """A command on many hosts (see the module docstring).  Made by
    :meth:`chaperone.Chaperone.run_many` / :meth:`~chaperone.Chaperone.start_many`;
    iterate it once (``async for``), inside ``async with`` so that leaving
    early stops what still runs here (never the runs themselves).

    ``command``: a string is a shell command line, a list an exact argv (as
    :meth:`~chaperone.Chaperone.start`).  ``group``: the group id (default
    new; each run's id is ``GROUP-NAME``; the same group and command again
    re-attaches to its runs, as ``start`` does with an id).  ``detach``:
    results once each run has started (``start_many``), else once each has
    ended.  ``env``, ``cwd``, ``timeout`` (the program's), ``stdin``,
    ``stdin_path``, ``config``: as for ``start``, for every host.  ``ssh``:
    SSH settings for every host (they win over the inventory's).

    Counters for a progress line: ``total``, ``done``, ``failed``,
    ``starting``, ``running``."""

    def __init__(self, ch: "Chaperone", hosts: Hosts, command: Union[str, Sequence[str]], *,
                 inventory: Union[None, Inventory, str, Sequence[str]] = None, exclude: Sequence[str] = (),
                 hostfiles: Sequence[str] = (), pick: Optional[int] = None, seed: Any = None,
                 group: Optional[str] = None, detach: bool = False, collect: bool = True,
                 on_output: Optional[Callable[[str, str, bytes], Any]] = None,
                 on_reconnect: Optional[Callable[[str, Exception], Any]] = None,
                 forks: Optional[int] = None, per_host: Optional[int] = DEFAULT_PER_HOST,
                 start_timeout: Optional[float] = DEFAULT_START_TIMEOUT, host_timeout: Optional[float] = None,
                 reconnect_for: float = DEFAULT_RECONNECT_FOR, buffer: int = DEFAULT_BUFFER,
                 ssh: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, Optional[str]]] = None,
                 **start_kw: Any) -> None:
        from ..agent_source import agent_module
        from ..api import new_run_id
        from ..errors import UsageError
        from ..transports.target import Target

        unknown = set(start_kw) - {"cwd", "timeout", "stdin", "stdin_path", "config"}
        if unknown:
            raise TypeError("unexpected keyword arguments: %s (the group id is group=, run ids are "
                            "GROUP-HOST)" % ", ".join(sorted(unknown)))
        self.ch = ch
        self.command = command
        ch._argv(command)  # a bad command fails here, not once per host
        self.group = group or new_run_id()
        agent = agent_module()
        try:
            agent.check_id(self.group)
        except agent.AgentError as e:
            raise UsageError(str(e).replace("run id", "group id")) from None
        if len(self.group) > 100:
            raise UsageError("group id %r is too long: at most 100 characters (run ids add the host)" % self.group)
        if group and ch.records.exists(group) and (ch.records.get(group).group or None) != group:
            raise UsageError("%s is already the id of a run (not of a group): choose another group id" % group)
        chosen = resolve_hosts(hosts, inventory=inventory, exclude=exclude, hostfiles=hostfiles, pick=pick,
                               seed=seed)
        self.hosts: List[HostEntry] = [_entry_of(h) if isinstance(h, Target) else h for h in chosen]
        from ..transports.target import parse_host

        for entry in self.hosts:  # (a name no host can have: a usage error before anything starts)
            parse_host(entry.hostname)
        self.run_ids: Dict[str, str] = run_ids_for(self.group, [h.name for h in self.hosts])
        self._jobs = [_Job(e, self.run_ids[e.name], h if isinstance(h, Target) else None)
                      for e, h in zip(self.hosts, chosen)]
        self.detach = detach
        self.collect = collect
        self.on_output = on_output
        self.on_reconnect = on_reconnect  # (name, error): once each time a host's connection is lost
        self.forks = forks
        self.per_host = per_host
        if start_timeout is not None and start_timeout <= 0:
            raise ValueError("start_timeout must be positive (or None)")
        if host_timeout is not None and host_timeout <= 0:
            raise ValueError("host_timeout must be positive (or None)")
        self.start_timeout = start_timeout
        self.host_timeout = host_timeout
        self.reconnect_for = reconnect_for
        self.buffer = buffer
        self.ssh = dict(ssh or {})
        self.env = dict(env or {})
        from .. import feed

        stdin = start_kw.get("stdin")
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            # A stream: read once, here, and given to each run at its own pace.
            start_kw["stdin"] = stdin if isinstance(stdin, feed.SharedInput) else feed.SharedInput(stdin)
        self.start_kw = start_kw
        # One check of the program for all hosts (bad env names, timeout ...).
        ch.program_spec(ch._argv(command)[0], run_id=self._jobs[0].run_id, env=self.env, **{
            k: v for k, v in start_kw.items() if k in ("cwd", "timeout", "stdin_path", "config")},
            **_stdin_spec(start_kw.get("stdin")))
        self._fan: Optional[Fanout] = None
        self._iterated = False
        self._interrupts = 0
        self._following: Dict[str, _Job] = {}
        self._side: set = set()
        self.total = len(self._jobs)
        self.done = 0
        self.failed = 0

    # -- counters, control ----------------------------------------------------------------------------------

    @property
    def starting(self) -> int:
        return self._fan.running if self._fan is not None else 0

    @property
    def running(self) -> int:
        """Runs started and not over (being followed)."""
        return sum(1 for j in self._following.values() if j.follower is not None and not j.follower.done())

    @property
    def interrupts(self) -> int:
        return self._interrupts

    def interrupt(self) -> int:
        """Ctrl-C (see the module docstring).  Returns how many times it was called."""
        self._interrupts += 1
        if self._fan is not None:
            self._fan.interrupt()
        if self._interrupts == 1:
            for job in list(self._following.values()):
                if job.follower is not None and not job.follower.done():
                    self._forward(job)
        else:
            for job in list(self._following.values()):
                if job.follower is not None and not job.follower.done():
                    job.detached = True
                    job.follower.cancel()
        return self._interrupts

    def _on_interrupt(self, job: _Job) -> None:
        """The fan-out's first interrupt, for a job still starting."""
        job.interrupted = True
        if job.started:
            self._forward(job)

    def _forward(self, job: _Job) -> None:
        """SIGINT to the job's run, once (a run that has just started may be
        both still in the fan-out and followed already)."""
        if job.forwarded:
            return
        job.forwarded = True
        t = asyncio.ensure_future(self._signal(job))
        self._side.add(t)
        t.add_done_callback(self._side.discard)

    async def _signal(self, job: _Job) -> None:
        from ..errors import ChaperoneError

        try:
            await self.ch.signal(job.run_id, "SIGINT")
        except ChaperoneError as e:
            job.signal_error = str(e)

    # -- iteration ---------------------------------------------------------------------------------------------

    async def __aenter__(self) -> "ManyRuns":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop whatever still runs here (the runs themselves go on)."""
        gen = getattr(self, "_gen", None)
        if gen is not None:
            await gen.aclose()
        for t in list(self._side):
            t.cancel()
        tasks = [j.follower for j in self._following.values() if j.follower is not None and not j.follower.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._side, return_exceptions=True)

    def __aiter__(self) -> AsyncIterator[HostRun]:
        if self._iterated:
            raise RuntimeError("a ManyRuns is iterated once")
        self._iterated = True
        self._gen = self._iterate()
        return self._gen

    async def _iterate(self) -> AsyncIterator[HostRun]:
        """Results from a pump task, through a queue of at most ``buffer``:
        when it is full the pump stops taking started runs from the fan-out,
        whose own buffer of one then stops it starting more."""
        from collections import deque

        # (buffer=1: the fan-out starts nothing new while a started run
        # waits for the pump, which waits while the queue is full)
        fan = self._fan = Fanout(self._jobs, self._start, forks=self.forks, per_host=self.per_host,
                                 timeout=self.start_timeout, buffer=1, on_interrupt=self._on_interrupt,
                                 key=_Job.key)
        ready: deque = deque()
        room, has = asyncio.Event(), asyncio.Event()
        followers: set = set()

        async def pump() -> None:
            fan_iter = fan.__aiter__()
            next_fan: Optional[asyncio.Future] = None
            fan_over = False
            try:
                while True:
                    while len(ready) >= max(self.buffer, 1):
                        room.clear()
                        await room.wait()
                    if next_fan is None and not fan_over:
                        next_fan = asyncio.ensure_future(fan_iter.__anext__())
                    waiting = set(followers)
                    if next_fan is not None:
                        waiting.add(next_fan)
                    if not waiting:
                        return
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        if t is next_fan:
                            next_fan = None
                            try:
                                r = t.result()
                            except StopAsyncIteration:
                                fan_over = True
                                continue
                            job = r.job
                            if r.ok and job.follower is not None:
                                followers.add(job.follower)
                                if self._interrupts >= 2:  # (it started as the second Ctrl-C came)
                                    job.detached = True
                                    job.follower.cancel()
                                continue
                            ready.append(self._from_fan(r))
                        else:
                            followers.discard(t)
                            ready.append(t.result())
                        has.set()
            finally:
                if next_fan is not None and not next_fan.done():
                    next_fan.cancel()
                    await asyncio.gather(next_fan, return_exceptions=True)
                has.set()

        pumping = asyncio.ensure_future(pump())
        try:
            while True:
                if ready:
                    r = ready.popleft()
                    room.set()
                    yield self._count(r)
                    continue
                if pumping.done():
                    pumping.result()  # (its error, if it failed)
                    break
                has.clear()
                await has.wait()
        finally:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            await fan.aclose()
            for t in followers:
                t.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    def _count(self, r: HostRun) -> HostRun:
        self.done += 1
        ok = r.state in ("running", "done") and r.status == 0 if self.detach else r.succeeded
        if not ok:
            self.failed += 1
        return r

    # -- one host ------------------------------------------------------------------------------------------------

    def _target(self, job: _Job) -> "Target":
        if job.given is not None:
            return self.ch.target(job.given)
        from .headstart import entry_ssh, named

        return named(self.ch.target(job.entry.hostname, **entry_ssh(job.entry, self.ssh)), job.entry)

    def _kw(self, job: _Job) -> dict:
        from ..feed import SharedInput

        env = dict(job.entry.env)
        env.update(self.env)
        kw = dict(self.start_kw, id=job.run_id, group=self.group, env=env)
        if isinstance(kw.get("stdin"), SharedInput):
            kw["stdin"] = kw["stdin"].reader()  # (each run its own reader of the one input)
        return kw

    @property
    def shared_input(self):
        """The input every run reads (a stream given as ``stdin``), or None."""
        from ..feed import SharedInput

        stdin = self.start_kw.get("stdin")
        return stdin if isinstance(stdin, SharedInput) else None

    async def _start(self, job: _Job) -> _Job:
        """The fan-out's task: start the run; once its host answered, hand
        its following to a task of its own (the fork slot is free again)."""
        from ..errors import ChaperoneError
        from ..protocol import End, OutputChunk, StateUpdate

        loop = asyncio.get_running_loop()
        job.t0 = loop.time()
        try:
            job.target = self._target(job)
            if self.detach:
                run = await self.ch.start(job.target, self.command, **self._kw(job))
                job.started = True
                job.state = run.state.model_dump() if run.state is not None else None
                return job
            gen = self.ch.run(job.target, self.command, on_reconnect=lambda e, d: self._on_reconnect(job, e, d),
                              **self._kw(job))
        except ChaperoneError as e:
            raise HostFailure(str(e)) from None
        handed = False
        try:
            async for event in gen:
                if isinstance(event, OutputChunk):
                    self._output(job, event)
                elif isinstance(event, StateUpdate):
                    job.state = dict(event.state)
                    job.lost_since = None
                    if not job.started:
                        job.started = True
                        if job.interrupted:
                            self._forward(job)
                        self._following[job.name] = job
                        job.follower = asyncio.ensure_future(self._follow(job, gen))
                        handed = True
                        return job
                elif isinstance(event, End):
                    break
            raise HostFailure("the host ended the start without a state")
        except _GaveUp as e:
            raise HostFailure(str(e)) from None
        except ChaperoneError as e:
            raise HostFailure(str(e)) from None
        finally:
            if not handed:
                await gen.aclose()

    def _output(self, job: _Job, event) -> None:
        if self.collect:
            (job.out if event.stream == "stdout" else job.err).extend(event.data)
        if self.on_output is not None:
            self.on_output(job.name, event.stream, event.data)

    def _on_reconnect(self, job: _Job, error: Exception, delay: float) -> None:
        """Called before each new try to reach the host: give up once it has
        been unreachable for ``reconnect_for`` seconds in a row.  (The
        library's delay starts again at 0.25 s once the host answered.)"""
        now = asyncio.get_running_loop().time()
        job.reconnects += 1
        job.last_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if job.lost_since is None or delay <= 0.25:
            job.lost_since = now
            if self.on_reconnect is not None:
                try:
                    self.on_reconnect(job.name, error)
                except Exception:  # (a hook must not break the run's following)
                    pass
        if now + delay - job.lost_since > self.reconnect_for:
            raise _GaveUp("no contact for %.0f s (%s); the run may go on there"
                          % (now - job.lost_since, job.last_error))

    async def _follow(self, job: _Job, gen) -> HostRun:
        """Follow a started run to its end; always a result, never raises
        (but for a cancellation that is not a detach)."""
        from ..errors import ChaperoneError
        from ..protocol import End, OutputChunk, StateUpdate

        async def drain() -> None:
            async for event in gen:
                if isinstance(event, OutputChunk):
                    self._output(job, event)
                elif isinstance(event, StateUpdate):
                    job.state = dict(event.state)
                    job.lost_since = None
                elif isinstance(event, End):
                    return

        try:
            if self.host_timeout is None:
                await drain()
            else:
                left = self.host_timeout - (asyncio.get_running_loop().time() - job.t0)
                await asyncio.wait_for(drain(), max(left, 0.001))
            return self._final(job)
        except asyncio.CancelledError:
            if not job.detached:
                raise
            return self._result(job, "detached", EXIT_INTERRUPTED,
                                "detached (Ctrl-C twice); it runs on")
        except asyncio.TimeoutError:
            return self._result(job, TIMEOUT, EXIT_TIMEOUT, "stopped waiting after %g s; it runs on"
                                % self.host_timeout)
        except _GaveUp as e:
            return self._result(job, "unreachable", EXIT_UNREACHABLE, str(e))
        except ChaperoneError as e:
            rec = self.ch.records.get(job.run_id)
            if rec is not None and rec.state == "lost":
                return self._result(job, "lost", None, rec.error or str(e))
            return self._result(job, "unreachable", EXIT_UNREACHABLE, "%s; the run may go on there"
                                % (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
        finally:
            await gen.aclose()

    def _final(self, job: _Job) -> HostRun:
        from ..models import exit_code_for

        st = job.state or {}
        name = st.get("state", "lost")
        reason = None
        if name in ("error", "lost"):
            reason = st.get("error") or name
        elif st.get("timed_out"):
            reason = "timed out (--timeout); ended by %s" % st.get("signal")
        elif st.get("signal"):
            reason = "killed by %s" % st["signal"]
        if job.reconnects and reason is None:
            reason = "reconnected %d time%s (%s)" % (job.reconnects, "" if job.reconnects == 1 else "s",
                                                     job.last_error)
        return self._result(job, name, exit_code_for(st), reason)

    def _result(self, job: _Job, state: str, exit_status: Optional[int], reason: Optional[str]) -> HostRun:
        loop = asyncio.get_running_loop()
        run = None
        if self.ch.records.get(job.run_id) is not None:
            run = self.ch.get(job.run_id)
        hostname = job.target.destination if job.target is not None else job.entry.hostname
        if job.signal_error:  # (Ctrl-C's SIGINT could not be sent: say so, it explains a run that went on)
            reason = "%sSIGINT not sent: %s" % (reason + "; " if reason else "", job.signal_error)
        return HostRun(job.name, state, exit_status, loop.time() - job.t0 if job.t0 is not None else None, reason,
                       bytes(job.out), bytes(job.err), job.run_id if run is not None else None, hostname,
                       job.state if job.state and job.state.get("state") in ("done", "error", "lost") else None,
                       run=run, entry=job.entry, reconnects=job.reconnects)

    def _from_fan(self, r: HostResult) -> HostRun:
        """A job that ended within the fan-out: started detached, or never started."""
        from ..models import exit_code_for

        job: _Job = r.job
        if r.ok:  # detach: the run started (or could not exec)
            st = job.state or {}
            code = exit_code_for(st) if st.get("state") in ("done", "error", "lost") else 0
            reason = st.get("error") if st.get("state") in ("error", "lost") else None
            res = self._result(job, st.get("state", "running"), code, reason)
            return res
        if r.state == TIMEOUT:
            reason = "no answer from %s within %g s" % (job.name, self.start_timeout)
            self.ch.records.mark(job.run_id, "unknown", reason)  # (no record: nothing changes)
            return self._result(job, TIMEOUT, EXIT_TIMEOUT, reason)
        if r.state == CANCELLED:
            if r.started is not None and self.ch.records.get(job.run_id) is not None:
                self.ch.records.mark(job.run_id, "unknown", "interrupted before %s answered" % job.name)
            return self._result(job, CANCELLED, EXIT_INTERRUPTED, r.reason or "not started: interrupted")
        assert r.state == FAILED
        return self._result(job, FAILED, EXIT_UNREACHABLE, r.reason)  # (never started: 255, as the CLI says)


# --- following runs that exist ------------------------------------------------------------------------------


async def follow_runs(ch: "Chaperone", run_ids: Sequence[str], *, collect: bool = False,
                      on_output: Optional[Callable[[str, str, bytes], Any]] = None,
                      offsets: Optional[Mapping[str, Mapping[str, int]]] = None,
                      reconnect_for: float = DEFAULT_RECONNECT_FOR,
                      names: Optional[Mapping[str, str]] = None) -> AsyncIterator[HostRun]:
    """Follow recorded runs (a group's, say) at once, each to its end, and
    yield a :class:`HostRun` for each as it ends: ``on_output(name, stream,
    data)`` with its output from ``offsets[run_id]`` (default: all of it;
    ``SKIP_OUTPUT`` for none), ``collect`` to keep it.  ``names``: what to
    call each run (default its host).  A run that never started comes out
    at once (``failed``, with its reason)."""
    from ..errors import ChaperoneError

    recs = [ch.record(r) for r in run_ids]
    jobs: Dict[str, _Job] = {}
    for rec in recs:
        name = (names or {}).get(rec.id, rec.host)
        job = _Job(HostEntry.plain(name), rec.id)
        job.t0 = asyncio.get_running_loop().time()
        job.started = rec.state != "failed"
        jobs[rec.id] = job
    dummy = ManyRuns.__new__(ManyRuns)  # the follow code of ManyRuns, without a fan-out
    dummy.ch, dummy.collect, dummy.on_output = ch, collect, on_output
    dummy.host_timeout, dummy.reconnect_for = None, reconnect_for

    async def one(job: _Job) -> HostRun:
        rec = ch.records.get(job.run_id)
        if rec is None or rec.state == "failed":
            return dummy._result(job, FAILED, None, (rec.error if rec else None) or "never started")
        try:
            events = ch.events(job.run_id, dict((offsets or {}).get(job.run_id) or {"stdout": 0, "stderr": 0}),
                               on_reconnect=lambda e, d: dummy._on_reconnect(job, e, d))
        except ChaperoneError as e:
            return dummy._result(job, FAILED, None, str(e))
        return await dummy._follow(job, events)

    tasks = [asyncio.ensure_future(one(j)) for j in jobs.values()]
    try:
        for t in asyncio.as_completed(tasks):
            yield await t
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
