"""The callback server over real HTTPS on loopback (its real certificate),
driven by a stdlib ``http.client`` in a thread as the agent's sender is:
:class:`Harness` (tests/push/test_callback_server.py,
tests/push/test_callback_hostile.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
from pathlib import Path

from chaperone.push.endpoint import CallbackServer
from chaperone.push.mirror import OutputMirror

MAX_BODY = 4096


def state_body(run_id="r1", state="running", **extra) -> dict:
    body = {
        "version": 1,
        "id": run_id,
        "host": "remote",
        "state": state,
        "agent_pid": 123,
        "pid": 124,
        "pgid": 124,
        "start_time": "2024-01-01T00:00:00Z",
        "spool": "/tmp/spool/" + run_id,
    }
    if state in ("done", "error", "lost"):
        body.update(return_code=0, end_time="2024-01-01T00:00:01Z")
    body.update(extra)
    return body


class Harness:
    """A started server with two registered runs, r1 and r2."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.calls = []

    async def __aenter__(self) -> "Harness":
        self.server = CallbackServer(max_body=MAX_BODY)
        await self.server.start(cert_dir=self.tmp_path / "tls")
        self.ctx = ssl.create_default_context(cadata=self.server.cert_pem)
        assert self.ctx.verify_mode == ssl.CERT_REQUIRED and self.ctx.check_hostname
        self.m1 = OutputMirror(self.tmp_path / "r1")
        self.m2 = OutputMirror(self.tmp_path / "r2")

        async def on_state_async(run_id, state, final):
            await asyncio.sleep(0.01)  # lets concurrent duplicates overlap
            self.calls.append((run_id, state, final))

        def on_state_sync(run_id, state, final):
            self.calls.append((run_id, state, final))

        self.t1 = self.server.register("r1", self.m1, on_state_async)
        self.t2 = self.server.register("r2", self.m2, on_state_sync)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()

    def _request(self, method, path, body, headers, chunked):
        conn = http.client.HTTPSConnection("127.0.0.1", self.server.port, context=self.ctx, timeout=10)
        try:
            if chunked:
                conn.request(method, path, body=iter([body[i:i + 1000] for i in range(0, len(body), 1000)]),
                             headers=headers, encode_chunked=True)
            else:
                conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
        finally:
            conn.close()

    async def request(self, method, path, body=b"", token="r1", headers=None, chunked=False):
        """``token``: a run name ("r1"/"r2"), a raw token string, or None."""
        h = {"Content-Type": "application/octet-stream"}
        tok = {"r1": self.t1, "r2": self.t2}.get(token, token)
        if tok is not None:
            h["Authorization"] = f"Bearer {tok}"
        h.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        url = path if path.startswith("/") else "/api/v1/agent/" + path
        return await asyncio.to_thread(self._request, method, url, body, h, chunked)

    async def output(self, offset, data, run="r1", stream="stdout", token=None):
        return await self.request("POST", f"{run}/output/{stream}?offset={offset}", data, token or run)

    def snapshot(self):
        return (
            [(m.read("stdout"), m.read("stderr")) for m in (self.m1, self.m2)],
            len(self.calls),
        )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))
