"""The library API: start, watch, signal, reconnect and clean up runs.

>>> async with Chaperone() as ch:
...     run = await ch.start("local", ["echo", "hello"])
...     async for event in ch.stream(run.id):
...         ...

Every run has a record (SQLite, ``$CHAPERONE_HOME/runs.db``) that says which
host it is on and how that host was reached, so any later process can
reconnect to it by id.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import secrets
import signal as _signal
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Dict, List, Mapping, Optional, Sequence

from .client import AgentClient
from .errors import ChaperoneError, ConnectionLost, NoSuchRun, UsageError
from .agent_source import agent_module
from .protocol import STREAMS, End, Event, OutputChunk, StateUpdate
from .records import Records, chaperone_home
from .transports.base import Transport
from .transports.local import LocalTransport

#: Follow offsets that skip all output (for ``wait``).
SKIP_OUTPUT = {"stdout": 1 << 62, "stderr": 1 << 62}


def new_run_id() -> str:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def exit_code_for(state: Mapping) -> int:
    """The shell-like exit status for a final state: the program's code,
    ``128+N`` when killed by signal N, 127/126 when it could not be started,
    255 when chaperone lost it."""
    if state.get("state") == "done":
        if state.get("signal"):
            try:
                return 128 + int(_signal.Signals[state["signal"]])
            except KeyError:
                return 255
        return int(state.get("return_code") or 0)
    if state.get("state") == "error":
        import errno

        return 127 if state.get("errno") in (errno.ENOENT, errno.ENOTDIR) else 126
    return 255


def parse_env(pairs: Sequence[str]) -> Dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or "\0" in pair:
            raise UsageError("bad environment setting %r: expected NAME=VALUE" % pair)
        env[name] = value
    return env


def check_signal(name: str) -> str:
    """Validate a signal name or number locally; returns the canonical name."""
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


class _StartBatcher:
    """Starts requested in the same turn of the event loop for one host go
    to the agent together: one channel and one Python start-up for all."""

    MAX = 256

    def __init__(self, client: AgentClient):
        self.client = client
        self.pending: list = []
        self.task: Optional[asyncio.Task] = None

    async def submit(self, program: bytes) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((program, fut))
        if self.task is None:
            self.task = asyncio.ensure_future(self._flush())
        return await fut

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


@dataclass
class Run:
    id: str
    host: str
    state: dict


class Chaperone:
    """Starts, watches, signals, reconnects to and cleans up runs."""

    def __init__(self, home: Optional[os.PathLike] = None, *, ssh_config: Optional[Sequence[str]] = None,
                 known_hosts: Optional[str] = None, check_host_keys: bool = True,
                 python: Optional[str] = None, ssh_client: str = "asyncssh"):
        if ssh_client not in ("asyncssh", "openssh"):
            raise UsageError("unknown ssh client %r: asyncssh or openssh" % ssh_client)
        self.home = chaperone_home(home)
        self._records: Optional[Records] = None
        self._transports: Dict[str, Transport] = {}
        self._batchers: Dict[int, _StartBatcher] = {}
        self.ssh_config = list(ssh_config or [])
        self.known_hosts = known_hosts
        self.check_host_keys = check_host_keys
        self.python = python
        #: "asyncssh": one connection per host carries many channels (for
        #: schedulers); "openssh": one ``ssh`` process per agent call, the
        #: cheapest for a one-shot command (the CLI's choice).
        self.ssh_client = ssh_client

    def _ssh_class(self, config: Sequence[str]):
        if self.ssh_client == "openssh" and len(config) <= 1:
            from .transports.ssh.via_openssh import OpenSSHTransport

            return OpenSSHTransport
        from .transports.ssh.via_asyncssh import SSHTransport

        return SSHTransport

    @property
    def records(self) -> Records:
        if self._records is None:
            self._records = Records(self.home / "runs.db")
        return self._records

    async def __aenter__(self) -> "Chaperone":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for transport in list(self._transports.values()):
            await transport.close()
        self._transports.clear()
        if self._records is not None:
            self._records.close()
            self._records = None

    # Transports -------------------------------------------------------------

    def transport(self, host: str, **ssh) -> Transport:
        """The transport to ``host`` ("local", or ``[user@]host`` over SSH);
        one per host per process."""
        key = json.dumps([host, sorted(ssh.items())])
        if key not in self._transports:
            if host == "local":
                self._transports[key] = LocalTransport(
                    python=self.python, root=str(self.home / "spool"))
            else:
                self._transports[key] = self._ssh_class(self.ssh_config)(
                    host, config=self.ssh_config, known_hosts=self.known_hosts,
                    check_host_keys=self.check_host_keys, python=self.python, **ssh)
        return self._transports[key]

    def preconnect(self, host: str, ssh: Optional[dict] = None) -> None:
        """Start connecting to ``host`` in the background now, where the
        transport can (the OpenSSH client's shared connection): the
        handshake then overlaps whatever the caller does before its first
        call."""
        if host != "local":
            self.transport(host, **(ssh or {})).warm()

    def preconnect_run(self, run_id: str) -> None:
        """:meth:`preconnect` to the host of a recorded run (if any)."""
        rec = self.records.get(run_id)
        if rec is not None and rec.host != "local":
            self._transport_for(rec).warm()

    def _transport_for(self, record) -> Transport:
        how = dict(record.transport)
        if how.get("host") == "local":
            key = json.dumps(["local@" + str(how.get("root")), []])
            if key not in self._transports:
                self._transports[key] = LocalTransport(python=how.get("python"), root=how.get("root"))
            return self._transports[key]
        key = json.dumps(["record", how])
        if key not in self._transports:
            config = (how.get("ssh") or {}).get("config") or ()
            self._transports[key] = self._ssh_class(config).from_description(how)
        return self._transports[key]

    def record(self, run_id: str):
        agent = agent_module()
        try:
            agent.check_id(run_id)
        except agent.AgentError as e:
            raise UsageError(str(e)) from None
        rec = self.records.get(run_id)
        if rec is None:
            raise NoSuchRun("no such run: %s" % run_id)
        return rec

    def client(self, run_id: str) -> AgentClient:
        return AgentClient(self._transport_for(self.record(run_id)))

    # Starting ------------------------------------------------------------------

    def program_spec(self, argv: Sequence[str], *, run_id: Optional[str] = None, cwd: Optional[str] = None,
                     env: Optional[Mapping[str, Optional[str]]] = None, timeout: Optional[float] = None,
                     stdin: Optional[bytes] = None, stdin_path: Optional[str] = None,
                     callback: Optional[dict] = None, config: Optional[dict] = None) -> dict:
        """A validated program.json (``chaperone.models.ProgramSpec`` as a
        dict, defaults filled in)."""
        if not argv:
            raise UsageError("no command given")
        stdin_spec = None
        if stdin is not None:
            stdin_spec = {"data": base64.b64encode(stdin).decode()}
        elif stdin_path is not None:
            stdin_spec = {"path": stdin_path}
        cfg = dict(config or {})
        if timeout is not None:
            cfg["timeout"] = float(timeout)
        doc = {
            "id": run_id or new_run_id(),
            "program": {"argv": list(argv), "cwd": cwd, "env": dict(env or {}), "stdin": stdin_spec},
            "callback": callback,
            "config": cfg,
        }
        agent = agent_module()
        try:
            return agent.validate_spec(doc)
        except agent.AgentError as e:
            raise UsageError("invalid %s" % e) from None

    def _register(self, host: str, transport: Transport, spec: dict) -> None:
        run_id, argv = spec["id"], spec["program"]["argv"]
        rec = self.records.get(run_id)
        if rec is not None:
            if rec.argv != argv or rec.host != host:
                raise UsageError("run id %s is already used by another run" % run_id)
            return  # the same run again: start is idempotent
        self.records.add(run_id, host, transport.describe(), argv)

    async def start(self, host: str, argv: Sequence[str], *, ssh: Optional[dict] = None, **kw) -> Run:
        """Start ``argv`` on ``host`` and return at once (detached).
        ``ssh``: connection settings for this host (port, username,
        client_keys ...), on top of the SSH config."""
        spec = self.program_spec(argv, **kw)
        transport = self.transport(host, **(ssh or {}))
        self._register(host, transport, spec)
        batcher = self._batchers.get(id(transport))
        if batcher is None:
            batcher = self._batchers[id(transport)] = _StartBatcher(AgentClient(transport))
        try:
            state = await batcher.submit(json.dumps(spec).encode())
        except ChaperoneError as e:
            self.records.mark(spec["id"], "failed", str(e))
            raise
        self.records.update(spec["id"], state)
        return Run(spec["id"], host, state)

    async def start_stream(self, host: str, argv: Sequence[str], *, ssh: Optional[dict] = None,
                           on_reconnect: Optional[Callable[[Exception, float], None]] = None,
                           **kw) -> AsyncIterator[Event]:
        """Start ``argv`` on ``host`` and stream its events until its end,
        reconnecting when the transport breaks.  The first event is the
        run's first state (with its ``id``)."""
        spec = self.program_spec(argv, **kw)
        transport = self.transport(host, **(ssh or {}))
        self._register(host, transport, spec)
        program = json.dumps(spec).encode()
        run_id = spec["id"]
        offsets = {s: 0 for s in STREAMS}
        started = False
        try:
            events = AgentClient(transport).start_follow(program)
            try:
                async for event in events:
                    if isinstance(event, StateUpdate):
                        started = True
                        self.records.update(run_id, event.state)
                    elif isinstance(event, OutputChunk):
                        offsets[event.stream] = event.offset + len(event.data)
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
        except ChaperoneError as e:
            if not started:
                self.records.mark(run_id, "failed", str(e))
            raise
        async for event in self.stream(run_id, offsets, on_reconnect=on_reconnect, restart=program):
            yield event

    # Watching ------------------------------------------------------------------

    async def status(self, run_id: str) -> dict:
        """The run's state, read from its spool over a fresh connection."""
        state = await self.client(run_id).status(run_id)
        self.records.update(run_id, state)
        return state

    async def stream(self, run_id: str, offsets: Optional[Dict[str, int]] = None, *,
                     on_reconnect: Optional[Callable[[Exception, float], None]] = None,
                     reconnect_for: float = 3600.0, restart: Optional[bytes] = None) -> AsyncIterator[Event]:
        """Output and state events of a run from ``offsets`` (each byte once,
        in order) until its final state; reconnects with backoff when the
        transport breaks, for up to ``reconnect_for`` seconds at a time."""
        offsets = dict(offsets or {s: 0 for s in STREAMS})
        delay = 0.25
        loop = asyncio.get_running_loop()
        give_up = loop.time() + reconnect_for
        while True:
            client = self.client(run_id)
            try:
                if restart is not None and not self.records.get(run_id).last:
                    events = client.start_follow(restart)  # it may never have started
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
                                raise ChaperoneError("output gap in %s at %d" % (event.stream, have))
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

    async def wait(self, run_id: str, **kw) -> dict:
        """Wait for the run's final state (no output is moved)."""
        state = None
        async for event in self.stream(run_id, SKIP_OUTPUT, **kw):
            if isinstance(event, StateUpdate):
                state = event.state
        return state

    async def output(self, run_id: str, stream: str = "stdout", offset: int = 0,
                     length: Optional[int] = None) -> bytes:
        """Bytes of the run's spooled output (held in memory: see output_stream)."""
        return await self.client(run_id).output(run_id, stream, offset, length)

    async def output_stream(self, run_id: str, stream: str = "stdout", offset: int = 0) -> AsyncIterator[bytes]:
        """The run's spooled output from ``offset`` to what it holds now, in
        chunks as they arrive (one call to the host, any size)."""
        async for chunk in self.client(run_id).output_stream(run_id, stream, offset):
            yield chunk

    # Acting --------------------------------------------------------------------

    async def signal(self, run_id: str, sig: str = "SIGTERM", grace: Optional[float] = None) -> dict:
        """Send ``sig`` to the run's whole process tree; with ``grace``,
        SIGKILL follows after that many seconds if it is still running."""
        name = check_signal(sig)
        state = await self.client(run_id).signal(run_id, name, grace)
        self.records.update(run_id, state)
        return state

    async def clean(self, run_id: str, force: bool = False) -> None:
        """Remove the run's spool on its host and its record here."""
        rec = self.record(run_id)
        try:
            await self.client(run_id).clean(run_id, force)
        except NoSuchRun:
            pass  # already gone there
        self.records.remove(rec.id)

    async def refresh_all(self) -> List[dict]:
        """Refresh every unfinished run from its host (one call per host)."""
        by_transport: Dict[str, list] = {}
        for rec in self.records.all():
            if rec.state in ("done", "error", "lost"):
                continue
            by_transport.setdefault(json.dumps(rec.transport, sort_keys=True), []).append(rec)
        for recs in by_transport.values():
            client = AgentClient(self._transport_for(recs[0]))
            try:
                states = {s["id"]: s for s in await client.list()}
            except ChaperoneError as e:
                for rec in recs:
                    self.records.mark(rec.id, rec.state, "cannot refresh: %s" % e)
                continue
            for rec in recs:
                if rec.id in states:
                    self.records.update(rec.id, states[rec.id])
                else:
                    self.records.mark(rec.id, "lost", "its spool is gone from %s" % rec.host)
        return [r.as_dict() for r in self.records.all()]
