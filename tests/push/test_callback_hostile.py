"""Hostile requests to the callback endpoint (issue 12, item 8): a client
error is 400/401, never 503 (which tells a well-behaved agent to retry
forever); a request line aiohttp cannot parse is one log line, not a
traceback.  Real HTTPS on loopback (raw TLS sockets where http.client
would refuse to send what is sent here)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl

import pytest

from support.callback_harness import Harness, run, state_body


def raw(harness, data: bytes) -> bytes:
    """Send ``data`` over a TLS connection to the server; what it answers."""
    with socket.create_connection(("127.0.0.1", harness.server.port), timeout=10) as sock:
        with harness.ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            out = b""
            while True:
                try:
                    part = tls.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    break
                if not part:
                    break
                out += part
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def post(path: str, token: str, body: bytes = b"{}") -> bytes:
    return (b"POST /api/v1/agent/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (path.encode(), token.encode("utf-8"), len(body))) + body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("char", ["\u017f", "\u212a", "\u0131", "\u0130"], ids=["long-s", "kelvin", "dotless-i", "dotted-I"])
def test_non_ascii_tokens_are_401(tmp_path, char):
    async def go():
        async with Harness(tmp_path) as h:
            for token in (char * 43, h.t1[:-1] + char, char + h.t1[1:], "s" * 42 + char):
                answer = await asyncio.to_thread(raw, h, post("r1/state", token, json.dumps(state_body()).encode()))
                assert status_of(answer) == 401, answer[:200]
            assert h.calls == []
    run(go())


@pytest.mark.timeout(60)
def test_numbers_out_of_range_are_400(tmp_path):
    async def go():
        async with Harness(tmp_path) as h:
            for route, body in (("completed", state_body(state="done", return_code=2 ** 70)),
                                ("completed", state_body(state="done", errno=-(2 ** 64))),
                                ("state", state_body(stdout_bytes=2 ** 63)),
                                ("state", state_body(pid=10 ** 30))):
                status, _, answer = await h.request("POST", "r1/" + route, body)
                assert status == 400, (route, body, status, answer)
            assert h.calls == []
            status, _, _ = await h.request("POST", "r1/completed", state_body(state="done", return_code=2 ** 63 - 1))
            assert status == 200  # (the largest that fits)
    run(go())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [33, 990, 100000])
def test_deep_bodies_are_400(tmp_path, depth, monkeypatch):
    import support.callback_harness as harness

    monkeypatch.setattr(harness, "MAX_BODY", 1 << 20)

    async def go():
        async with Harness(tmp_path) as h:
            for route in ("state", "completed"):
                for body in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth,
                             json.dumps(state_body())[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"):
                    status, _, answer = await h.request("POST", "r1/" + route, body.encode(),
                                                        headers={"Content-Type": "application/json"})
                    assert status == 400, (route, depth, status, answer)
            assert h.calls == []
    run(go())


@pytest.mark.timeout(60)
def test_malformed_requests_are_one_log_line(tmp_path, caplog):
    """Bad request lines, a line or a header too long, a bad method, bytes
    that are not HTTP: aiohttp answers 400 (or closes); each is logged in
    one line, without a traceback."""
    caplog.set_level(logging.DEBUG)

    async def go():
        async with Harness(tmp_path) as h:
            for data in (b"GARBAGE\r\n\r\n", b"POST /x HTTP/1.1 extra\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
                         b"POST /x HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n", b"\x00\xff\xfe\r\n\r\n",
                         b"POST /x HTTP/9.9\r\n\r\n", b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"):
                answer = await asyncio.to_thread(raw, h, data)
                assert status_of(answer) in (0, 400, 413, 414, 431, 505), answer[:200]
            # still serving
            status, _, _ = await h.request("POST", "r1/state", state_body())
            assert status == 200
    run(go())
    for record in caplog.records:
        assert record.exc_info is None or not isinstance(record.exc_info, tuple) or record.exc_info[0] is None, \
            (record.getMessage(), record.exc_info)
        assert "Traceback" not in record.getMessage()
    parse_errors = [r for r in caplog.records if r.name == "chaperone.push.endpoint" and r.levelno == logging.WARNING]
    assert len(parse_errors) >= 5, [r.getMessage() for r in caplog.records]
    assert all("\n" not in r.getMessage() for r in parse_errors)
