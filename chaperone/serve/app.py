"""The dashboard and the local API (plain HTTP on 127.0.0.1, docs/api.md).

Only its user gets in: every ``/api/`` and ``/metrics`` request presents
the token (``Authorization: Bearer TOKEN``) or the browser's cookie; a POST
or DELETE with the cookie also needs the ``X-Chaperone-CSRF: 1`` header (a
page of another site can send neither); the Host header must name this
server (DNS rebinding).  Errors are ``{"error": "..."}`` with 400, 401, 403,
404, 405, 409, 413, 415, 502 or 503; never 500; a rejected request changes
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.resources
import json
import logging
import re
from typing import Callable, Dict, Optional

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..transports.target import is_local
from ..api import check_signal
from ..errors import ChaperoneError, NoSuchRun, UsageError
from ..models import check_run_id
from .files import now_iso
from .runs import Conflict
from .service import STREAMS, Service
from .view import FINAL, STATES
from ..errors import Reject

log = logging.getLogger("chaperone.serve")

COOKIE = "chaperone_session"
CSRF_HEADER = "X-Chaperone-CSRF"
MAX_BODY = 1 << 20
#: Raw bytes per output event (before base64).
SSE_CHUNK = 256 << 10
#: Seconds between keep-alive comments on an idle event stream.
PING = 15.0
MAX_OFFSET = 1 << 62
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_BEARER_RE = re.compile(r"^Bearer +([A-Za-z0-9._~+/=-]+) *$", re.IGNORECASE)


def _error(status: int, message: str, headers: Optional[dict] = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def session_cookie(token: str) -> str:
    """The browser's cookie: derived from the token (not the token itself)."""
    return hmac.new(token.encode(), b"chaperone browser session", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


# Input ------------------------------------------------------------------------------


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    host: str = Field(min_length=1, max_length=255)
    argv: Optional[list[str]] = Field(default=None, min_length=1)
    command: Optional[str] = Field(default=None, min_length=1)
    id: Optional[str] = None
    env: Dict[str, str] = Field(default_factory=dict)
    cwd: Optional[str] = Field(default=None, min_length=1)
    timeout: Optional[float] = Field(default=None, gt=0)
    spool: Optional[str] = Field(default=None, min_length=1)


class SignalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    signal: str = "TERM"
    grace: Optional[float] = Field(default=None, ge=0)


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append("%s: %s" % (where, err["msg"]))
    return "; ".join(parts)[:1000]


def _check_host(host: str) -> str:
    if host.startswith("-") or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in host):
        raise Reject(400, "host: %r is not a host name or ssh alias (no spaces or control characters, "
                          "no leading '-')" % host)
    return host


class Query:
    """A request's query parameters, each checked; unknown ones refused."""

    def __init__(self, request: web.Request, allowed: Dict[str, bool]):
        """``allowed``: name -> whether it may repeat."""
        self.q = request.query
        for name in self.q.keys():
            if name not in allowed:
                raise Reject(400, "unknown parameter %r: this route takes %s" % (
                    name, ", ".join(sorted(allowed)) or "none"))
            if not allowed[name] and len(self.q.getall(name)) > 1:
                raise Reject(400, "parameter %r given more than once" % name)

    def list(self, name: str):
        out = []
        for value in self.q.getall(name, []):
            out.extend(v for v in value.split(",") if v)
        return out

    def int(self, name: str, default: Optional[int], lo: int = 0, hi: int = MAX_OFFSET) -> Optional[int]:
        text = self.q.get(name)
        if text is None:
            return default
        return parse_int(name, text, lo, hi)

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
        text = self.q.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise Reject(400, "%s must be a number from %g to %g" % (name, lo, hi))
        return value

    def bool(self, name: str) -> bool:
        text = self.q.get(name)
        if text is None:
            return False
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise Reject(400, "%s must be true or false" % name)

    def stream(self) -> str:
        stream = self.q.get("stream", "stdout")
        if stream not in STREAMS:
            raise Reject(400, "stream must be stdout or stderr")
        return stream


def parse_int(name: str, text: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"[0-9]{1,19}", text) or not lo <= int(text) <= hi:
        raise Reject(400, "%s must be a whole number from %d to %d" % (name, lo, hi))
    return int(text)


async def _json_body(request: web.Request) -> dict:
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise Reject(415, "send the body as Content-Type: application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Reject(413, "body larger than %d bytes" % MAX_BODY)
    try:
        body = await request.content.read(MAX_BODY + 1)
    except Exception:
        raise Reject(400, "could not read the body") from None
    if len(body) > MAX_BODY:
        raise Reject(413, "body larger than %d bytes" % MAX_BODY)
    try:
        obj = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise Reject(400, "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise Reject(400, "the body must be a JSON object")
    return obj


def _run_id(request: web.Request) -> str:
    rid = request.match_info["id"]
    try:
        return check_run_id(rid)
    except ValueError as e:
        raise Reject(400, str(e)) from None


# The application ----------------------------------------------------------------------


class Api:
    def __init__(self, service: Service, token: str, port: int, bind: str = "127.0.0.1",
                 info: Callable[[], dict] = dict):
        self.service = service
        self.token = token
        self.cookie = session_cookie(token)
        self.info = info
        hosts = {"127.0.0.1", "localhost", "[::1]"}
        if bind not in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", ""):
            hosts.add("[%s]" % bind if ":" in bind else bind)
        self.allowed_hosts = {"%s:%d" % (h, port) for h in hosts}
        if port == 80:
            self.allowed_hosts |= hosts
        self.allowed_origins = {"http://" + h for h in self.allowed_hosts}
        self._static = {}
        base = importlib.resources.files("chaperone.serve") / "static"
        for name in ["index.html", *STATIC]:
            self._static[name] = (base / name).read_bytes()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors, self._guard])
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/static/{name}", self.static)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/server", self.server)
        r.add_get("/api/runs", self.list_runs)
        r.add_post("/api/runs", self.start)
        r.add_get("/api/runs/{id}", self.get_run)
        r.add_delete("/api/runs/{id}", self.clean)
        r.add_post("/api/runs/{id}/signal", self.signal)
        r.add_get("/api/runs/{id}/output", self.output)
        r.add_get("/api/runs/{id}/wait", self.wait)
        r.add_get("/api/events", self.events)
        app.on_response_prepare.append(self._headers)
        return app

    # Middleware ----------------------------------------------------------------

    async def _headers(self, request, response) -> None:
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)

    @web.middleware
    async def _errors(self, request, handler):
        try:
            response = await handler(request)
        except Reject as r:
            response = _error(r.status, r.message, r.headers)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            message = {404: "no such route: %s (see docs/api.md)" % request.path,
                       405: "method %s not allowed here" % request.method}.get(e.status, e.reason or "error")
            response = _error(e.status if e.status < 500 else 503, message, headers)
        except NoSuchRun as e:
            response = _error(404, str(e))
        except UsageError as e:
            response = _error(400, str(e))
        except asyncio.CancelledError:
            raise
        except (ConnectionResetError, ConnectionError):
            raise
        except ChaperoneError as e:
            response = _error(502, str(e))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = _error(503, "internal error; see the server's log")
        self.service.metrics.api_requests.labels(str(response.status)).inc()
        return response

    @web.middleware
    async def _guard(self, request, handler):
        host = request.headers.get("Host", "")
        if host.lower() not in self.allowed_hosts:
            raise Reject(403, "Host header %r not allowed: use http://127.0.0.1:PORT/" % host[:100])
        path = request.path
        if path.startswith("/api/") or path == "/metrics" or path == "/api":
            how = self._credential(request)
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                origin = request.headers.get("Origin")
                if origin is not None and origin not in self.allowed_origins:
                    raise Reject(403, "cross-origin request refused (Origin %s)" % origin[:100])
                if how == "cookie" and request.headers.get(CSRF_HEADER) != "1":
                    raise Reject(403, "a browser request that changes something needs the %s: 1 header"
                                 % CSRF_HEADER)
        return await handler(request)

    def _credential(self, request) -> str:
        auth = request.headers.get("Authorization")
        if auth is not None:
            m = _BEARER_RE.match(auth)
            if m is None:
                raise Reject(401, "malformed Authorization header: expected 'Bearer TOKEN'",
                             {"WWW-Authenticate": "Bearer"})
            if not _same(m.group(1), self.token):
                raise Reject(401, "wrong token: use the one in $CHAPERONE_HOME/serve/token",
                             {"WWW-Authenticate": "Bearer"})
            return "bearer"
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and _same(cookie, self.cookie):
            return "cookie"
        raise Reject(401, "not signed in: send Authorization: Bearer TOKEN (the token is in "
                          "$CHAPERONE_HOME/serve/token), or open the URL that `chaperone serve --url` prints",
                     {"WWW-Authenticate": "Bearer"})

    # Page ------------------------------------------------------------------------

    async def index(self, request):
        token = request.query.get("token")
        if token is not None:
            if not _same(token, self.token):
                return web.Response(status=401, text="This sign-in link is not valid (the server's token changed?).\n"
                                                     "Run `chaperone serve --url` for the current one.\n")
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="Strict", path="/",
                                max_age=30 * 86400)
            return response
        return web.Response(body=self._static["index.html"], content_type="text/html", charset="utf-8")

    async def static(self, request):
        name = request.match_info["name"]
        if name not in STATIC:
            raise Reject(404, "no such file")
        return web.Response(body=self._static[name], headers={"Content-Type": STATIC[name]})

    async def metrics(self, request):
        from .metrics import CONTENT_TYPE

        return web.Response(body=self.service.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # API -------------------------------------------------------------------------

    async def server(self, request):
        Query(request, {})
        s = self.service
        return web.json_response(dict(self.info(), heartbeat=s.heartbeat, silent_after=s.silent_after,
                                      poll_after=s.poll_after, event_id=s.bus.last,
                                      attached=s.attached.is_set()))

    async def list_runs(self, request):
        q = Query(request, {"host": True, "state": True})
        states = q.list("state")
        for st in states:
            if st not in STATES:
                raise Reject(400, "unknown state %r: expected %s" % (st, ", ".join(STATES)))
        return web.json_response({"runs": self.service.views(q.list("host"), states)})

    def _view(self, rid: str) -> dict:
        v = self.service.view(rid)
        if v is None:
            raise Reject(404, "no such run: %s" % rid)
        return v

    async def get_run(self, request):
        Query(request, {})
        return web.json_response(self._view(_run_id(request)))

    async def start(self, request):
        Query(request, {})
        body = await _json_body(request)
        try:
            req = StartRequest.model_validate(body)
        except ValidationError as e:
            raise Reject(400, "invalid start request: " + _validation_message(e)) from None
        if (req.argv is None) == (req.command is None):
            raise Reject(400, "give either argv (a list of strings) or command (a shell command)")
        _check_host(req.host)
        if req.spool is not None and is_local(req.host):
            raise Reject(400, "spool: local runs are spooled in $CHAPERONE_HOME/spool (spool is for remote hosts)")
        if req.id is not None:
            try:
                check_run_id(req.id)
            except ValueError as e:
                raise Reject(400, "id: %s" % e) from None
        argv = req.argv if req.argv is not None else ["/bin/sh", "-c", req.command]
        self.service.runs.validate(argv, run_id=req.id, env=req.env, cwd=req.cwd, timeout=req.timeout)
        try:
            view, new = await self.service.start(req.host, req.argv, command=req.command, run_id=req.id,
                                                 env=req.env, cwd=req.cwd, timeout=req.timeout,
                                                 spool=req.spool)
        except Conflict as e:
            raise Reject(409, str(e)) from None
        except UsageError as e:
            raise Reject(400, str(e)) from None
        except NoSuchRun as e:  # (not from a start: say what failed)
            raise Reject(502, "could not start on %s: %s" % (req.host, e)) from None
        except ChaperoneError as e:
            raise Reject(502, "could not start on %s: %s" % (req.host, e)) from None
        return web.json_response(view, status=201 if new else 200)

    async def signal(self, request):
        Query(request, {})
        rid = _run_id(request)
        body = await _json_body(request)
        try:
            req = SignalRequest.model_validate(body)
        except ValidationError as e:
            raise Reject(400, "invalid signal request: " + _validation_message(e)) from None
        try:
            name = check_signal(req.signal)
        except UsageError as e:
            raise Reject(400, "%s: use a name like TERM, INT, KILL or a number" % e) from None
        v = self._view(rid)
        if v["state"] in FINAL:
            raise Reject(409, "run %s has already ended (%s): nothing to signal" % (rid, v["state"]))
        try:
            return web.json_response(await self.service.signal(rid, name, req.grace))
        except ChaperoneError as e:
            if self.service.final(rid):
                raise Reject(409, "run %s has already ended: nothing to signal" % rid) from None
            raise Reject(502, "could not signal run %s: %s" % (rid, e)) from None

    async def clean(self, request):
        q = Query(request, {"force": False})
        force = q.bool("force")
        rid = _run_id(request)
        v = self._view(rid)
        if v["state"] not in FINAL and not force:
            raise Reject(409, "run %s is %s: kill it first, or clean it with force=true (which kills it)"
                         % (rid, v["state"]))
        try:
            await self.service.clean(rid, force)
        except NoSuchRun:
            pass  # (removed meanwhile)
        except ChaperoneError as e:
            raise Reject(502, "could not clean run %s: %s" % (rid, e)) from None
        return web.json_response({"removed": rid})

    async def wait(self, request):
        q = Query(request, {"timeout": False})
        timeout = q.float("timeout", 30.0, 0.0, 300.0)
        rid = _run_id(request)
        self._view(rid)
        v = await self.service.wait(rid, timeout)
        if v is None:
            raise Reject(404, "no such run: %s (removed)" % rid)
        return web.json_response(v)

    # Output -------------------------------------------------------------------------

    async def output(self, request):
        q = Query(request, {"stream": False, "offset": False, "length": False})
        stream = q.stream()
        offset = q.int("offset", 0)
        length = q.int("length", None, 1, MAX_OFFSET)
        rid = _run_id(request)
        self._view(rid)
        if "text/event-stream" in request.headers.get("Accept", ""):
            last = request.headers.get("Last-Event-ID")
            if last:
                offset = parse_int("Last-Event-ID", last.strip(), 0, MAX_OFFSET)
            if length is not None:
                raise Reject(400, "length is for raw output, not for an event stream")
            return await self._follow_output(request, rid, stream, offset)
        return await self._raw_output(request, rid, stream, offset, length)

    async def _raw_output(self, request, rid, stream, offset, length):
        s = self.service
        held = s.runs.held(rid, stream)
        end = s.stream_end(rid, stream)
        if end is not None and held < end:
            s.fetch(rid)
        n = max(0, held - offset)
        if length is not None:
            n = min(n, length)
        at_end = end is not None and offset + n >= end
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": 'inline; filename="%s.%s"' % (rid, stream),
            "X-Chaperone-Offset": str(offset), "X-Chaperone-Held": str(held),
            "X-Chaperone-End": "true" if at_end else "false"})
        response.content_length = n
        await response.prepare(request)
        pos = offset
        while n > 0:
            data = s.runs.read(rid, stream, pos, min(n, 1 << 20))
            if not data:
                break  # (cleaned meanwhile: the response ends short, the client sees it)
            await response.write(data)
            pos += len(data)
            n -= len(data)
        await response.write_eof()
        return response

    async def _sse(self, request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await response.write(b"retry: 1000\n\n")
        return response

    async def _follow_output(self, request, rid, stream, offset):
        s = self.service
        response = await self._sse(request)
        s.clients += 1
        try:
            while True:
                ev = s.event(rid)
                if s.runs.record(rid) is None:
                    await response.write(b"event: removed\ndata: {}\n\n")
                    break
                data = s.runs.read(rid, stream, offset, SSE_CHUNK)
                if data:
                    payload = json.dumps({"stream": stream, "offset": offset,
                                          "data": base64.b64encode(data).decode("ascii")})
                    offset += len(data)
                    await response.write(("id: %d\nevent: output\ndata: %s\n\n" % (offset, payload)).encode())
                    continue
                end = s.stream_end(rid, stream)
                if end is not None:
                    if offset >= end:
                        payload = json.dumps({"stream": stream, "offset": offset, "run": s.view(rid)})
                        await response.write(("event: end\ndata: %s\n\n" % payload).encode())
                        break
                    s.fetch(rid)
                try:
                    await asyncio.wait_for(ev.wait(), PING)
                except asyncio.TimeoutError:
                    await response.write(b": ping\n\n")
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            s.clients -= 1
        return response

    async def _snapshot(self, response) -> int:
        """Every run, as of the last event id (which it returns)."""
        s = self.service
        last_id = s.bus.last
        payload = json.dumps({"runs": s.views(), "server_time": now_iso(), "heartbeat": s.heartbeat,
                              "silent_after": s.silent_after}, separators=(",", ":"))
        await response.write(("id: %d\nevent: snapshot\ndata: %s\n\n" % (last_id, payload)).encode())
        return last_id

    async def events(self, request):
        q = Query(request, {"since": False})
        since = q.int("since", None)
        last = request.headers.get("Last-Event-ID")
        if last:
            since = parse_int("Last-Event-ID", last.strip(), 0, MAX_OFFSET)
        s = self.service
        bus = s.bus
        response = await self._sse(request)
        s.clients += 1
        try:
            pending = bus.since(since)
            if pending is None:
                last_id = await self._snapshot(response)
                pending = bus.since(last_id) or []
            else:
                last_id = since
            while True:
                for event_id, kind, payload in pending:
                    await response.write(("id: %d\nevent: %s\ndata: %s\n\n" % (event_id, kind, payload)).encode())
                    last_id = event_id
                if bus.last == last_id:
                    await bus.wait(last_id, PING)
                    if bus.last == last_id:
                        await response.write(b": ping\n\n")
                pending = bus.since(last_id)
                if pending is None:  # fell too far behind: start over
                    last_id = await self._snapshot(response)
                    pending = []
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            s.clients -= 1
        return response
