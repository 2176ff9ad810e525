"""A client of the running `chaperone serve` (stdlib only: http.client).

>>> from chaperone.serve.client import connect
>>> server = connect()                  # None when no server runs
>>> if server:
...     run = server.start("gpu1", command="python train.py")
...     for offset, data in server.follow(run["id"]):
...         sys.stdout.buffer.write(data)
...     run = server.wait(run["id"])

:func:`discover` finds the server from ``$CHAPERONE_HOME/serve/server.json``
(a stale one is ignored) and reads the token; every method raises
:class:`ServeError` (a :class:`chaperone.errors.ChaperoneError`; its
``status`` is the HTTP status, 0 when the server could not be reached):
:class:`chaperone.errors.UsageError` for 400/409 answers,
:class:`chaperone.errors.NoSuchRun` for 404.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse
from typing import Iterator, List, Optional, Sequence, Tuple

from ..errors import (ChaperoneError, NoSuchRun, ServeError, ServeNoSuchRun, ServerGone,  # noqa: F401 (exported)
                      ServeUsageError, UsageError)
from . import files


FINAL = ("done", "error", "lost", "failed")


def discover(home=None) -> Optional[dict]:
    """``server.json`` of the running server plus its ``token``, or None."""
    from ..records import chaperone_home

    directory = chaperone_home(home) / "serve"  # (not made: a client changes nothing)
    info = files.read_server_info(directory)
    if info is None:
        return None
    token = files.read_token(directory)
    if token is None:
        return None
    return dict(info, token=token)


def connect(home=None, timeout: float = 30.0) -> Optional["ServeClient"]:
    """A client of the running server, or None when none runs."""
    info = discover(home)
    return ServeClient(info["url"], info["token"], timeout=timeout) if info else None


def _q(params: dict) -> str:
    items = [(k, v) for k, v in params.items() if v is not None]
    return ("?" + urllib.parse.urlencode(items, doseq=True)) if items else ""


def _path(run_id: str, tail: str = "") -> str:
    return "/api/runs/" + urllib.parse.quote(run_id, safe="") + tail


class ServeClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ServeError("not a server URL: %r" % url)
        self.host = parts.hostname
        self.port = parts.port or 80
        self.token = token
        self.timeout = timeout

    # HTTP -------------------------------------------------------------------------

    def _conn(self, timeout: Optional[float] = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def _headers(self, extra: Optional[dict] = None) -> dict:
        h = {"Authorization": "Bearer " + self.token, "Host": "%s:%d" % (
            "[%s]" % self.host if ":" in self.host else self.host, self.port)}
        h.update(extra or {})
        return h

    def _open(self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
              timeout: Optional[float] = None) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn(timeout)
        try:
            conn.request(method, path, body=body, headers=self._headers(headers))
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ServerGone("cannot reach chaperone serve at %s:%d: %s" % (self.host, self.port, e)) from None

    @staticmethod
    def _raise(status: int, body: bytes):
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace").strip()[:200] or "HTTP %d" % status
        if status == 404:
            raise ServeNoSuchRun(message, status)
        if status in (400, 409, 413, 415):
            raise ServeUsageError(message, status)
        raise ServeError(message, status)

    def request(self, method: str, path: str, obj=None, timeout: Optional[float] = None):
        """JSON in, JSON out; raises on an error answer."""
        body = None
        headers = {}
        if obj is not None:
            body = json.dumps(obj).encode()
            headers["Content-Type"] = "application/json"
        conn, resp = self._open(method, path, body, headers, timeout)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ServerGone("lost chaperone serve at %s:%d: %s" % (self.host, self.port, e)) from None
        finally:
            conn.close()
        if resp.status >= 400:
            self._raise(resp.status, data)
        return json.loads(data)

    # Runs ---------------------------------------------------------------------------

    def server(self) -> dict:
        return self.request("GET", "/api/server")

    def runs(self, host: Sequence[str] = (), state: Sequence[str] = ()) -> List[dict]:
        return self.request("GET", "/api/runs" + _q({"host": list(host) or None, "state": list(state) or None}))["runs"]

    def run(self, run_id: str) -> dict:
        return self.request("GET", _path(run_id))

    def start(self, host: str, argv: Optional[Sequence[str]] = None, *, command: Optional[str] = None,
              run_id: Optional[str] = None, env: Optional[dict] = None, cwd: Optional[str] = None,
              timeout: Optional[float] = None, spool: Optional[str] = None, id: Optional[str] = None) -> dict:
        """Start a run through the server (``POST /api/runs``); ``id`` (as
        :meth:`chaperone.Chaperone.start` names it) or ``run_id``."""
        if id is not None and run_id is not None and id != run_id:
            raise UsageError("give id or run_id, not both")
        run_id = run_id if run_id is not None else id
        body = {"host": host}
        for key, value in (("argv", list(argv) if argv is not None else None), ("command", command),
                           ("id", run_id), ("env", env), ("cwd", cwd), ("timeout", timeout), ("spool", spool)):
            if value is not None:
                body[key] = value
        return self.request("POST", "/api/runs", body, timeout=max(self.timeout, 120))

    def signal(self, run_id: str, sig: str = "TERM", grace: Optional[float] = None) -> dict:
        body = {"signal": sig}
        if grace is not None:
            body["grace"] = grace
        return self.request("POST", _path(run_id, "/signal"), body)

    def clean(self, run_id: str, force: bool = False) -> None:
        self.request("DELETE", _path(run_id) + ("?force=true" if force else ""))

    def wait(self, run_id: str, timeout: Optional[float] = None, poll: float = 60.0) -> dict:
        """The run's view once it ended with all its output held (long
        polls of ``poll`` seconds), or as it is after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
            view = self.request("GET", _path(run_id, "/wait") + _q({"timeout": "%g" % wait}),
                                timeout=wait + self.timeout)
            if view["state"] in FINAL or (deadline is not None and time.monotonic() >= deadline):
                return view

    def output(self, run_id: str, stream: str = "stdout", offset: int = 0,
               length: Optional[int] = None) -> Tuple[bytes, bool]:
        """(bytes of ``stream`` held from ``offset``, whether they reach the
        run's end)."""
        conn, resp = self._open("GET", _path(run_id, "/output") + _q(
            {"stream": stream, "offset": offset, "length": length}))
        try:
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            self._raise(resp.status, data)
        if resp.getheader("Content-Length") is not None and len(data) != int(resp.getheader("Content-Length")):
            raise ServerGone("the output of %s ended short" % run_id)
        return data, resp.getheader("X-Chaperone-End") == "true"

    # Following (server-sent events) ---------------------------------------------------------

    def _sse(self, path: str, last_id: Optional[str]) -> Iterator[Tuple[Optional[str], str, str]]:
        """(id, event, data) of one event stream, until it ends."""
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        conn, resp = self._open("GET", path, headers=headers, timeout=60.0)
        try:
            if resp.status >= 400:
                self._raise(resp.status, resp.read())
            event_id, kind, data = None, "message", []
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException) as e:
                    raise ServerGone("lost chaperone serve: %s" % e) from None
                if not line:
                    return
                line = line.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield event_id, kind, "\n".join(data)
                    kind, data = "message", []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    event_id = value
                elif name == "event":
                    kind = value
                elif name == "data":
                    data.append(value)
        finally:
            conn.close()

    def follow(self, run_id: str, stream: str = "stdout", offset: int = 0,
               reconnect_for: float = 3600.0) -> Iterator[Tuple[int, bytes]]:
        """(offset, bytes) of ``stream`` from ``offset`` to the run's end,
        as they arrive; reconnects (from the offset reached) when the
        server goes away for less than ``reconnect_for`` seconds."""
        give_up = time.monotonic() + reconnect_for
        delay = 0.25
        while True:
            try:
                for _, kind, data in self._sse(_path(run_id, "/output") + _q({"stream": stream}), str(offset)):
                    if kind == "output":
                        d = json.loads(data)
                        chunk = base64.b64decode(d["data"])
                        if d["offset"] > offset:
                            raise ServeError("output gap in %s at %d" % (stream, offset))
                        chunk = chunk[offset - d["offset"]:]
                        if chunk:
                            yield offset, chunk
                            offset += len(chunk)
                        give_up = time.monotonic() + reconnect_for
                        delay = 0.25
                    elif kind == "end":
                        return
                    elif kind == "removed":
                        raise ServeNoSuchRun("run %s was removed" % run_id, 404)
            except ServerGone:
                if time.monotonic() + delay > give_up:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def events(self, since: Optional[str] = None, reconnect_for: float = 3600.0) -> Iterator[Tuple[str, str, dict]]:
        """(id, kind, data) of the run list's changes: ``snapshot`` (data:
        ``runs``), ``run`` (data: ``run``), ``removed`` (data: ``id``);
        forever, resuming after the last id seen when the server comes back."""
        give_up = time.monotonic() + reconnect_for
        delay = 0.25
        while True:
            try:
                for event_id, kind, data in self._sse("/api/events", since):
                    since = event_id
                    give_up = time.monotonic() + reconnect_for
                    delay = 0.25
                    yield event_id, kind, json.loads(data)
            except ServerGone:
                if time.monotonic() + delay > give_up:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
