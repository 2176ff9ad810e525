"""The API for schedulers: runs that call back over HTTPS.

:class:`Scheduler` serves the HTTPS callback endpoint (aiohttp, its own
certificate, pinned by each agent), starts runs whose agents push output and
state to it, and keeps a local mirror of every run's output
(``$CHAPERONE_HOME/mirror/<id>/``).  Two paths fill the mirror, both by byte
offset, so every byte lands exactly once:

* the agent's callbacks (live), through an SSH remote port forward on the
  run's connection by default (works behind NAT), or ``callback_url`` when
  hosts can reach the scheduler directly;
* catch-up over SSH from the spool (:meth:`Scheduler.catch_up`), after the
  tunnel came back, after a restart (:meth:`Scheduler.reattach`), and as the
  safety net in :meth:`Scheduler.wait`.

``on_update(run_id, state)`` is called (sync or async) on every state change.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence

from .api import Chaperone, new_run_id
from .callback import DEFAULT_MAX_BODY, CallbackServer
from .errors import ChaperoneError, ConnectionLost, UsageError
from .mirror import OutputMirror
from .models import FINAL_STATES, STREAMS
from .transport import Transport

CATCH_UP_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, home=None, *, on_update: Optional[Callable] = None, ssh_config: Sequence[str] = (),
                 check_host_keys: bool = True, callback_url: Optional[str] = None,
                 bind: str = "127.0.0.1", port: int = 0, config: Optional[dict] = None,
                 heal_interval: float = 1.0, ssh_client: Optional[str] = None,
                 heartbeat: Optional[float] = None):
        if ssh_client is None:  # (more than one config file: asyncssh, see Chaperone)
            from .sshmaster import default_client

            ssh_client = default_client()
        self.ch = Chaperone(home, ssh_config=ssh_config, check_host_keys=check_host_keys, ssh_client=ssh_client)
        self.on_update = on_update
        self.callback_url = callback_url
        self.bind = bind
        self.port = port
        #: Defaults for each program.json's ``config`` (timeouts, batching ...).
        self.config = dict(config or {})
        self.heal_interval = heal_interval
        #: Seconds between the agents' heartbeats (callback.heartbeat; None: the agent's default).
        self.heartbeat = heartbeat
        # Room for the largest callback body an agent sends (output_buffer).
        self.server = CallbackServer(max_body=max(DEFAULT_MAX_BODY, int(self.config.get("output_buffer") or 0)))
        self._states: Dict[str, dict] = {}
        self._changed: Dict[str, asyncio.Event] = {}
        self._tunnels: Dict[int, dict] = {}  # id(transport) -> {"tunnel", "task"}
        self._hosts: Dict[str, Transport] = {}
        self._started = False

    async def __aenter__(self) -> "Scheduler":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> None:
        if not self._started:
            await self.server.start(self.bind, self.port, cert_dir=self.ch.home / "tls")
            self._started = True

    async def close(self) -> None:
        for tunnel in self._tunnels.values():
            tunnel["task"].cancel()
            tunnel["tunnel"].close()
        self._tunnels.clear()
        await self.server.stop()
        await self.ch.close()
        self._started = False

    # State ---------------------------------------------------------------------

    def mirror(self, run_id: str) -> OutputMirror:
        return OutputMirror(self.ch.home / "mirror" / run_id)

    def _event(self, run_id: str) -> asyncio.Event:
        return self._changed.setdefault(run_id, asyncio.Event())

    def _wake(self, run_id: str) -> None:
        self._event(run_id).set()

    async def _on_state(self, run_id: str, state, final: bool = False) -> None:
        st = state if isinstance(state, dict) else state.model_dump()
        old = self._states.get(run_id)
        if old is not None and old["state"] in FINAL_STATES:
            return  # final is final
        self._states[run_id] = st
        self.ch.records.update(run_id, st)
        self._wake(run_id)
        if self.on_update is not None and (old is None or _changed(old, st)):
            result = self.on_update(run_id, st)
            if inspect.isawaitable(result):
                await result

    def state(self, run_id: str) -> Optional[dict]:
        """The last state seen for ``run_id`` (callbacks or catch-up)."""
        return self._states.get(run_id)

    # Tunnels ---------------------------------------------------------------------

    async def _callback_for(self, host: str, transport: Transport) -> str:
        if self.callback_url:
            return self.callback_url
        if host == "local":
            return self.server.url
        tunnel = self._tunnels.get(id(transport))
        if tunnel is None or tunnel["tunnel"].closed():
            transport.warm()  # the calls' connection logs in meanwhile, not after
            await self._open_tunnel(transport)
            tunnel = self._tunnels[id(transport)]
        return self.server.base_url("127.0.0.1", tunnel["tunnel"].port)

    async def _open_tunnel(self, transport) -> None:
        new = await transport.forward_remote(self.server.port)
        old = self._tunnels.get(id(transport))
        if old is not None:
            old["tunnel"].close()
        task = old["task"] if old else asyncio.ensure_future(self._heal(transport))
        self._tunnels[id(transport)] = {"tunnel": new, "task": task}

    async def _heal(self, transport) -> None:
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
                    await self._open_tunnel(transport)
                    break
                except ChaperoneError:
                    continue
            for run_id in self._unfinished(transport):
                try:
                    await self._rewire(run_id, transport)
                    await self.catch_up(run_id)
                except Exception:  # the next heal, or wait()'s safety net, tries again
                    log.warning("re-attaching run %s after a reconnect failed", run_id, exc_info=True)

    def _unfinished(self, transport) -> List[str]:
        return [r for r, t in self._hosts.items()
                if t is transport and (self._states.get(r) or {}).get("state") not in FINAL_STATES]

    async def _rewire(self, run_id: str, transport: Transport) -> None:
        """Give the run's agent a fresh token and the current callback URL."""
        rec = self.ch.record(run_id)
        token = self._register(run_id)
        url = await self._callback_for(rec.host, transport)
        message = json.dumps({"op": "callback", "url": url, "token": token, "cert": self.server.cert_pem})
        await self.ch.client(run_id).control(run_id, message.encode())

    def _register(self, run_id: str) -> str:
        return self.server.register(run_id, self.mirror(run_id), on_state=self._on_state,
                                    on_output=lambda rid, stream, held: self._wake(rid))

    # Runs --------------------------------------------------------------------------

    async def start(self, host: str, argv: Optional[Sequence[str]] = None, *, command: Optional[str] = None,
                    run_id: Optional[str] = None, env=None, cwd: Optional[str] = None,
                    timeout: Optional[float] = None, ssh: Optional[dict] = None,
                    config: Optional[dict] = None) -> str:
        """Start a program (``argv``, or a shell ``command``) on ``host``;
        returns its id at once.  Starting an existing id again is harmless."""
        await self.open()
        if (argv is None) == (command is None):
            raise ValueError("give either argv or command")
        if command is not None:
            argv = ["/bin/sh", "-c", command]
        run_id = run_id or new_run_id()
        config = {**self.config, **(config or {})}
        if (config.get("output_buffer") or 0) > self.server.max_body:
            # The agent would retry a body the endpoint refuses, forever.
            raise UsageError("output_buffer %s is larger than this scheduler's callback bodies may be (%d); "
                             "give it to Scheduler(config=...)" % (config["output_buffer"], self.server.max_body))
        transport = self.ch.transport(host, **(ssh or {}))
        self._hosts[run_id] = transport
        token = self._register(run_id)
        url = await self._callback_for(host, transport)
        callback = {"url": url, "token": token, "cert": self.server.cert_pem}
        if self.heartbeat is not None:
            callback["heartbeat"] = float(self.heartbeat)
        run = await self.ch.start(host, argv, run_id=run_id, env=env, cwd=cwd, timeout=timeout, ssh=ssh,
                                  callback=callback, config=config)
        await self._on_state(run_id, run.state)
        return run_id

    async def reattach(self) -> List[str]:
        """After a restart: take back every unfinished recorded run (new
        token, new callback address, catch-up from its spool)."""
        await self.open()
        ids = []
        for rec in list(self.ch.records.all()):
            if rec.state in FINAL_STATES or rec.id in self._hosts:
                continue
            transport = self.ch._transport_for(rec)
            self._hosts[rec.id] = transport
            if rec.last:
                self._states[rec.id] = rec.last
            try:
                await self._rewire(rec.id, transport)
            except ChaperoneError:
                pass  # catch_up below still reads the spool
            await self.catch_up(rec.id)
            ids.append(rec.id)
        return ids

    async def catch_up(self, run_id: str) -> dict:
        """Read the run's state and any output the mirror lacks from its spool
        over SSH (appended by offset: never twice)."""
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
                self._wake(run_id)
        await self._on_state(run_id, state, state["state"] in FINAL_STATES)
        return state

    async def output(self, run_id: str, stream: str = "stdout", offset: int = 0) -> AsyncIterator[bytes]:
        """Yield the run's output from ``offset`` as it arrives, to its end."""
        mirror = self.mirror(run_id)
        while True:
            event = self._event(run_id)
            event.clear()
            data = mirror.read(stream, offset, 1 << 20)
            if data:
                offset += len(data)
                yield data
                continue
            st = self._states.get(run_id)
            if st and st["state"] in FINAL_STATES and offset >= st[stream + "_bytes"]:
                return
            try:
                await asyncio.wait_for(event.wait(), 5.0)
            except asyncio.TimeoutError:
                pass

    async def wait(self, run_id: str, safety_net: float = 30.0) -> dict:
        """The run's final state, once the mirror holds all of its output.
        Callbacks drive it; every ``safety_net`` seconds without news, and
        at the end, catch-up over SSH fills whatever they missed."""
        while True:
            st = self._states.get(run_id)
            if st and st["state"] in FINAL_STATES:
                mirror = self.mirror(run_id)
                if all(mirror.held(s) >= st[s + "_bytes"] for s in STREAMS):
                    # Also when its final callback was acknowledged: the
                    # answer may still be on its way (and lost if this
                    # scheduler closes now), and the agent would retry.
                    await self._release(run_id)
                    return st
                try:
                    await self.catch_up(run_id)
                except (ConnectionLost, ChaperoneError):
                    await asyncio.sleep(1.0)
                continue
            event = self._event(run_id)
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), safety_net)
            except asyncio.TimeoutError:
                try:
                    await self.catch_up(run_id)
                except (ConnectionLost, ChaperoneError):
                    pass

    async def _release(self, run_id: str) -> None:
        """Tell the agent we have everything: it stops calling back instead
        of trying for callback_timeout (a no-op for an agent that ended)."""
        try:
            await self.ch.client(run_id).control(run_id, b'{"op": "release"}')
        except ChaperoneError:
            pass  # not running any more, or unreachable: nothing to stop

    async def signal(self, run_id: str, sig: str = "SIGTERM", grace: Optional[float] = None) -> dict:
        return await self.ch.signal(run_id, sig, grace)

    async def clean(self, run_id: str, force: bool = False) -> None:
        await self.ch.clean(run_id, force)
        self.server.unregister(run_id)
        self._hosts.pop(run_id, None)
        self._states.pop(run_id, None)
        import shutil

        shutil.rmtree(self.ch.home / "mirror" / run_id, ignore_errors=True)


def _changed(old: dict, new: dict) -> bool:
    keys = ("state", "pid", "return_code", "signal", "error")
    return any(old.get(k) != new.get(k) for k in keys)
