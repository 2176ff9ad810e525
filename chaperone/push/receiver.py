"""Push: how a :class:`chaperone.Chaperone` made with ``push=True`` receives
updates.  Not a second library: the same verbs (``wait``, ``output``,
``events``), fed by the agents' HTTPS callbacks instead of SSH follows.

:class:`PushReceiver` serves the HTTPS callback endpoint (aiohttp, its own
certificate, pinned by each agent) and keeps a local mirror of every run's
output (``$CHAPERONE_HOME/mirror/<id>/``).  Two paths fill the mirror, both
by byte offset, so every byte lands exactly once:

* the agents' callbacks (live), through an SSH remote port forward on the
  host's connection by default (works behind NAT), or ``callback_url`` when
  hosts can reach this process directly;
* catch-up over SSH from the spool (:meth:`PushReceiver.catch_up`): after a
  tunnel came back, after a restart (``Chaperone.reattach``), and as the
  safety net of :meth:`PushReceiver.wait`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import shutil
from typing import AsyncIterator, Callable, Dict, List, Optional

from ..errors import ChaperoneError, NoSuchRun, StartPending, UsageError
from ..models import FINAL_STATES, STREAMS
from ..protocol import End, Event, OutputChunk, StateUpdate
from ..transports.base import Transport
from ..transports.target import is_local
from .endpoint import DEFAULT_MAX_BODY, CallbackServer
from .mirror import OutputMirror

#: Offsets at or past this skip a stream (chaperone.api.SKIP_OUTPUT).
SKIP = 1 << 62

#: Catch-up reads the spool this much at a time.
CATCH_UP_CHUNK = 8 << 20
log = logging.getLogger(__name__)


def _changed(old: dict, new: dict) -> bool:
    keys = ("state", "pid", "return_code", "signal", "error")
    return any(old.get(k) != new.get(k) for k in keys)


class PushReceiver:
    """The callback endpoint, the tunnels to it, the mirror and the last
    state of every run this process pushes for.  ``ch``: the
    :class:`chaperone.Chaperone` it belongs to (its records, home and agent
    calls)."""

    def __init__(self, ch, *, callback_url: Optional[str] = None, bind: str = "127.0.0.1",
                 port: int = 0, max_body: int = DEFAULT_MAX_BODY, heal_interval: float = 1.0,
                 on_update: Optional[Callable] = None, heartbeat: Optional[float] = None):
        self.ch = ch
        self.callback_url = callback_url
        self.bind = bind
        self.port = port
        self.heal_interval = heal_interval
        self.on_update = on_update
        #: Seconds between each agent's heartbeats (None: the agent's default).
        self.heartbeat = heartbeat
        #: Called with a run id after any new state or output of it.
        self.on_change: List[Callable[[str], None]] = []
        #: Called with ``(run_id, ok)`` after each catch-up from a spool.
        self.on_catch_up: List[Callable[[str, bool], None]] = []
        self.server = CallbackServer(max_body=max_body)
        self.states: Dict[str, dict] = {}
        self._changed: Dict[str, asyncio.Event] = {}
        self._tunnels: Dict[int, dict] = {}  # id(transport) -> {"tunnel", "task", "transport"}
        #: One tunnel made at a time per host: starts at once share it.
        self._tunnel_locks: Dict[int, asyncio.Lock] = {}
        self._runs: Dict[str, Transport] = {}  # runs pushing here -> their host's transport
        self._open = False
        self._closed = False  # (close() ends the waits in flight; open() again clears it)
        self._waiting = 0
        self._released: set = set()  # runs told to stop calling back
        self._to_release: Dict[int, tuple] = {}  # id(transport) -> (transport, run ids)
        self._releasing: Dict[int, asyncio.Task] = {}  # id(transport) -> its task, until done

    async def open(self) -> None:
        self._closed = False
        if not self._open:
            await self.server.start(self.bind, self.port, cert_dir=self.ch.home / "tls")
            self._open = True

    async def close(self) -> None:
        # Runs that ended with everything held here: their agents may still
        # be retrying a final callback whose answer was lost; tell them to stop
        # (best effort, bounded) rather than leave them trying for a day.
        for run_id in [r for r in self._runs if self._complete(r) is not None]:
            self.release_soon(run_id)
        pending = list(self._releasing.values())
        if pending:
            await asyncio.wait(pending, timeout=10.0)
            for task in pending:
                task.cancel()
        for tunnel in self._tunnels.values():
            tunnel["task"].cancel()
            tunnel["tunnel"].close()
        self._tunnels.clear()
        await self.server.stop()
        self._open = False
        self._closed = True
        for event in self._changed.values():  # (the waits in flight see it and raise)
            event.set()

    # State -------------------------------------------------------------------

    def mirror(self, run_id: str) -> OutputMirror:
        return OutputMirror(self.ch.home / "mirror" / run_id)

    def _event(self, run_id: str) -> asyncio.Event:
        return self._changed.setdefault(run_id, asyncio.Event())

    def wake(self, run_id: str) -> None:
        self._event(run_id).set()
        for hook in self.on_change:
            try:
                hook(run_id)
            except Exception:  # (a hook must never fail a delivery)
                log.warning("on_change hook failed", exc_info=True)

    async def on_state(self, run_id: str, state, final: bool = False) -> None:
        """A state arrived (a callback, a catch-up, an SSH call): record it,
        wake who waits, tell ``on_update``.  Final is final."""
        st = state if isinstance(state, dict) else state.model_dump()
        old = self.states.get(run_id)
        if old is not None and old["state"] in FINAL_STATES:
            return
        if old is not None and st["state"] not in FINAL_STATES and any(
                (st.get(k) or 0) < (old.get(k) or 0) for k in ("stdout_bytes", "stderr_bytes")):
            return  # (older than what is held: the start's answer after the first callbacks, say)
        self.states[run_id] = st
        self.ch.records.update(run_id, st)
        self.wake(run_id)
        if self.on_update is not None and (old is None or _changed(old, st)):
            try:  # (the scheduler's hook failing must not fail a start, a status or a delivery)
                result = self.on_update(run_id, self.ch._typed(st))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.warning("on_update hook failed for run %s", run_id, exc_info=True)

    def knows(self, run_id: str) -> bool:
        """Whether ``run_id`` pushes to this process."""
        return run_id in self._runs

    def tunnel(self, run_id: str):
        """The tunnel ``run_id``'s agent calls back through (None: none)."""
        tunnel = self._tunnels.get(id(self._runs.get(run_id)))
        return tunnel["tunnel"] if tunnel else None

    # Tunnels -------------------------------------------------------------------

    async def callback(self, run_id: str, transport: Transport, local: bool) -> dict:
        """``program.json``'s ``callback`` for a run about to start on
        ``transport``: its token (registered here) and the URL it reaches
        this endpoint at."""
        await self.open()
        self._runs[run_id] = transport
        token = self._register(run_id)
        url = await self._url_for(transport, local)
        callback = {"url": url, "token": token, "cert": self.server.cert_pem}
        if self.heartbeat is not None:
            callback["heartbeat"] = float(self.heartbeat)
        return callback

    async def _url_for(self, transport: Transport, local: bool) -> str:
        if self.callback_url:
            return self.callback_url
        if local:
            return self.server.url
        tunnel = await self._ensure_tunnel(transport)
        return self.server.base_url("127.0.0.1", tunnel["tunnel"].port)

    async def _ensure_tunnel(self, transport: Transport) -> dict:
        """The host's tunnel, made if there is none or it closed: by one
        caller at a time (starts submitted together all wait for the one
        it makes; each making its own would close the one before, under
        runs already given its port)."""
        lock = self._tunnel_locks.setdefault(id(transport), asyncio.Lock())
        async with lock:
            tunnel = self._tunnels.get(id(transport))
            if tunnel is None or tunnel["tunnel"].closed():
                transport.warm()  # the calls' connection logs in meanwhile, not after
                await self._open_tunnel(transport)
                tunnel = self._tunnels[id(transport)]
            return tunnel

    async def _open_tunnel(self, transport: Transport) -> None:
        new = await transport.forward_remote(self.server.port)
        old = self._tunnels.get(id(transport))
        if old is not None:
            old["tunnel"].close()
        task = old["task"] if old else asyncio.ensure_future(self._heal(transport))
        self._tunnels[id(transport)] = {"tunnel": new, "task": task, "transport": transport}

    async def _heal(self, transport: Transport) -> None:
        """When the tunnel's connection drops: reconnect, forward again, tell
        each unfinished run on that host its new address, and catch up."""
        while True:
            tunnel = self._tunnels.get(id(transport))
            if tunnel is None:
                return
            await tunnel["tunnel"].wait_closed()
            while True:
                await asyncio.sleep(self.heal_interval)
                try:
                    await self._ensure_tunnel(transport)
                    break
                except ChaperoneError:
                    continue
            for run_id in self._unfinished(transport):
                try:
                    await self.rewire(run_id)
                    await self.catch_up(run_id)
                except Exception as e:  # the next heal, or wait()'s safety net, tries again
                    log.warning("re-attaching run %s after a reconnect failed: %s", run_id, e)

    def _unfinished(self, transport: Transport) -> List[str]:
        return [r for r, t in self._runs.items()
                if t is transport and (self.states.get(r) or {}).get("state") not in FINAL_STATES]

    def _register(self, run_id: str) -> str:
        return self.server.register(run_id, self.mirror(run_id), on_state=self.on_state,
                                    on_output=lambda rid, stream, held: self.wake(rid))

    async def rewire(self, run_id: str) -> None:
        """Give the run's agent a fresh token and the current callback URL."""
        rec = self.ch.record(run_id)
        transport = self.ch.transport_for(rec)
        self._runs[run_id] = transport
        token = self._register(run_id)
        url = await self._url_for(transport, is_local(rec.host))
        message = json.dumps({"op": "callback", "url": url, "token": token, "cert": self.server.cert_pem})
        await self.ch.client(run_id).control(run_id, message.encode())

    async def adopt(self, run_id: str, last: Optional[dict]) -> None:
        """Take back a recorded run (after a restart): new token, new
        address, then catch-up from its spool.  Raises what went wrong;
        the run stays known, so a later heal or wait tries again."""
        if last:
            self.states.setdefault(run_id, last)
        self._runs.setdefault(run_id, self.ch.transport_for(self.ch.record(run_id)))
        try:
            await self.rewire(run_id)
        except ChaperoneError:
            pass  # catch_up below still reads the spool (a run that ended needs no callbacks)
        await self.catch_up(run_id)

    # Output and the end ------------------------------------------------------------

    async def catch_up(self, run_id: str) -> dict:
        """Read the run's state and any output the mirror lacks from its spool
        over SSH (appended by offset: never twice)."""
        try:
            state = await self._catch_up(run_id)
        except BaseException:
            self._caught_up(run_id, False)
            raise
        self._caught_up(run_id, True)
        return state

    def _caught_up(self, run_id: str, ok: bool) -> None:
        for hook in self.on_catch_up:
            try:
                hook(run_id, ok)
            except Exception:
                log.warning("on_catch_up hook failed", exc_info=True)

    async def _catch_up(self, run_id: str) -> dict:
        client = self.ch.client(run_id)
        state = await client.status(run_id)
        mirror = self.mirror(run_id)
        loop = asyncio.get_running_loop()
        for stream in STREAMS:
            while mirror.held(stream) < state[stream + "_bytes"]:
                held = mirror.held(stream)
                data = await client.output(run_id, stream, held, CATCH_UP_CHUNK)
                if not data:
                    break
                await loop.run_in_executor(None, mirror.append, stream, held, data)
                self.wake(run_id)
        await self.on_state(run_id, state, state["state"] in FINAL_STATES)
        return state

    def _complete(self, run_id: str) -> Optional[dict]:
        """The final state once the mirror holds all of the run's output."""
        st = self.states.get(run_id)
        if st and st["state"] in FINAL_STATES:
            mirror = self.mirror(run_id)
            if all(mirror.held(s) >= st.get(s + "_bytes", 0) for s in STREAMS):
                return st
        return None

    async def output(self, run_id: str, stream: str = "stdout", offset: int = 0) -> AsyncIterator[bytes]:
        """The run's output from ``offset`` as it arrives, to its end."""
        mirror = self.mirror(run_id)
        while True:
            event = self._event(run_id)
            event.clear()
            data = mirror.read(stream, offset, 1 << 20)
            if data:
                offset += len(data)
                yield data
                continue
            st = self.states.get(run_id)
            if st and st["state"] in FINAL_STATES and offset >= st.get(stream + "_bytes", 0):
                return
            try:
                await asyncio.wait_for(event.wait(), 5.0)
            except asyncio.TimeoutError:
                pass

    async def events(self, run_id: str, offsets: Optional[Dict[str, int]] = None) -> AsyncIterator[Event]:
        """Output and state events of a pushed run from ``offsets``, out of
        the mirror as the callbacks fill it, until its end (then
        :class:`~chaperone.protocol.End`); catch-up fills what they miss."""
        offsets = dict(offsets or {s: 0 for s in STREAMS})
        mirror = self.mirror(run_id)
        last = None
        while True:
            event = self._event(run_id)
            event.clear()
            moved = False
            for stream in STREAMS:
                if offsets.get(stream, 0) >= SKIP:
                    continue
                data = mirror.read(stream, offsets.get(stream, 0), 1 << 20)
                if data:
                    yield OutputChunk(stream, offsets.get(stream, 0), data)
                    offsets[stream] = offsets.get(stream, 0) + len(data)
                    moved = True
            st = self.states.get(run_id)
            if st is not None and st != last:
                last = st
                yield StateUpdate(st)
            complete = self._complete(run_id)
            if complete is not None and not moved and all(
                    offsets.get(s, 0) >= complete.get(s + "_bytes", 0) for s in STREAMS):
                self.release_soon(run_id)
                yield End()
                return
            if moved:
                continue
            try:
                await asyncio.wait_for(event.wait(), 30.0)
            except asyncio.TimeoutError:
                try:
                    await self.catch_up(run_id)
                except ChaperoneError:
                    pass

    def _safety_net(self) -> float:
        """Seconds without news before a wait reads the spool: two of the
        agents' heartbeats and 2 s (their default heartbeat: 15 s)."""
        return 2 * (self.heartbeat if self.heartbeat is not None else 15.0) + 2.0

    async def wait(self, run_id: str, safety_net: Optional[float] = None) -> dict:
        """The run's final state, once the mirror holds all of its output.
        Callbacks drive it; every ``safety_net`` seconds without news
        (default: two heartbeats and 2 s), and at the end, catch-up over SSH
        fills whatever they missed.  A run its host does not have raises
        (StartFailed, NoSuchRun), as the pull mode does; so does
        :meth:`close` (ChaperoneError)."""
        safety_net = self._safety_net() if safety_net is None else safety_net
        self._waiting += 1
        try:
            return await self._wait(run_id, safety_net)
        finally:
            self._waiting -= 1

    async def _wait(self, run_id: str, safety_net: float) -> dict:
        rec = self.ch.records.get(run_id)
        if rec is not None and rec.state == "unknown":  # (its start may never have arrived: no callback will say)
            try:
                await self.catch_up(run_id)
            except NoSuchRun:
                raise self.ch._gone(self.ch.records.get(run_id)) from None
            except ChaperoneError:
                pass
        # While the start's fate is not known (its connection broke), the
        # host is asked again soon, with backoff, not after a whole safety
        # net: no callback may ever come.
        backoff = 0.5
        while True:
            if self._closed:
                raise ChaperoneError("run %s: this Chaperone was closed while waiting (open() it again, or use "
                                     "a new one)" % run_id)
            st = self._complete(run_id)
            if st is not None:
                # Also when its final callback was acknowledged: the answer
                # may still be on its way (and lost if this process closes
                # now), and the agent would retry.  In the background: an
                # SSH call, which the caller of wait() need not wait for
                # (close() does).
                self.release_soon(run_id)
                return st
            event = self._event(run_id)
            event.clear()
            st = self.states.get(run_id)
            if st and st["state"] in FINAL_STATES:
                try:
                    await self.catch_up(run_id)
                except NoSuchRun:
                    raise self.ch._gone(self.ch.records.get(run_id)) from None
                except ChaperoneError:
                    await asyncio.sleep(1.0)
                continue
            rec = self.ch.records.get(run_id)
            unknown = rec is not None and rec.state == "unknown"
            try:
                await asyncio.wait_for(event.wait(), min(backoff, safety_net) if unknown else safety_net)
            except asyncio.TimeoutError:
                backoff = min(backoff * 2, safety_net)
                try:
                    await self.catch_up(run_id)
                except NoSuchRun:
                    gone = self.ch._gone(self.ch.records.get(run_id))
                    if not isinstance(gone, StartPending):
                        raise gone from None
                except ChaperoneError:
                    pass

    def release_soon(self, run_id: str) -> None:
        """:meth:`release` in the background, once per run: the runs of one
        host released meanwhile go in one agent call (one SSH channel for
        many, not one each); :meth:`close` waits for it."""
        if run_id in self._released or run_id not in self._runs:
            return
        self._released.add(run_id)
        transport = self._runs[run_id]
        key = id(transport)
        self._to_release.setdefault(key, (transport, set()))[1].add(run_id)
        if key not in self._releasing:
            self._releasing[key] = asyncio.ensure_future(self._release_batches(key))

    async def _release_batches(self, key: int) -> None:
        from ..client import AgentClient

        try:
            while True:
                await asyncio.sleep(0)  # (those released in this turn join)
                transport, ids = self._to_release.pop(key, (None, None))
                if not ids:
                    return
                try:
                    await AgentClient(transport).release(sorted(ids))
                except ChaperoneError:
                    pass  # not running any more, or unreachable: nothing to stop
        finally:
            self._releasing.pop(key, None)

    async def release(self, run_id: str) -> None:
        """Tell the agent we have everything: it stops calling back instead
        of trying for callback_timeout (a no-op for an agent that ended)."""
        self._released.add(run_id)
        try:
            await self.ch.client(run_id).control(run_id, b'{"op": "release"}')
        except ChaperoneError:
            pass  # not running any more, or unreachable: nothing to stop

    def drop(self, run_id: str) -> None:
        """Stop receiving for ``run_id`` (its mirror stays): a later
        :meth:`adopt` starts from scratch."""
        self.server.unregister(run_id)
        self._runs.pop(run_id, None)
        self.states.pop(run_id, None)
        self._released.discard(run_id)

    def forget(self, run_id: str) -> None:
        """Stop receiving for ``run_id`` and drop its mirror."""
        self.drop(run_id)
        shutil.rmtree(self.ch.home / "mirror" / run_id, ignore_errors=True)

    def tunnels_open(self) -> int:
        """Callback tunnels open now."""
        return sum(1 for t in self._tunnels.values() if not t["tunnel"].closed())

    def check_config(self, config: dict) -> None:
        if (config.get("output_buffer") or 0) > self.server.max_body:
            # The agent would retry a body the endpoint refuses, forever.
            raise UsageError("output_buffer %s is larger than this process's callback bodies may be (%d); "
                             "give it to Chaperone(config=...)" % (config["output_buffer"], self.server.max_body))

