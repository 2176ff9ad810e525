"""The scheduler's HTTPS endpoint, where agents deliver output and state.

Routes (POST only), relative to ``/api/v1/agent/``::

    {id}/output/{stream}?offset=N   raw bytes     -> 200 {"offset": held}
                                                     409 {"offset": held} (gap)
    {id}/state                      RunState JSON -> 200 {"ok": true}
    {id}/completed                  RunState JSON -> 200 {"ok": true}

Every request carries ``Authorization: Bearer <token>``, the per-run token
from :meth:`CallbackServer.register`.  Errors are ``{"error": "..."}`` with,
in this order of checks: 401 (no/malformed/unknown token), 404 (unknown run),
403 (token of another run), 413 (body over :attr:`CallbackServer.max_body`),
400 (bad stream, offset, JSON, state), 405 (method other than POST, decided
by the router before anything else), 503 (unexpected failure: retry later).
Never 500.  A rejected request changes nothing.

The decisions that need no socket (auth, parameter and body parsing, the
completion bookkeeping) live in :class:`CallbackProtocol`; the aiohttp
handlers only move bytes in and out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import re
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from aiohttp import web
from pydantic import ValidationError

from . import certs, tls
from .mirror import OffsetGap, OutputMirror
from ..models import AGENT_FINAL_STATES as FINAL_STATES, STREAMS, RunState, check_run_id
from ..errors import Reject  # noqa: F401 (defined there; exported here too)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/agent/"
DEFAULT_MAX_BODY = 64 << 20
#: Output bodies go to the mirror in pieces of this size as they arrive.
APPEND_CHUNK = 1 << 20
_OFFSET_RE = re.compile(r"^[0-9]{1,18}$")
#: (re.ASCII: with IGNORECASE alone, [A-Za-z] also takes letters that
#: case-fold to ASCII ones, such as "ſ" and the Kelvin sign)
_BEARER_RE = re.compile(r"^Bearer +([A-Za-z0-9._~+/=-]+) *$", re.IGNORECASE | re.ASCII)
#: JSON bodies nested deeper than this are refused before they are parsed
#: (a state is 2 levels deep).
MAX_JSON_DEPTH = 32
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_nesting_ok(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``data`` nests at most ``limit`` deep, found
    without parsing it (as the agent's function of the same name:
    brackets in strings do not count)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(text.split(b'"')[0::2]).translate(None, _NOT_BRACKETS)
    depth = 0
    for c in brackets:
        if c in b"[{":
            depth += 1
            if depth > limit:
                return False
        else:
            depth -= 1
            if depth < 0:
                return True
    return True


def _int_out_of_range(obj) -> bool:
    """Whether ``obj`` (parsed JSON) holds an integer outside int64 (what
    SQLite and the records can hold)."""
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -(1 << 63) <= item < 1 << 63:
            return True
    return False

OnState = Callable[[str, RunState, bool], Any]


@dataclass
class Run:
    run_id: str
    token: str
    mirror: OutputMirror
    on_state: Optional[OnState] = None
    #: Called with (run_id, stream, held) after output was stored.
    on_output: Optional[Callable[[str, str, int], None]] = None
    completed: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class CallbackProtocol:
    """Sans-IO: the registry of runs and every decision about a request."""

    def __init__(self) -> None:
        self._runs: Dict[str, Run] = {}
        self._by_digest: Dict[bytes, str] = {}

    # -- registry -----------------------------------------------------------

    def register(self, run_id: str, mirror: OutputMirror, on_state: Optional[OnState] = None,
                 on_output: Optional[Callable[[str, str, int], None]] = None) -> str:
        """Accept callbacks for ``run_id``; return its fresh 256-bit token.

        Registering a run again replaces its token (the old one stops working)
        and forgets that it completed.
        """
        check_run_id(run_id)
        self.unregister(run_id)
        token = secrets.token_urlsafe(32)
        self._runs[run_id] = Run(run_id, token, mirror, on_state, on_output)
        self._by_digest[_digest(token.encode("ascii"))] = run_id
        return token

    def unregister(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is not None:
            self._by_digest.pop(_digest(run.token.encode("ascii")), None)

    def get(self, run_id: str) -> Optional[Run]:
        return self._runs.get(run_id)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    # -- decisions ----------------------------------------------------------

    def authorize(self, path_id: str, authorization: Optional[str]) -> Run:
        """401 no/malformed/unknown token, 404 unknown run, 403 another run's token."""
        if not authorization:
            raise Reject(401, "missing Authorization: Bearer token")
        m = _BEARER_RE.match(authorization)
        if m is None:
            raise Reject(401, "malformed Authorization header: expected 'Bearer <token>'")
        presented = m.group(1).encode("ascii")
        owner_id = self._by_digest.get(_digest(presented))
        owner = self._runs.get(owner_id) if owner_id is not None else None
        if owner is None or not hmac.compare_digest(owner.token.encode("ascii"), presented):
            raise Reject(401, "unknown token")
        try:
            check_run_id(path_id)
        except ValueError:
            raise Reject(404, "unknown run") from None
        run = self._runs.get(path_id)
        if run is None:
            raise Reject(404, "unknown run")
        if run is not owner:
            raise Reject(403, "token does not belong to this run")
        return run

    @staticmethod
    def check_length(content_length: Optional[int], max_body: int) -> None:
        if content_length is not None and content_length > max_body:
            raise Reject(413, f"body larger than {max_body} bytes")

    @staticmethod
    def parse_stream(stream: str) -> str:
        if stream not in STREAMS:
            raise Reject(400, f"unknown stream: expected one of {', '.join(STREAMS)}")
        return stream

    @staticmethod
    def parse_offset(values: list) -> int:
        """``values``: every ``offset`` query value (exactly one is allowed)."""
        if len(values) != 1:
            raise Reject(400, "exactly one offset query parameter is required")
        if not _OFFSET_RE.match(values[0]):
            raise Reject(400, "offset must be a non-negative decimal integer")
        return int(values[0])

    @staticmethod
    def parse_state(body: bytes, path_id: str, final: bool) -> RunState:
        """A RunState body; ``final`` says whether it must be a final state."""
        if not json_nesting_ok(body):
            raise Reject(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Reject(400, "invalid JSON") from None
        if not isinstance(obj, dict):
            raise Reject(400, "the body must be a JSON object")
        if _int_out_of_range(obj):
            raise Reject(400, "invalid state: a number is out of range")
        try:
            state = RunState.model_validate_json(body)
        except ValidationError as e:
            errors = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                for err in e.errors(include_url=False, include_input=False)
            )
            raise Reject(400, f"invalid state: {errors}"[:2000]) from None
        if state.id != path_id:
            raise Reject(400, "state id does not match the run in the path")
        if final and state.state not in FINAL_STATES:
            raise Reject(400, f"completed needs a final state ({', '.join(FINAL_STATES)})")
        if not final and state.state in FINAL_STATES:
            raise Reject(400, "a final state must be posted to completed")
        return state


async def _call(on_state: Optional[OnState], run_id: str, state: RunState, final: bool) -> None:
    if on_state is None:
        return
    result = on_state(run_id, state, final)
    if inspect.isawaitable(result):
        await result


def _error(status: int, message: str, headers: Optional[dict] = None):
    return web.json_response({"error": message}, status=status, headers=headers)


async def _append(mirror, stream: str, offset: int, data) -> int:
    """``mirror.append`` here in the event loop (a write to the page cache:
    no thread hand-off per MiB), or in a thread when another process holds
    the mirror's lock (waiting for it must not stop the loop)."""
    try:
        return mirror.append(stream, offset, data, blocking=False)
    except BlockingIOError:
        return await asyncio.get_running_loop().run_in_executor(None, mirror.append, stream, offset, data)


class _ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger: a request it cannot parse (a bad request
    line or method, a line or header too long, ...: noise any open port
    gets) is one line at most at WARNING, never a traceback; anything else
    is logged as aiohttp logs it."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})

    def log(self, level, msg, *args, **kw) -> None:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            why = " ".join(part.strip() for part in str(exc.message or "").splitlines() if part.strip())
            kw.pop("exc_info")
            msg = msg + ": %s: %s"
            args = args + (type(exc).__name__, why[:200] or exc.code)
            level = min(level, logging.WARNING)
        super().log(level, msg, *args, **kw)


class CallbackServer:
    """The HTTPS endpoint on the scheduler's side."""

    def __init__(self, max_body: int = DEFAULT_MAX_BODY,
                 on_request: Optional[Callable[[Optional[str], str, int], None]] = None) -> None:
        self.max_body = max_body
        #: Told ``(run_id, kind, status)`` of every request answered (kind:
        #: output, state, completed, other): metrics, "last heard from".
        self.on_request = on_request
        self.protocol = CallbackProtocol()
        self._runner = None
        self._host: Optional[str] = None
        self._port: Optional[int] = None
        self._cert_path: Optional[Path] = None
        self._cert_pem: Optional[str] = None

    # -- registry (delegates to the sans-IO protocol) -----------------------

    def register(self, run_id: str, mirror: OutputMirror, on_state: Optional[OnState] = None,
                 on_output: Optional[Callable[[str, str, int], None]] = None) -> str:
        return self.protocol.register(run_id, mirror, on_state, on_output)

    def unregister(self, run_id: str) -> None:
        self.protocol.unregister(run_id)

    def completed(self, run_id: str) -> bool:
        """Whether the run's agent delivered (and we acknowledged) its final state."""
        run = self.protocol.get(run_id)
        return run is not None and run.completed

    # -- lifecycle ----------------------------------------------------------

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        cert_dir: Optional[Path] = None,
        hostnames: Tuple[str, ...] = (),
    ) -> None:
        if self._runner is not None:
            raise RuntimeError("callback server already started")
        if cert_dir is None:
            from ..records import chaperone_home

            cert_dir = chaperone_home() / "tls"
        cert_path, key_path = certs.ensure_certificate(Path(cert_dir), hostnames)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)

        app = web.Application(client_max_size=self.max_body, middlewares=[self._middleware])
        app.router.add_post(API_PREFIX + "{id}/output/{stream}", self._output)
        app.router.add_post(API_PREFIX + "{id}/state", self._state)
        app.router.add_post(API_PREFIX + "{id}/completed", self._completed)
        runner = web.AppRunner(app, access_log=log, handle_signals=False, logger=_ServerLog(log))
        await runner.setup()
        site = tls.site(runner, host, port, ctx)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        addresses = runner.addresses
        self._port = addresses[0][1] if addresses else port
        self._host = host
        self._cert_path = cert_path
        self._cert_pem = certs.cert_pem(cert_path)
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> "CallbackServer":
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("callback server not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL for ``callback.url``; the agent appends ``<id>/...``."""
        return self.base_url()

    def base_url(self, host: Optional[str] = None, port: Optional[int] = None) -> str:
        """The base URL as reached through ``host``/``port`` (e.g. the remote
        end of an SSH port forward); defaults: 127.0.0.1 (or the bound
        address) and the bound port."""
        if host is None:
            host = self._host if self._host not in (None, "", "0.0.0.0", "::", "localhost") else "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"https://{host}:{self.port if port is None else port}{API_PREFIX}"

    @property
    def cert_path(self) -> Path:
        if self._cert_path is None:
            raise RuntimeError("callback server not started")
        return self._cert_path

    @property
    def cert_pem(self) -> str:
        """The PEM certificate to pin in ``callback.cert``."""
        if self._cert_pem is None:
            raise RuntimeError("callback server not started")
        return self._cert_pem

    # -- aiohttp glue -------------------------------------------------------

    @web.middleware
    async def _middleware(self, request, handler):
        response = await self._answer(request, handler)
        if self.on_request is not None:
            path = request.path
            kind = ("state" if path.endswith("/state") else "completed" if path.endswith("/completed")
                    else "output" if "/output/" in path else "other")
            try:
                self.on_request(request.match_info.get("id"), kind, response.status)
            except Exception:  # (a hook must never fail a callback)
                log.warning("on_request hook failed", exc_info=True)
        return response

    async def _answer(self, request, handler):
        try:
            return await handler(request)
        except Reject as r:
            return _error(r.status, r.message)
        except web.HTTPException as e:
            if e.status < 400:  # pragma: no cover - we never redirect
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            status = e.status if e.status < 500 else 503
            return _error(status, e.reason or "error", headers)
        except asyncio.CancelledError:
            raise
        except ConnectionError as e:  # (the agent's connection dropped mid-request: it sends again)
            log.info("callback %s %s: the agent's connection dropped (%s)", request.method, request.path,
                     e or type(e).__name__)
            return _error(503, "connection lost; retry")
        except Exception:
            log.exception("callback %s %s failed", request.method, request.path)
            return _error(503, "internal error; retry later")

    def _authorize(self, request) -> Run:
        run = self.protocol.authorize(request.match_info["id"], request.headers.get("Authorization"))
        self.protocol.check_length(request.content_length, self.max_body)
        return run

    async def _body(self, request) -> bytes:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Reject(413, f"body larger than {self.max_body} bytes") from None
        if len(body) > self.max_body:
            raise Reject(413, f"body larger than {self.max_body} bytes")
        return body

    async def _output(self, request):
        """Appends the body to the mirror as it arrives: what is there, up
        to 1 MiB at a time, before waiting for more (bodies as large as
        ``max_body`` cost no more memory than that, and a request waiting
        for the network holds nothing: many agents sending at once cost
        only what is in flight).  A body without Content-Length (chunked)
        is read whole first, so that one found too large has stored
        nothing."""
        run = self._authorize(request)
        streamed = request.content_length is not None  # and <= max_body (checked)
        stream = self.protocol.parse_stream(request.match_info["stream"])
        offset = self.protocol.parse_offset(request.query.getall("offset", []))
        with run.mirror.appending(stream):  # (its files opened once per body, not per append)
            held = await self._store(request, run, stream, streamed, offset)
        if not isinstance(held, int):
            return held  # (an answer: a gap, or an error)
        if run.on_output is not None:
            run.on_output(run.run_id, stream, held)
        return web.json_response({"offset": held})

    async def _store(self, request, run: Run, stream: str, streamed: bool, offset: int):
        """The body of an output request to the mirror as it arrives:
        the bytes held after it, or the answer when it was not stored."""
        pos, held, received = offset, None, 0
        chunks: List[bytes] = []  # what arrived since the last append (stored with one writev)
        pending = 0
        content = request.content
        while True:
            try:
                if streamed:
                    data, _ = await content.readchunk()  # (each piece as it came: never joined)
                else:
                    data = await content.readany()
            except web.HTTPRequestEntityTooLarge:
                raise Reject(413, f"body larger than {self.max_body} bytes") from None
            except ConnectionError:
                # The agent's connection died mid-body: what came is kept
                # (at its offset); the agent sends the rest again.
                if chunks and streamed:
                    try:
                        await _append(run.mirror, stream, pos, chunks)
                    except (OffsetGap, OSError):
                        pass
                raise Reject(400, "connection lost in the middle of the body") from None
            received += len(data)
            if received > self.max_body:
                raise Reject(413, f"body larger than {self.max_body} bytes")
            if data:
                chunks.append(data)
                pending += len(data)
                if not streamed or (pending < APPEND_CHUNK and content.total_bytes > received):
                    continue  # (more is here already: stored with it)
            elif held is not None and not chunks:
                break
            pieces, size = chunks, pending
            chunks, pending = [], 0
            try:
                held = await _append(run.mirror, stream, pos, pieces)  # (one writev: never joined)
            except OffsetGap as gap:
                return web.json_response({"offset": gap.held}, status=409)
            except OSError:
                log.exception("storing output of run %s failed", run.run_id)
                return _error(503, "could not store output; retry later")
            pos += size
            if not data:
                break
        return held

    async def _state(self, request):
        run = self._authorize(request)
        state = self.protocol.parse_state(await self._body(request), run.run_id, final=False)
        if not run.completed:  # a late heartbeat must not undo a completion
            await _call(run.on_state, run.run_id, state, False)
        return web.json_response({"ok": True})

    async def _completed(self, request):
        run = self._authorize(request)
        state = self.protocol.parse_state(await self._body(request), run.run_id, final=True)
        async with run.lock:
            if not run.completed:
                await _call(run.on_state, run.run_id, state, True)
                run.completed = True  # only once on_state succeeded
        return web.json_response({"ok": True})
