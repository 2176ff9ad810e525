"""The library: start, watch, signal, reconnect to and clean up runs.

One class, :class:`Chaperone`; one handle, :class:`Run`::

    async with Chaperone() as ch:
        run = await ch.start("gpu1", ["python", "train.py"], timeout=3600)
        async for chunk in run.output(follow=True):   # reconnects by itself
            ...
        state = await run.wait()                       # a RunState
        print(state.exit_code)

Every run has a record (SQLite, ``$CHAPERONE_HOME/runs.db``) that says which
host it is on and how that host was reached (a
:class:`~chaperone.transports.target.Target`), so any later process reaches
it by id.  Updates come by SSH (the agent is asked, or followed), or, with
``Chaperone(push=True)``, by each agent's HTTPS callbacks
(:mod:`chaperone.push.receiver`): the same verbs either way.

Results are typed: :class:`~chaperone.models.RunState` (the agent's
``state.json``), :class:`~chaperone.models.RunInfo` (a run as chaperone
shows it), and the events of :mod:`chaperone.protocol`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import secrets
import shlex
import signal as _signal
from typing import (TYPE_CHECKING, AsyncIterator, Callable, Dict, List, Mapping, Optional, Sequence,
                    Union)

from . import feed
from .agent_source import agent_module
from .client import AgentClient
from .errors import ChaperoneError, ConnectFailed, ConnectionLost, NoSuchRun, StartFailed, StartPending, UsageError
from .states import FINAL_STATES, START_GRACE, exit_code_for, start_in_flight
from .protocol import STREAMS, End, Event, OutputChunk, StateUpdate
from .records import Record, Records, chaperone_home
from .transports.base import Transport
from .transports.factory import Transports
from .transports.target import Target, is_local
from .watcher import HostWatcher

if TYPE_CHECKING:  # pragma: no cover
    from .fleet.runs import ManyRuns
    from .models import Process, RunInfo, RunState, StdinAck

__all__ = ["Chaperone", "Run", "new_run_id", "parse_env", "check_signal", "exit_code_for"]

#: Follow offsets that skip all output (for ``wait``).
SKIP_OUTPUT = {"stdout": 1 << 62, "stderr": 1 << 62}

Command = Union[str, Sequence[str]]


def new_run_id() -> str:
    """A fresh run id: the local date and time, then 6 random hex digits."""
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def parse_env(pairs: Sequence[str]) -> Dict[str, str]:
    """``["K=V", ...]`` as a dict (a usage error for anything else)."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or "\0" in pair:
            raise UsageError("bad environment setting %r: expected NAME=VALUE" % pair)
        env[name] = value
    return env


def check_signal(name: Union[str, int]) -> str:
    """A signal name or number, checked here; its canonical name (``SIGTERM``)."""
    text = str(name).strip().upper()
    if text.isdigit():
        try:
            return _signal.Signals(int(text)).name
        except ValueError:
            raise UsageError("unknown signal %r" % name) from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text.startswith("SIG_") or text not in _signal.Signals.__members__:
        raise UsageError("unknown signal %r" % name)
    return text


def _offsets(offsets: Optional[Mapping[str, int]]) -> Dict[str, int]:
    """Where to start each stream: ``offsets``, 0 for a stream it leaves
    out; an unknown stream or a negative offset is a usage error."""
    out = {s: 0 for s in STREAMS}
    for stream, offset in (offsets or {}).items():
        if stream not in STREAMS:
            raise UsageError("unknown stream %r in offsets: stdout or stderr" % (stream,))
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise UsageError("offset of %s must be an integer >= 0 (got %r)" % (stream, offset))
        out[stream] = offset
    return out


class _StartBatcher:
    """Starts requested in the same turn of the event loop for one host go
    to the agent together: one channel and one Python start-up for all."""

    MAX = 256

    def __init__(self, client: AgentClient):
        self.client = client
        self.pending: list = []
        self.task: Optional[asyncio.Task] = None

    async def submit(self, program: bytes) -> dict:
        return await self.enqueue(program)

    def enqueue(self, program: bytes) -> asyncio.Future:
        """The start's answer to come: a future the batch settles even when
        whoever awaits it was cancelled meanwhile (the start goes on)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((program, fut))
        if self.task is None:
            self.task = asyncio.ensure_future(self._flush())
        return fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the other starts of this turn join
        batch, self.pending, self.task = self.pending, [], None
        chunks = [batch[i:i + self.MAX] for i in range(0, len(batch), self.MAX)]
        await asyncio.gather(*(self._send(chunk) for chunk in chunks))

    async def _send(self, batch) -> None:
        try:
            if len(batch) == 1:
                answers = [await self.client.start(batch[0][0])]
            else:
                answers = await self.client.start_many([p for p, _ in batch])
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise ChaperoneError("the agent answered %d starts with %r" % (len(batch), answers))
        except BaseException as e:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else ChaperoneError(str(e)))
            return
        for (_, fut), answer in zip(batch, answers):
            if fut.done():
                continue
            if isinstance(answer, dict) and "rejected" in answer:
                fut.set_exception(UsageError(answer["rejected"]))
            else:
                fut.set_result(answer)


class Run:
    """A run: its id and host, what is known of it, and the verbs of
    :class:`Chaperone` bound to it (``await run.wait()``)."""

    def __init__(self, ch: "Chaperone", record: Record):
        self._ch = ch
        self._record = record

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def host(self) -> str:
        """The host as it was named (``local``, an alias, ``user@host``)."""
        return self._record.host

    @property
    def state(self) -> Optional["RunState"]:
        """The last state seen of it on its host (None before the host answered)."""
        last = self._record.last
        return self._ch._typed(last) if last else None

    def info(self) -> "RunInfo":
        """The run as the one JSON object of a run (records only, no I/O)."""
        from .models import RunInfo

        return RunInfo.model_validate(self._record.info())

    def _refresh(self) -> "Run":
        rec = self._ch.records.get(self.id)
        if rec is not None:
            self._record = rec
        return self

    async def status(self) -> "RunState":
        """See :meth:`Chaperone.status`."""
        try:
            return await self._ch.status(self.id)
        finally:
            self._refresh()

    async def wait(self, **kw) -> "RunState":
        """See :meth:`Chaperone.wait`."""
        try:
            return await self._ch.wait(self.id, **kw)
        finally:
            self._refresh()

    def events(self, offsets: Optional[Dict[str, int]] = None, **kw) -> AsyncIterator[Event]:
        """See :meth:`Chaperone.events`."""
        return self._ch.events(self.id, offsets, **kw)

    def output(self, stream: str = "stdout", offset: int = 0, *, follow: bool = False) -> AsyncIterator[bytes]:
        """See :meth:`Chaperone.output`."""
        return self._ch.output(self.id, stream, offset, follow=follow)

    def logs(self, streams: Sequence[str] = STREAMS, **kw) -> AsyncIterator[Event]:
        """See :meth:`Chaperone.logs`."""
        return self._ch.logs(self.id, streams, **kw)

    async def read(self, stream: str = "stdout", offset: int = 0, length: Optional[int] = None) -> bytes:
        """See :meth:`Chaperone.read`."""
        return await self._ch.read(self.id, stream, offset, length)

    async def stdin_sent(self) -> Optional[int]:
        """Until the input given as a stream to :meth:`Chaperone.start`
        (``stdin=``) is all held on the host, with its end (or the run
        ended first): the bytes the host holds; None when this process
        sends it no input.  Raises what stopped the sending."""
        task = self._ch._feeders.get(self.id)
        return None if task is None else await asyncio.shield(task)

    async def signal(self, sig: Union[str, int] = "SIGTERM", grace: Optional[float] = None) -> "RunState":
        """See :meth:`Chaperone.signal`."""
        try:
            return await self._ch.signal(self.id, sig, grace)
        finally:
            self._refresh()

    def send_input(self, source: "feed.Source", **kw) -> asyncio.Task:
        """See :meth:`Chaperone.send_input`."""
        return self._ch.send_input(self.id, source, **kw)

    async def processes(self) -> "List[Process]":
        """See :meth:`Chaperone.processes`."""
        return await self._ch.processes(self.id)

    async def resize(self, rows: int, cols: int) -> bool:
        """See :meth:`Chaperone.resize`."""
        return await self._ch.resize(self.id, rows, cols)

    async def clean(self, force: bool = False) -> None:
        """See :meth:`Chaperone.clean`."""
        await self._ch.clean(self.id, force)

    def __repr__(self) -> str:
        return "<Run %s on %s: %s>" % (self.id, self.host, self._record.state)


class Chaperone:
    """Starts, watches, signals, reconnects to and cleans up runs.

    ``home``: where records live (default ``$CHAPERONE_HOME``, else
    ``~/.local/state/chaperone``).  SSH: ``ssh_config`` (``-F`` files; the
    user's ``~/.ssh/config`` otherwise, for both clients), ``ssh_client``
    (``"openssh"``, ``"asyncssh"``, or None: ``$CHAPERONE_SSH_CLIENT``,
    else ``ssh`` when installed), ``check_host_keys``, ``known_hosts``,
    ``python`` (on the hosts, default ``python3``), ``connect_limit`` (new
    connections to one host being set up at once; sshd drops those past
    its MaxStartups, 10 by default), ``max_sessions`` (channels on one
    connection: the server's MaxSessions, 10 by default).

    Push: with ``push=True`` each agent calls back over HTTPS
    (``callback_url`` when hosts reach this process directly; else an SSH
    remote port forward on the host's connection, which works behind NAT);
    ``config`` gives defaults for each run's ``program.json`` config;
    ``on_update(run_id, RunState)`` (sync or async) is called on each state
    change; ``heartbeat``: seconds between each agent's heartbeats.  ``transports``: transports to use for some host names (an
    in-memory host in tests, as httpx's MockTransport).  ``overrides``: SSH
    settings (as for :meth:`target`) that win over the recorded ones when
    a recorded run's host is reached again (the CLI's ``-p``, ``-i`` ...
    on ``status ID``)."""

    def __init__(self, home: Optional[os.PathLike] = None, *, ssh_config: Optional[Sequence[str]] = None,
                 ssh_client: Optional[str] = None, check_host_keys: bool = True,
                 known_hosts: Optional[str] = None, python: Optional[str] = None,
                 connect_limit: Optional[int] = None, max_sessions: Optional[int] = None, push: bool = False, callback_url: Optional[str] = None,
                 bind: str = "127.0.0.1", port: int = 0, config: Optional[dict] = None,
                 on_update: Optional[Callable] = None, heal_interval: float = 1.0, heartbeat: Optional[float] = None,
                 transports: Optional[Mapping[str, Transport]] = None, overrides: Optional[Mapping] = None):
        self.home = chaperone_home(home)
        self._records: Optional[Records] = None
        self._closed = False  # (close() was called: no new connections, see close)
        self.ssh_config = list(ssh_config or [])
        self.check_host_keys = check_host_keys
        self.known_hosts = known_hosts
        self.python = python
        self.overrides = {k: v for k, v in _ssh_settings(overrides or {}).items() if v not in (None, (), [])}
        tuning = {k: v for k, v in (("connect_limit", connect_limit), ("max_sessions", max_sessions))
                  if v is not None}
        self.transports = Transports(local_spool=self.home / "spool", client=ssh_client, overrides=transports,
                                     **tuning)
        self._batchers: Dict[int, _StartBatcher] = {}
        self._watchers: Dict[int, HostWatcher] = {}
        #: Runs whose input this process sends (start(stdin=a stream)): their senders.
        self._feeders: Dict[str, asyncio.Task] = {}
        #: Defaults for each program.json's ``config`` (timeouts, batching ...).
        self.config = dict(config or {})
        self.push = None
        if on_update is not None and not push:
            # (it is called by the callbacks: without them it would never be, in silence)
            raise UsageError("on_update needs push=True (the agents' HTTPS callbacks call it); without push, "
                             "follow runs with events() or wait()")
        if push:
            from .push.endpoint import DEFAULT_MAX_BODY
            from .push.receiver import PushReceiver

            self.push = PushReceiver(
                self, callback_url=callback_url, bind=bind, port=port, heal_interval=heal_interval,
                on_update=on_update, heartbeat=heartbeat,
                # Room for the largest callback body an agent sends (output_buffer).
                max_body=max(DEFAULT_MAX_BODY, int(self.config.get("output_buffer") or 0)))

    @property
    def records(self) -> Records:
        """The local records (SQLite)."""
        if self._records is None:
            self._records = Records(self.home / "runs.db")
        return self._records

    async def __aenter__(self) -> "Chaperone":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        """Start what runs in the background (push: the callback endpoint)."""
        self._closed = False
        if self.push is not None:
            await self.push.open()

    async def close(self) -> None:
        """Close connections, the callback endpoint and the records.  Input
        still being sent (``start(stdin=a stream)``) stops there: await
        :meth:`Run.stdin_sent` first to deliver all of it.  A call still in
        flight (a ``wait()``, a follow) that needs the host again raises
        :class:`~chaperone.errors.ChaperoneError` instead of connecting anew
        (:meth:`open` makes this object usable again)."""
        self._closed = True
        watchers, self._watchers = list(self._watchers.values()), {}
        for watcher in watchers:  # (the wait()s in flight end now, with this error)
            watcher.close(ChaperoneError("this Chaperone was closed while waiting (open() it again, or use a new one)"))
        feeders, self._feeders = list(self._feeders.values()), {}
        for task in feeders:
            task.cancel()
        if feeders:
            await asyncio.gather(*feeders, return_exceptions=True)
        if self.push is not None:
            await self.push.close()
        await self.transports.close()
        if self._records is not None:
            self._records.close()
            self._records = None

    # Hosts ---------------------------------------------------------------------

    def target(self, host: Union[str, Target], **ssh) -> Target:
        """How ``host`` is reached: a host argument (``local``, ``gpu1``,
        ``user@host``, ``ssh://user@host:port``) and SSH settings (``user``,
        ``port``, ``identities``, ``options``, ``jump``, ``spool``,
        ``python``) on top of this object's (config files, host keys)."""
        if isinstance(host, Target):
            return self.transports.normalize(host)
        ssh = _ssh_settings(ssh)
        settings = dict(config=self.ssh_config, check_host_keys=self.check_host_keys,
                        known_hosts=self.known_hosts, python=self.python)
        settings.update({k: v for k, v in ssh.items() if v is not None})
        return self.transports.normalize(Target.parse(host, **settings))

    def transport(self, host: Union[str, Target], **ssh) -> Transport:
        """The transport to ``host`` (one per target in this process)."""
        return self.transports.get(self.target(host, **ssh))

    def transport_for(self, record: Record) -> Transport:
        """The transport to a recorded run's host (the same object as for a
        start there), with this object's ``overrides``."""
        if self._closed:
            raise ChaperoneError("run %s: this Chaperone was closed (open() it again, or use a new one)" % record.id)
        target = Target.from_description(dict(record.transport))
        if self.overrides and not target.local:
            target = target.replace(**self.overrides)
        return self.transports.get(target)

    def preconnect(self, host: Union[str, Target], ssh: Optional[Mapping] = None, **settings) -> None:
        """Start connecting to ``host`` in the background now, where the
        transport can (the OpenSSH client's shared connection)."""
        target = self.target(host, **{**(ssh or {}), **settings})
        if not target.local:
            self.transports.get(target).warm()

    def preconnect_run(self, run_id: str) -> None:
        """:meth:`preconnect` to the host of a recorded run (if any)."""
        rec = self.records.get(run_id)
        if rec is not None and not is_local(rec.host):
            self.transport_for(rec).warm()

    # Records -------------------------------------------------------------------

    def record(self, run_id: Union[str, Run]) -> Record:
        """The record of ``run_id`` (a unique prefix of it is enough)."""
        if isinstance(run_id, Run):
            run_id = run_id.id
        if not isinstance(run_id, str) or not run_id:
            raise UsageError("invalid run id %r" % (run_id,))
        rec = self.records.get(run_id)
        if rec is not None:
            return rec
        agent = agent_module()
        if any(c in run_id for c in "/\0") or len(run_id) > 128:
            try:
                agent.check_id(run_id)
            except agent.AgentError as e:
                raise UsageError(str(e)) from None
        found = self.records.resolve(run_id)
        if len(found) == 1:
            return self.records.get(found[0])
        if len(found) > 1:
            raise UsageError("run id %s is ambiguous: %s%s" % (
                run_id, ", ".join(found[:5]), " ..." if len(found) > 5 else ""))
        raise NoSuchRun("no such run: %s (chaperone ps -a lists the runs recorded here)" % run_id)

    def get(self, run_id: str) -> Run:
        """The run ``run_id`` (or a unique prefix of it), as recorded: no I/O."""
        return Run(self, self.record(run_id))

    def runs(self, *, host: Optional[str] = None, state: Optional[str] = None) -> List[Run]:
        """Recorded runs, oldest first (records only, no I/O)."""
        return [Run(self, r) for r in self.records.all()
                if (host is None or r.host == host) and (state is None or r.state == state)]

    def client(self, run_id: str) -> AgentClient:
        """Agent commands to the host of ``run_id``."""
        return AgentClient(self.transport_for(self.record(run_id)))

    @staticmethod
    def _typed(state: Mapping) -> "RunState":
        """A state dict from an agent as a RunState (strict)."""
        from .models import RunState

        return state if isinstance(state, RunState) else RunState.model_validate(dict(state))

    # Starting --------------------------------------------------------------------

    def program_spec(self, argv: Sequence[str], *, run_id: Optional[str] = None, cwd: Optional[str] = None,
                     env: Optional[Mapping[str, Optional[str]]] = None, timeout: Optional[float] = None,
                     stdin: Optional[bytes] = None, stdin_path: Optional[str] = None,
                     callback: Optional[dict] = None, config: Optional[dict] = None,
                     shell: bool = False, stdin_stream: bool = False,
                     tty: "Union[bool, Mapping, None]" = None) -> dict:
        """A validated program.json (``chaperone.models.ProgramSpec`` as a
        dict, defaults filled in).  ``shell``: ``argv`` is one shell command
        line, for the login shell on the host; ``stdin_stream``: the input
        comes as the program runs (``agent.py stdin``); ``tty``: see
        :meth:`start`."""
        if not argv:
            raise UsageError("no command given")
        stdin_spec = None
        if stdin_stream or (tty and stdin is None and stdin_path is None):
            # (a terminal's input stays open: what is typed later, by this
            # process or by another one attached, goes there: send_input)
            stdin_spec = {"stream": True}
        elif stdin is not None:
            stdin_spec = {"data": base64.b64encode(stdin).decode()}
        elif stdin_path is not None:
            stdin_spec = {"path": stdin_path}
        cfg = {**self.config, **(config or {})}
        if timeout is not None:
            try:
                cfg["timeout"] = float(timeout)
            except (TypeError, ValueError):
                raise UsageError("timeout must be a number of seconds, not %r" % (timeout,)) from None
        doc = {
            "id": run_id or new_run_id(),
            "program": {"argv": list(argv), "cwd": cwd, "env": dict(env or {}), "stdin": stdin_spec,
                        "shell": bool(shell), "tty": terminal(tty)},
            "callback": callback,
            "config": cfg,
        }
        agent = agent_module()
        try:
            return agent.validate_spec(doc)
        except agent.AgentError as e:
            message = str(e)
            raise UsageError(message if message.startswith("invalid ") else "invalid " + message) from None

    @staticmethod
    def _argv(command: Command) -> "tuple[List[str], bool, str]":
        """``(argv, shell, display)``: a string is a shell command line (the
        argv is that one string, for the login shell on the host: see
        ``program.shell``), a sequence an exact argv (never interpreted by a
        shell)."""
        if isinstance(command, str):
            if not command.strip():
                raise UsageError("no command given")
            return [command], True, command
        argv = list(command)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise UsageError("the command must be a string (a shell command line) or a list of strings (argv)")
        return argv, False, shlex.join(argv)

    def _register(self, target: Target, spec: dict, shell: bool, display: str,
                  group: Optional[str]) -> Record:
        run_id, argv = spec["id"], spec["program"]["argv"]
        if group is None and not self.records.exists(run_id) and self.records.db.execute(
                "SELECT 1 FROM runs WHERE grp = ? LIMIT 1", (run_id,)).fetchone():
            raise UsageError("%s is already the id of a group of runs: choose another run id" % run_id)
        rec = self.records.add(run_id, target.name, target.describe(), argv, command=display, shell=shell,
                               group=group)
        if rec.argv != argv or rec.host != target.name:
            raise UsageError("run id %s is already used by another run" % run_id)
        if rec.state == "failed":  # it never started: this start is its first
            self.records.restart(run_id)
            rec = self.records.get(run_id)
        return rec  # (the same run again: start is idempotent)

    async def _prepare(self, host, command: Command, ssh, group, kw) -> "tuple[Target, Transport, dict, bool]":
        if self._closed:
            raise ChaperoneError("this Chaperone was closed: it starts nothing (open() it again, or use a new one)")
        argv, shell, display = self._argv(command)
        target = self.target(host, **(ssh or {}))
        transport = self.transports.get(target)
        run_id = kw.pop("run_id", None) or kw.pop("id", None) or new_run_id()
        spec = self.program_spec(argv, run_id=run_id, shell=shell, **kw)
        if self.push is not None:
            self.push.check_config(spec["config"])
        rec = self._register(target, spec, shell, display, group)
        existed = rec.last is not None
        if self.push is not None and kw.get("callback") is None and not (existed and self.push.knows(run_id)):
            try:
                spec["callback"] = await self.push.callback(run_id, transport, target.local)
            except BaseException as e:
                self._start_failed(run_id, e)
                raise
            spec = self.program_spec(argv, run_id=run_id, shell=shell, **{**kw, "callback": spec["callback"]})
        return target, transport, spec, existed

    def _landed(self, run_id: str, answer: asyncio.Future) -> None:
        """The answer of a start whose caller was cancelled: recorded."""
        if answer.cancelled():
            self.records.mark(run_id, "unknown", "the start was cut short (cancelled)")
        elif answer.exception() is not None:
            self._start_failed(run_id, answer.exception())
        else:
            self.records.update(run_id, answer.result())

    def _start_failed(self, run_id: str, error: BaseException) -> None:
        """The start did not go through: ``failed`` if it never reached the
        host (nothing ran), ``unknown`` if the connection broke after the
        program.json was sent, or the start was cut short by anything else
        (cancelled, a bug): the next look at the host decides; never left
        ``starting``."""
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            self.records.mark(run_id, "unknown", "the start was interrupted before its host answered (if it "
                                                 "got there, it runs: the next look at the host says)")
            return
        if not isinstance(error, ChaperoneError):
            what = type(error).__name__ + (": %s" % error if str(error) else "")
            self.records.mark(run_id, "unknown", "the start was cut short (%s)" % what)
            return
        never_reached = isinstance(error, (ConnectFailed, UsageError)) or not isinstance(error, ConnectionLost)
        self.records.mark(run_id, "failed" if never_reached else "unknown", str(error))

    async def start(self, host: Union[str, Target], command: Command, *, id: Optional[str] = None,
                    cwd: Optional[str] = None, env: Optional[Mapping[str, Optional[str]]] = None,
                    timeout: Optional[float] = None, stdin: "Optional[feed.Source]" = None,
                    stdin_path: Optional[str] = None, config: Optional[dict] = None,
                    ssh: Optional[dict] = None, group: Optional[str] = None, callback: Optional[dict] = None,
                    tty: "Union[bool, Mapping, None]" = None, **kw) -> Run:
        """Start ``command`` on ``host`` and return at once (it runs detached).

        ``command``: a string is a shell command line, run by the user's
        login shell on the host (as ``ssh HOST 'CMD'``: ``SHELL -c CMD``);
        a list is an exact argv, never interpreted by a shell.
        ``id``: the run id (default: new); starting an id again is harmless
        (the same run).  ``cwd`` (default: the home directory on the host),
        ``env`` (set a string, unset None), ``timeout`` (seconds; then
        SIGTERM, SIGKILL after ``config["kill_grace"]``), ``stdin``: the
        program's input (default none: /dev/null), as bytes (up to 1 MiB
        they go with the start, more are streamed) or as a stream (an async
        iterable of bytes, an asyncio.StreamReader: see
        :mod:`chaperone.feed`), sent while the program runs, from this
        process, across dropped connections (:meth:`Run.stdin_sent`
        waits until it is all there); or ``stdin_path`` (a file on the
        host), ``config`` (see
        ``chaperone.models.Config``), ``ssh`` (settings for this host: see
        :meth:`target`), ``callback`` (``program.json``'s callback, for an
        endpoint of your own; ``push=True`` makes one), ``tty``: run it on
        a pseudo-terminal on the host, as ``ssh -t`` does (True: the size of
        this process's terminal, else 24x80, and its TERM; or
        ``{"rows", "cols", "term"}``): what it writes is spooled as stdout,
        ``stdin`` is what is typed, :meth:`resize` changes the window.  A
        start that never reached the host raises and is recorded ``failed``."""
        run_id = id or kw.pop("run_id", None)
        on_reconnect = kw.pop("on_reconnect", None)
        if kw:
            raise TypeError("start() got unexpected keyword arguments: %s" % ", ".join(sorted(kw)))
        stdin, source = _input(stdin)
        target, transport, spec, existed = await self._prepare(
            host, command, ssh, group, dict(run_id=run_id, cwd=cwd, env=env, timeout=timeout, stdin=stdin,
                                            stdin_path=stdin_path, config=config, callback=callback,
                                            stdin_stream=source is not None, tty=tty))
        run_id = spec["id"]
        answer = self._batcher(transport).enqueue(json.dumps(spec).encode())
        try:
            state = await asyncio.shield(answer)
        except asyncio.CancelledError:
            # The start is on its way and goes on (the batch sends it): its
            # answer is recorded when it comes; ``starting`` until then.
            answer.add_done_callback(lambda f: self._landed(run_id, f))
            raise
        except BaseException as e:
            self._start_failed(run_id, e)
            raise
        self.records.update(run_id, state)
        if source is not None:
            self._feed(run_id, source, on_reconnect)
        if self.push is not None and self.push.knows(run_id):
            await self.push.on_state(run_id, state)
            if existed and state.get("state") not in FINAL_STATES:
                # Started before, by another process: its agent calls back
                # with the token it was given then; give it ours.
                try:
                    await self.push.rewire(run_id)
                except ChaperoneError:
                    pass
        return self.get(run_id)

    async def input_status(self, run_id: str) -> "Optional[StdinAck]":
        """What the host holds of a run's input, when it reads a stream
        (:class:`~chaperone.models.StdinAck`: bytes held, whether it ended,
        whether the run is over, whether it is a terminal's); None when its
        input is not a stream (/dev/null, a file, bytes given at the start)."""
        from .client import AGENT_NOT_A_STREAM
        from .errors import AgentFailed
        from .models import StdinAck

        rec = self.record(run_id)
        self._never_started(rec)
        try:
            call = await self.client(rec.id).open_stdin(rec.id)
        except NoSuchRun:
            raise self._gone(rec) from None
        try:
            answer = await call.answer()
        except AgentFailed as e:
            if e.agent_code == AGENT_NOT_A_STREAM:
                return None
            raise
        finally:
            call.close()
        if answer is None:
            raise ConnectionLost("the stdin call to run %s ended early" % rec.id)
        return StdinAck.model_validate(answer)

    def send_input(self, run_id: str, source: "feed.Source", *,
                   on_reconnect: Optional[Callable[[Exception, float], None]] = None) -> asyncio.Task:
        """Send ``source`` to a running program's input, after what it was
        given so far (a run whose stdin is a stream: started with a stream
        as ``stdin``, or on a terminal: ``tty``), as :meth:`start` sends
        it: across dropped connections, each byte once; its end, if it
        ends, is the input's end.  For a run another process started (say
        ``chaperone attach``).  A task: the bytes the host holds in the end."""
        rec = self.record(run_id)
        self._never_started(rec)
        feed.check_source(source)
        return self._feed(rec.id, source, on_reconnect, append=True)

    def _feed(self, run_id: str, source, on_reconnect=None, append: bool = False) -> asyncio.Task:
        """Send ``source`` as the input of ``run_id`` in the background
        (:class:`chaperone.feed.Feeder`)."""
        old = self._feeders.get(run_id)
        if old is not None and not old.done():
            return old
        sender = feed.Feeder(lambda: self.client(run_id), run_id, source, on_reconnect=on_reconnect, append=append)
        task = self._feeders[run_id] = asyncio.ensure_future(sender.run())

        def done(task):
            if not task.cancelled() and task.exception() is not None:
                import logging

                logging.getLogger("chaperone").warning("chaperone: the input of run %s: %s", run_id,
                                                       task.exception())

        task.add_done_callback(done)
        return task

    def _batcher(self, transport: Transport) -> _StartBatcher:
        batcher = self._batchers.get(id(transport))
        if batcher is None:
            batcher = self._batchers[id(transport)] = _StartBatcher(AgentClient(transport))
        return batcher

    async def run(self, host: Union[str, Target], command: Command, *,
                  on_reconnect: Optional[Callable[[Exception, float], None]] = None, **kw) -> AsyncIterator[Event]:
        """Start ``command`` on ``host`` and stream its events until its end
        (the foreground of ``chaperone run``): its first state (with its
        ``id``), output as written, states, :class:`~chaperone.protocol.End`.
        Reconnects when the connection breaks; takes :meth:`start`'s options."""
        if self.push is not None:
            run = await self.start(host, command, **kw)
            async for event in self.events(run.id, on_reconnect=on_reconnect):
                yield event
            return
        ssh, group = kw.pop("ssh", None), kw.pop("group", None)
        kw.setdefault("run_id", kw.pop("id", None))
        kw["stdin"], source = _input(kw.get("stdin"))
        kw["stdin_stream"] = source is not None
        target, transport, spec, _ = await self._prepare(host, command, ssh, group, kw)
        program = json.dumps(spec).encode()
        run_id = spec["id"]
        offsets = {s: 0 for s in STREAMS}
        events = self._run_events(run_id, transport, program, offsets, on_reconnect, source)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            feeder = self._feeders.get(run_id) if source is not None else None
            if feeder is not None and not feeder.done():
                feeder.cancel()  # (the run is over, or this process lets go of it)

    async def _run_events(self, run_id, transport, program, offsets, on_reconnect, source) -> AsyncIterator[Event]:
        """run()'s events: the start and its follow, then follows again
        after a dropped connection; the input sent once it started."""
        started = False
        final = None  # (a final state is given once, after the output, just before End)
        try:
            events = AgentClient(transport).start_follow(program)
            try:
                async for event in events:
                    if isinstance(event, StateUpdate):
                        started = True
                        self.records.update(run_id, event.state)
                        if source is not None and not event.final:
                            self._feed(run_id, source)  # (quiet: the follow tells of a lost connection)
                        if event.final:  # (the start's answer may be final already: its output follows it)
                            final = event
                            continue
                    elif isinstance(event, OutputChunk):
                        offsets[event.stream] = event.offset + len(event.data)
                    if isinstance(event, End) and final is not None:
                        yield final
                    yield event
                    if isinstance(event, End):
                        return
            finally:
                await events.aclose()  # frees the channel now, not when collected
        except ConnectionLost as e:
            if not started:
                self.records.mark(run_id, "unknown", str(e))
            if on_reconnect:
                on_reconnect(e, 0.0)
        except BaseException as e:  # (ChaperoneError, or cut short: cancelled, a bug)
            if not started:
                self._start_failed(run_id, e)
            raise
        async for event in self._follow(run_id, offsets, on_reconnect=on_reconnect, restart=program):
            if source is not None and isinstance(event, StateUpdate) and not event.final:
                self._feed(run_id, source)
            yield event

    # Watching ------------------------------------------------------------------

    def _never_started(self, rec: Record) -> None:
        if rec.state == "failed":
            raise StartFailed("run %s never started: %s" % (rec.id, rec.error or "its start failed"))

    async def status(self, run_id: str) -> "RunState":
        """The run's state, read from its spool on its host now."""
        rec = self.record(run_id)
        self._never_started(rec)
        try:
            state = await self.client(rec.id).status(rec.id)
        except NoSuchRun:
            raise self._gone(rec) from None
        self.records.update(rec.id, state)
        if self.push is not None and self.push.knows(rec.id):
            await self.push.on_state(rec.id, state)
        return self._typed(state)

    def _gone(self, rec: Record) -> ChaperoneError:
        """The error for a recorded run its host does not know (recorded
        ``failed`` or ``lost``; a start that may still be on its way, left
        ``starting``)."""
        import time

        if start_in_flight(rec.state, rec.created, time.time()):
            return StartPending("run %s is starting: its host does not have it yet (its start may still be on its "
                                "way, from this process or another one; if none is sending it any more, it is "
                                "settled as failed %d s after it was recorded: look again then)"
                                % (rec.id, START_GRACE))
        if rec.state in ("starting", "unknown"):
            reason = "its start never reached %s" % rec.host + (": %s" % rec.error if rec.error else "")
            self.records.mark(rec.id, "failed", reason)
            return StartFailed("run %s never started: %s" % (rec.id, reason))
        reason = "its spool on %s was removed" % rec.host
        self.records.mark(rec.id, "lost", reason)
        return NoSuchRun("run %s: %s (chaperone clean %s forgets it)" % (rec.id, reason, rec.id))

    def events(self, run_id: str, offsets: Optional[Dict[str, int]] = None, *,
               on_reconnect: Optional[Callable[[Exception, float], None]] = None,
               reconnect_for: float = 3600.0) -> AsyncIterator[Event]:
        """Output and state events of a run from ``offsets`` (each byte once,
        in order) until its final state and :class:`~chaperone.protocol.End`;
        reconnects with backoff when the connection breaks, for up to
        ``reconnect_for`` seconds at a time (``on_reconnect(error,
        delay)`` is told each time)."""
        offsets = _offsets(offsets)
        rec = self.record(run_id)
        self._never_started(rec)
        if self.push is not None and self.push.knows(rec.id):
            return self.push.events(rec.id, offsets)
        return self._follow(rec.id, offsets, on_reconnect=on_reconnect, reconnect_for=reconnect_for)

    async def _follow(self, run_id: str, offsets: Optional[Dict[str, int]] = None, *,
                      on_reconnect: Optional[Callable[[Exception, float], None]] = None,
                      reconnect_for: float = 3600.0, restart: Optional[bytes] = None,
                      via: Optional[Callable[[AgentClient, Dict[str, int]], AsyncIterator[Event]]] = None,
                      skips: bool = False) -> AsyncIterator[Event]:
        """:meth:`events` over SSH: the agent's ``follow`` (or ``via(client,
        offsets)``: another call of frames, resumed at ``offsets``;
        ``skips``: a stream may start past its offset, as ``logs --since``)."""
        offsets = dict(offsets or {s: 0 for s in STREAMS})
        delay = 0.25
        loop = asyncio.get_running_loop()
        give_up = loop.time() + reconnect_for
        while True:
            client = self.client(run_id)
            try:
                if restart is not None and not self.records.get(run_id).last:
                    events = client.start_follow(restart)  # it may never have started
                elif via is not None:
                    events = via(client, dict(offsets))
                else:
                    events = client.follow(run_id, offsets)
                try:
                    async for event in events:
                        if isinstance(event, OutputChunk):
                            have = offsets[event.stream]
                            end = event.offset + len(event.data)
                            if end <= have:
                                continue
                            if event.offset > have:
                                if not skips:
                                    raise ChaperoneError("output gap in %s at %d" % (event.stream, have))
                                have = event.offset
                            event = OutputChunk(event.stream, have, event.data[have - event.offset:])
                            offsets[event.stream] = end
                        elif isinstance(event, StateUpdate):
                            self.records.update(run_id, event.state)
                        yield event
                        if isinstance(event, End):
                            return
                        delay = 0.25
                        give_up = loop.time() + reconnect_for
                finally:
                    await events.aclose()  # frees the channel now, not when collected
            except NoSuchRun:
                raise self._gone(self.records.get(run_id)) from None
            except ChaperoneError as e:
                # A broken connection, or a reconnect that could not connect
                # (yet: refused, timed out, no route): the host may come back.
                # Anything else (host key, login, no such run) is final.
                if not (isinstance(e, ConnectionLost) or getattr(e, "transient", False)):
                    raise
                if loop.time() + delay > give_up:
                    raise
                if on_reconnect:
                    on_reconnect(e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def wait(self, run_id: str, *, timeout: Optional[float] = None,
                   on_reconnect: Optional[Callable[[Exception, float], None]] = None) -> "RunState":
        """The run's final state, once it ended (with push: once all its
        output is held here too).  ``timeout``: seconds, then
        :class:`asyncio.TimeoutError`; reconnects meanwhile."""
        rec = self.record(run_id)
        self._never_started(rec)
        if rec.final and (self.push is None or not self.push.knows(rec.id)):
            if rec.last and rec.last.get("state") in FINAL_STATES:
                return self._typed(rec.last)
            # marked final here (its spool is gone): its host cannot say more
            raise NoSuchRun("run %s: %s" % (rec.id, rec.error or rec.state))

        async def until_end() -> dict:
            if self.push is not None and self.push.knows(rec.id):
                return await self.push.wait(rec.id)
            try:
                return await self._watcher(rec).wait(rec.id, on_reconnect=on_reconnect)
            except NoSuchRun:
                raise self._gone(self.records.get(rec.id)) from None

        state = await (until_end() if timeout is None else asyncio.wait_for(until_end(), timeout))
        return self._typed(state)

    def _watcher(self, rec: Record) -> HostWatcher:
        """The one watcher of the waits on ``rec``'s host."""
        transport = self.transport_for(rec)
        watcher = self._watchers.get(id(transport))
        if watcher is None or watcher.client.transport is not transport:
            watcher = self._watchers[id(transport)] = HostWatcher(
                transport, on_final=lambda run_id, state: self.records.update(run_id, state))
        return watcher

    async def read(self, run_id: str, stream: str = "stdout", offset: int = 0,
                   length: Optional[int] = None) -> bytes:
        """Bytes of the run's output held now (from its spool; with push,
        what the local mirror holds if it holds that much), in memory:
        :meth:`output` streams any size."""
        if stream not in STREAMS:
            raise UsageError("unknown stream %r: stdout or stderr" % stream)
        if offset < 0 or (length is not None and length < 0):
            raise UsageError("offset and length must be >= 0 (got %r, %r)" % (offset, length))
        rec = self.record(run_id)
        self._never_started(rec)
        if self.push is not None and self.push.knows(rec.id):
            mirror = self.push.mirror(rec.id)
            if length is not None and mirror.held(stream) >= offset + length:
                return mirror.read(stream, offset, length)
        try:
            return await self.client(rec.id).output(rec.id, stream, offset, length)
        except NoSuchRun:
            raise self._gone(rec) from None

    async def output(self, run_id: str, stream: str = "stdout", offset: int = 0, *,
                     follow: bool = False) -> AsyncIterator[bytes]:
        """The run's output from ``offset``, in chunks as they arrive: what
        it holds now, or with ``follow`` until its end.  The same bytes
        however they reach this process (SSH or push)."""
        if stream not in STREAMS:
            raise UsageError("unknown stream %r: stdout or stderr" % stream)
        _offsets({stream: offset})  # (a negative offset: a usage error, before any call, in every mode)
        rec = self.record(run_id)
        self._never_started(rec)
        if self.push is not None and self.push.knows(rec.id) and follow:
            async for data in self.push.output(rec.id, stream, offset):
                yield data
            return
        if follow:
            offsets = {s: SKIP_OUTPUT[s] for s in STREAMS}
            offsets[stream] = offset
            async for event in self._follow(rec.id, offsets):
                if isinstance(event, OutputChunk) and event.stream == stream:
                    yield event.data
            return
        try:
            async for data in self.client(rec.id).output_stream(rec.id, stream, offset):
                yield data
        except NoSuchRun:
            raise self._gone(rec) from None

    async def output_to(self, run_id: str, stream: str, fd: int, offset: int = 0) -> int:
        """What :meth:`output` yields without ``follow`` (the output held
        now), written to the file descriptor ``fd`` (blocking writes), from
        the SSH client's pipe straight to ``fd`` where it can: the plain
        fast path of ``chaperone logs --stdout ID > file``.  The number of
        bytes written."""
        if stream not in STREAMS:
            raise UsageError("unknown stream %r: stdout or stderr" % stream)
        rec = self.record(run_id)
        self._never_started(rec)
        try:
            return await self.client(rec.id).output_to(rec.id, stream, fd, offset)
        except NoSuchRun:
            raise self._gone(rec) from None

    async def output_both_to(self, run_id: str, fds: Dict[str, int]) -> Dict[str, int]:
        """:meth:`output_to` of both streams in one call to the host, each
        to its file descriptor (``{"stdout": 1, "stderr": 2}``): the plain
        path of ``chaperone logs ID > file``.  The bytes of each."""
        rec = self.record(run_id)
        self._never_started(rec)
        try:
            return await self.client(rec.id).output_both_to(rec.id, fds)
        except NoSuchRun:
            raise self._gone(rec) from None

    def logs(self, run_id: str, streams: Sequence[str] = STREAMS, *, offsets: Optional[Dict[str, int]] = None,
             since: Optional[float] = None, follow: bool = False,
             on_reconnect: Optional[Callable[[Exception, float], None]] = None) -> AsyncIterator[Event]:
        """The run's output in the order it was written, from its spool (its
        timeline: docs/protocol.md): :class:`~chaperone.protocol.Written`
        (when the output after it was written; its ``time`` None for a run
        an older agent started, whose streams come one after the other),
        :class:`~chaperone.protocol.OutputChunk` of ``streams`` from
        ``offsets``, the state, :class:`~chaperone.protocol.End`.
        ``since``: only what was written from then on (seconds since the
        epoch); ``follow``: until the run's end, reconnecting as
        :meth:`events` does.  The same with push (the spool holds the
        timeline)."""
        for stream in streams:
            if stream not in STREAMS:
                raise UsageError("unknown stream %r: stdout or stderr" % stream)
        rec = self.record(run_id)
        self._never_started(rec)
        given = _offsets(offsets)
        start = {s: given[s] if s in streams else SKIP_OUTPUT[s] for s in STREAMS}
        return self._follow(rec.id, start, on_reconnect=on_reconnect, skips=since is not None,
                            via=lambda client, at: client.logs(rec.id, at, since=since, follow=follow))

    async def refresh(self, run_ids: Optional[Sequence[str]] = None, *,
                      timeout: float = 20.0) -> Dict[str, Optional[str]]:
        """Re-read unfinished runs (all of them, or ``run_ids``) from their
        hosts, one call per host, all hosts at once, each bounded by
        ``timeout`` seconds.  Returns ``{host: None or why it could not be
        reached}``."""
        _, reached = await self._refresh(run_ids, timeout)
        return reached

    async def _refresh(self, run_ids: Optional[Sequence[str]],
                       timeout: float) -> "tuple[set, Dict[str, Optional[str]]]":
        """:meth:`refresh`, and the ids of the runs it re-read.  (Two runs
        on hosts of one name reached two ways, say through two SSH configs,
        are two calls: the name is unreachable if either could not be
        reached, and only the other's runs are fresh.)"""
        by_host: Dict[str, List[Record]] = {}
        for rec in (self.records.all() if run_ids is None else (self.record(r) for r in run_ids)):
            if rec.state in FINAL_STATES:
                continue
            by_host.setdefault(json.dumps(rec.transport, sort_keys=True), []).append(rec)

        async def one(recs: List[Record]) -> Optional[str]:
            client = AgentClient(self.transport_for(recs[0]))
            try:
                states = {s["id"]: s for s in await asyncio.wait_for(client.list(), timeout)
                          if isinstance(s, dict) and "id" in s}
            except (ChaperoneError, asyncio.TimeoutError) as e:
                return str(e) or "timed out after %g s" % timeout
            for rec in recs:
                if rec.id in states and "state" in states[rec.id]:
                    self.records.update(rec.id, states[rec.id])
                elif rec.id not in states:
                    self._gone(rec)
            return None

        hosts = list(by_host.values())
        results = await asyncio.gather(*(one(recs) for recs in hosts))
        reached: Dict[str, Optional[str]] = {}
        fresh = set()
        for recs, why in zip(hosts, results):
            if why is None:
                fresh |= {rec.id for rec in recs}
            if why is not None or recs[0].host not in reached:
                reached[recs[0].host] = why
        return fresh, reached

    # Acting --------------------------------------------------------------------

    async def signal(self, run_id: str, sig: Union[str, int] = "SIGTERM",
                     grace: Optional[float] = None) -> "RunState":
        """Send ``sig`` to the run's whole process tree, each process once;
        with ``grace``, SIGKILL follows after that many seconds if it is
        still running."""
        name = check_signal(sig)
        rec = self.record(run_id)
        self._never_started(rec)
        try:
            state = await self.client(rec.id).signal(rec.id, name, grace)
        except NoSuchRun:
            raise self._gone(rec) from None
        self.records.update(rec.id, state)
        return self._typed(state)

    async def processes(self, run_id: str) -> "List[Process]":
        """The run's processes on its host now, as ``docker top`` lists them:
        while its supervisor lives, every process below it (the program, its
        children, and those that left its process group: the supervisor is
        their subreaper); once it has ended, what it left running in its
        process group.  The program first, then by pid."""
        from .models import Process

        rec = self.record(run_id)
        self._never_started(rec)
        try:
            procs = await self.client(rec.id).procs(rec.id)
        except NoSuchRun:
            raise self._gone(rec) from None
        return [Process.model_validate(p) for p in procs]

    async def resize(self, run_id: str, rows: int, cols: int) -> bool:
        """A new window size for the terminal of a run started with ``tty``
        (its program gets SIGWINCH); False when the run no longer reads it
        (it ended)."""
        for n in (rows, cols):
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 65535:
                raise UsageError("a window size is two integers from 1 to 65535, not %r x %r" % (rows, cols))
        rec = self.record(run_id)
        self._never_started(rec)
        msg = json.dumps({"op": "resize", "rows": rows, "cols": cols}).encode()
        try:
            answer = await self.client(rec.id).control(rec.id, msg)
        except NoSuchRun:
            raise self._gone(rec) from None
        return bool(answer.get("delivered"))

    async def clean(self, run_id: str, force: bool = False) -> None:
        """Remove the run's spool on its host and its record here (a run
        that never started has nothing on a host: only the record)."""
        rec = self.record(run_id)
        if rec.state != "failed":
            try:
                await self.client(rec.id).clean(rec.id, force)
            except NoSuchRun:
                pass  # already gone there
        self.forget(rec.id)

    def forget(self, run_id: str) -> None:
        """Drop the run's record here, without reaching its host (its spool
        there, if any, stays: for a host gone for good; :meth:`clean`
        removes both)."""
        rec = self.record(run_id)
        if self.push is not None:
            self.push.forget(rec.id)
        self.records.remove(rec.id)

    async def reattach(self) -> List[str]:
        """After a restart: take back every unfinished recorded run.  With
        push: new token, new callback address, catch-up from its spool;
        without: its state re-read.  A host that cannot be reached does
        not stop the others (its runs stay as they are, for a later try)."""
        ids = []
        for rec in list(self.records.all()):
            if rec.state in FINAL_STATES:
                continue
            try:
                if self.push is not None:
                    await self.push.open()
                    await self.push.adopt(rec.id, rec.last)
                else:
                    await self.status(rec.id)
            except ChaperoneError:
                continue
            ids.append(rec.id)
        return ids

    # Many hosts: chaperone/fleet/runs.py ---------------------------------------

    def run_many(self, hosts, command: Command, **kw) -> "ManyRuns":
        """``command`` on many hosts (a pattern, an inventory, hosts or
        Targets): one run per host, one group; ``async for`` gives a
        HostRun per host as each ends.  See :mod:`chaperone.fleet.runs`."""
        from .fleet.runs import ManyRuns

        return ManyRuns(self, hosts, command, **kw)

    def start_many(self, hosts, command: Command, **kw) -> "ManyRuns":
        """:meth:`run_many`, detached: a HostRun per host once its run started."""
        from .fleet.runs import ManyRuns

        return ManyRuns(self, hosts, command, detach=True, **kw)

    def group(self, group_id: str) -> List[Run]:
        """The recorded runs of a group, in natural order of their hosts."""
        from .fleet.runs import group_run_ids

        return [self.get(r) for r in group_run_ids(self, group_id)]


def window_size() -> "Optional[tuple[int, int]]":
    """(rows, cols) of this process's terminal (stdout's, else stdin's or
    stderr's), or None when it has none."""
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines and size.columns:
            return size.lines, size.columns
    return None


def terminal(tty: "Union[bool, Mapping, None]") -> Optional[dict]:
    """program.tty for start's ``tty``: None (no terminal); True: the
    size of this process's terminal (stdout's, else stdin's; 24x80 when it
    has none) and its TERM; a mapping as :class:`chaperone.models.Tty`."""
    if tty is None or tty is False:
        return None
    if tty is True:
        rows, cols = window_size() or (24, 80)
        return {"rows": rows, "cols": cols, "term": os.environ.get("TERM") or None}
    if isinstance(tty, Mapping):
        return {"term": None, **dict(tty)}
    raise UsageError("tty must be True, False, None or {'rows': R, 'cols': C, 'term': T}, not %r" % (tty,))


def _input(stdin) -> "tuple[Optional[bytes], object]":
    """``(bytes to send with program.json, or a stream to send as the
    program runs)`` for start's ``stdin``."""
    if stdin is None:
        return None, None
    data = feed.inline(stdin)
    if data is not None:
        return data, None
    feed.check_source(stdin)
    return None, stdin


def _ssh_settings(ssh: Mapping) -> dict:
    """SSH settings, also under their earlier names (``username``,
    ``client_keys``, ``root``)."""
    out = dict(ssh)
    for old, new in (("username", "user"), ("client_keys", "identities"), ("root", "spool")):
        if old in out:
            value = out.pop(old)
            if new not in out:
                out[new] = value
    if isinstance(out.get("identities"), str):
        out["identities"] = (out["identities"],)
    return out
