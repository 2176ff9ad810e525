"""`chaperone serve`'s local API, against the server as a real process
(local runs: real agents, real HTTPS callbacks): what each route answers,
exact bytes, who gets in, and bad input (one clear error, never a 500,
nothing changed)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from support.helpers import cli_env
from support.servehelpers import Server, kill_runs, raw, wait_for

from chaperone.serve import client as serve_client
from chaperone.serve.app import session_cookie

# All 256 byte values, invalid UTF-8, no trailing newline; then stderr; exit 3.
BINARY = ("import sys; o = sys.stdout.buffer; o.write(bytes(range(256)) * 3 + b'\\xff\\xfe<b>x</b>');"
          "o.flush(); sys.stderr.buffer.write(b'err\\x00\\x80'); sys.exit(3)")
EXPECT_OUT = bytes(range(256)) * 3 + b"\xff\xfe<b>x</b>"
EXPECT_ERR = b"err\x00\x80"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve-api") / "home").start()
    try:
        yield s
    finally:
        s.stop()
        kill_runs(s.home)


def auth(server, **extra):
    h = {"Host": "127.0.0.1:%d" % server.port, "Authorization": "Bearer " + server.token}
    h.update(extra)
    return h


def test_a_run_from_start_to_end_exact_bytes(server):
    c = server.client
    view = c.start("local", [sys.executable, "-c", BINARY], env={"X": "1"})
    assert view["host"] == "local" and view["argv"][0] == sys.executable and view["state"] in ("running", "done")
    end = c.wait(view["id"], timeout=30)
    assert end["state"] == "done" and end["exit_code"] == 3 and end["return_code"] == 3 and end["signal"] is None
    assert end["stdout_bytes"] == len(EXPECT_OUT) and end["stderr_bytes"] == len(EXPECT_ERR)
    assert end["duration"] is not None and end["end_time"] and end["last_seen"] and end["silent"] is False
    # Raw bytes, whole and from an offset with a length.
    assert c.output(view["id"]) == (EXPECT_OUT, True)
    assert c.output(view["id"], "stderr") == (EXPECT_ERR, True)
    assert c.output(view["id"], offset=250, length=10) == (EXPECT_OUT[250:260], False)
    # Followed as events (base64 with offsets), from an offset.
    got = b"".join(chunk for _, chunk in c.follow(view["id"], offset=7))
    assert got == EXPECT_OUT[7:]
    # The list and one run are the same object.
    listed = [v for v in c.runs(host=["local"], state=["done"]) if v["id"] == view["id"]]
    assert listed == [c.run(view["id"])]


def test_every_run_has_the_same_fields(server):
    """The server's run is the CLI's --json run: chaperone.models.RunInfo."""
    from chaperone.models import RunInfo
    from chaperone.serve.view import FIELDS

    runs = server.client.runs()
    assert runs
    for v in runs:
        assert tuple(v) == FIELDS == tuple(RunInfo.model_fields)
        assert RunInfo.model_validate(v).model_dump() == v


def test_kill_then_clean(server):
    c = server.client
    view = c.start("local", command="echo started; exec sleep 60", run_id="kill-me-%d" % os.getpid())
    wait_for(lambda: c.output(view["id"])[0] == b"started\n", 10, "output")
    with pytest.raises(serve_client.ServeUsageError) as e:  # still running: not cleaned
        c.clean(view["id"])
    assert e.value.status == 409 and c.run(view["id"])["state"] == "running"
    c.signal(view["id"], "TERM", grace=5)
    end = c.wait(view["id"], timeout=20)
    assert end["state"] == "done" and end["signal"] == "SIGTERM" and end["exit_code"] == 128 + signal.SIGTERM
    with pytest.raises(serve_client.ServeUsageError) as e:
        c.signal(view["id"], "KILL")
    assert e.value.status == 409 and "already ended" in str(e.value)
    before = str(c.server()["event_id"])
    c.clean(view["id"])
    with pytest.raises(serve_client.ServeNoSuchRun):
        c.run(view["id"])
    for _, kind, data in c.events(since=before):  # the run list hears of it
        if kind == "removed" and data["id"] == view["id"]:
            break
    assert not (server.home / "mirror" / view["id"]).exists()


def test_starting_the_same_id_again_is_the_same_run(server):
    c = server.client
    rid = "same-%d" % os.getpid()
    first = c.start("local", ["true"], run_id=rid)
    again = c.start("local", ["true"], id=rid)  # (id=, as Chaperone.start names it, or run_id=)
    assert again["id"] == first["id"] == rid
    with pytest.raises(serve_client.ServeUsageError) as e:
        c.start("local", ["false"], run_id=rid)
    assert e.value.status == 409 and "already used" in str(e.value)
    assert c.wait(rid, timeout=20)["exit_code"] == 0  # (its callbacks still reach the server)


def _snapshot(server):
    """What a rejected request must not change: every run and the records."""
    views = {v["id"]: (v["state"], v["stdout_bytes"]) for v in server.client.runs()}
    return views, sorted(os.listdir(server.home / "mirror")) if (server.home / "mirror").exists() else []


def test_bad_input_one_clear_error_and_nothing_changed(server):
    c = server.client
    running = c.start("local", command="exec sleep 60", run_id="bad-input-running")
    done = c.start("local", ["true"], run_id="bad-input-done")
    c.wait(done["id"], timeout=20)
    j = {"Content-Type": "application/json"}
    R, D = "/api/runs/" + running["id"], "/api/runs/" + done["id"]
    cases = [
        ("GET", "/api/runs?state=bogus", None, None, 400),
        ("GET", "/api/runs?bogus=1", None, None, 400),
        ("GET", "/api/runs/..%2Fetc", None, None, 400),
        ("GET", "/api/runs/no-such-run", None, None, 404),
        ("GET", R + "?x=1", None, None, 400),
        ("POST", "/api/runs", {}, b'{"host": "local", "argv": ["true"]}', 415),
        ("POST", "/api/runs", j, b"{nope", 400),
        ("POST", "/api/runs", j, b"[]", 400),
        ("POST", "/api/runs", j, b"{}", 400),
        ("POST", "/api/runs", j, b'{"host": "local"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "command": "true"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": []}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": [""]}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["a\\u0000b"]}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": "true"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": [1]}', 400),
        ("POST", "/api/runs", j, b'{"host": "-oProxyCommand=touch x", "argv": ["true"]}', 400),
        ("POST", "/api/runs", j, b'{"host": "a b", "argv": ["true"]}', 400),
        ("POST", "/api/runs", j, b'{"host": "", "argv": ["true"]}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "id": "../x"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["false"], "id": "bad-input-running"}', 409),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "env": {"A=B": "x"}}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "env": {"A": 1}}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "timeout": -1}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "timeout": "9"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "timeout": NaN}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "cwd": ""}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "spool": "/tmp"}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["true"], "sudo": true}', 400),
        ("POST", "/api/runs", j, b'{"host": "local", "argv": ["' + b"x" * (1 << 20) + b'"]}', 413),
        ("POST", R + "/signal", j, b'{"signal": "BOGUS"}', 400),
        ("POST", R + "/signal", j, b'{"signal": "SIG_IGN"}', 400),
        ("POST", R + "/signal", j, b'{"signal": "TERM", "grace": -1}', 400),
        ("POST", R + "/signal", j, b'{"sig": "TERM"}', 400),
        ("POST", R + "/signal", {}, b'{"signal": "TERM"}', 415),
        ("POST", D + "/signal", j, b'{"signal": "KILL"}', 409),
        ("POST", "/api/runs/no-such-run/signal", j, b'{"signal": "KILL"}', 404),
        ("DELETE", R, None, None, 409),
        ("DELETE", R + "?force=maybe", None, None, 400),
        ("DELETE", "/api/runs/no-such-run", None, None, 404),
        ("GET", R + "/output?stream=stdin", None, None, 400),
        ("GET", R + "/output?offset=-1", None, None, 400),
        ("GET", R + "/output?offset=abc", None, None, 400),
        ("GET", R + "/output?length=0", None, None, 400),
        ("GET", R + "/output?offset=1&offset=2", None, None, 400),
        ("GET", R + "/output?length=5", {"Accept": "text/event-stream"}, None, 400),
        ("GET", R + "/output", {"Accept": "text/event-stream", "Last-Event-ID": "x"}, None, 400),
        ("GET", R + "/wait?timeout=1000", None, None, 400),
        ("GET", "/api/runs/no-such-run/wait", None, None, 404),
        ("GET", "/api/events?since=abc", None, None, 400),
        ("PUT", "/api/runs", j, b"{}", 405),
        ("GET", R + "/signal", None, None, 405),
        ("GET", "/api/nothing-here", None, None, 404),
        ("GET", "/static/../pyproject.toml", None, None, 404),
    ]
    before = _snapshot(server)
    for method, path, headers, body, status in cases:
        got, hdrs, answer = raw(server.port, method, path, auth(server, **(headers or {})), body)
        where = "%s %s %r" % (method, path, (body or b"")[:80])
        assert got == status, (where, got, answer)
        assert isinstance(answer, dict) and set(answer) == {"error"}, (where, answer)
        assert isinstance(answer["error"], str) and answer["error"] and "\n" not in answer["error"], where
        assert "Traceback" not in answer["error"]
        assert _snapshot(server) == before, where
    assert not os.path.exists("x")  # (the ProxyCommand never ran)
    c.signal(running["id"], "KILL")


def test_who_gets_in(server):
    c = server.client
    rid = c.start("local", ["true"], run_id="auth-%d" % os.getpid())["id"]
    c.wait(rid, timeout=20)
    host = {"Host": "127.0.0.1:%d" % server.port}
    j = {"Content-Type": "application/json"}
    marker = server.home / ("must-not-exist-%d" % time.monotonic_ns())
    body = json.dumps({"host": "local", "argv": ["touch", str(marker)]}).encode()
    cookie = {"Cookie": "chaperone_session=" + session_cookie(server.token)}
    routes = [("GET", "/api/server"), ("GET", "/api/runs"), ("GET", "/api/runs/" + rid),
              ("GET", "/api/runs/%s/output" % rid), ("GET", "/api/runs/%s/wait?timeout=0" % rid),
              ("GET", "/api/events"), ("GET", "/metrics"), ("POST", "/api/runs"),
              ("POST", "/api/runs/%s/signal" % rid), ("DELETE", "/api/runs/" + rid)]
    before = _snapshot(server)
    for method, path in routes:
        b = body if method == "POST" else None
        # No credential; a wrong token; a malformed header; the token in the query.
        for extra in ({}, {"Authorization": "Bearer " + "A" * 43}, {"Authorization": server.token},
                      {"Cookie": "chaperone_session=nope"}):
            status, hdrs, answer = raw(server.port, method, path, dict(host, **j, **extra), b)
            assert status == 401 and "error" in answer, (method, path, extra, status)
        status, _, _ = raw(server.port, method, path + ("&" if "?" in path else "?") + "token=" + server.token,
                           dict(host, **j), b)
        assert status == 401, (method, path)
        # The right token with a foreign Host (DNS rebinding), or none.
        for h in ({"Host": "evil.example:%d" % server.port}, {"Host": "127.0.0.1:1"}, {"Host": "localhost"}):
            status, _, answer = raw(server.port, method, path, dict(h, **j, Authorization="Bearer " + server.token), b)
            assert status == 403 and "Host" in answer["error"], (method, path, h)
        status, _, _ = raw(server.port, method, path, dict(j, Authorization="Bearer " + server.token), b)
        assert status in (400, 403), (method, path)  # (no Host at all: aiohttp refuses the request itself)
        if method != "GET":
            # The browser's cookie without the CSRF header; the token from another origin.
            status, _, answer = raw(server.port, method, path, dict(host, **j, **cookie), b)
            assert status == 403 and "X-Chaperone-CSRF" in answer["error"], (method, path)
            status, _, answer = raw(server.port, method, path,
                                    dict(host, **j, Origin="http://evil.example", Authorization="Bearer " + server.token), b)
            assert status == 403, (method, path)
        else:
            status, _, _ = raw(server.port, method, path if "events" not in path else "/api/server",
                               dict(host, **cookie))
            assert status == 200, (method, path)
    assert _snapshot(server) == before
    time.sleep(0.5)
    assert not marker.exists()
    # With the cookie and the CSRF header, the browser's POST goes through.
    status, _, answer = raw(server.port, "POST", "/api/runs", dict(host, **j, **cookie, **{"X-Chaperone-CSRF": "1"}),
                            b'{"host": "local", "argv": ["true"]}')
    assert status == 201, answer


def test_sign_in_link_sets_a_strict_httponly_cookie(server):
    host = {"Host": "127.0.0.1:%d" % server.port}
    status, headers, _ = raw(server.port, "GET", "/?token=" + server.token, host)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("chaperone_session=" + session_cookie(server.token) + ";")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and server.token not in cookie
    status, _, _ = raw(server.port, "GET", "/?token=wrong", host)
    assert status == 401
    status, headers, page = raw(server.port, "GET", "/", host)
    assert status == 200 and b"<table" in page and "script-src 'self'" in headers["Content-Security-Policy"]


def test_events_resume_from_an_id(server):
    c = server.client
    events = c.events()
    first_id, kind, snap = next(events)
    assert kind == "snapshot" and isinstance(snap["runs"], list)
    events.close()
    rid = "events-%d" % os.getpid()
    c.start("local", ["true"], run_id=rid)
    c.wait(rid, timeout=20)
    time.sleep(0.3)  # (published within the flush interval)
    seen = []
    for event_id, kind, data in c.events(since=first_id):
        assert kind == "run" and int(event_id) > int(first_id)
        seen.append((int(event_id), data["run"]))
        if data["run"]["id"] == rid and data["run"]["state"] == "done":
            break
    ids = [i for i, _ in seen]
    assert ids == sorted(set(ids))  # increasing, none twice
    mine = [v["state"] for _, v in seen if v["id"] == rid]
    assert mine and mine[-1] == "done", mine  # published while no client listened, delivered on resume
    # An id this server never gave (e.g. from before a restart): a snapshot.
    _, kind, data = next(c.events(since="1"))
    assert kind == "snapshot" and rid in [v["id"] for v in data["runs"]]


def test_metrics(server):
    c = server.client
    rid = c.start("local", ["echo", "metrics"], run_id="metrics-%d" % os.getpid())["id"]
    c.wait(rid, timeout=20)
    raw(server.port, "POST", "/api/v1/agent/x/state", {"Host": "127.0.0.1:%d" % server.port})  # (not here: 401)
    status, headers, text = raw(server.port, "GET", "/metrics", auth(server))
    text = text.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'chaperone_runs{host="local",state="done"}' in text
    assert 'chaperone_callbacks_total{kind="completed",status="200"}' in text
    assert 'chaperone_output_bytes_total{stream="stdout"}' in text
    assert "chaperone_ssh_connections 0.0" in text and "chaperone_catch_ups_total" in text


def test_files_are_private_and_a_second_server_is_refused(server):
    d = server.home / "serve"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("token", "server.json", "lock"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    info = json.loads((d / "server.json").read_text())
    assert info["pid"] == server.proc.pid and info["url"] == server.url and info["port"] == server.port
    assert serve_client.discover(server.home)["token"] == server.token
    second = subprocess.run(Server(server.home).argv(), env=cli_env(server.home), capture_output=True, timeout=30)
    assert second.returncode != 0
    err = second.stderr.decode().strip()
    assert "\n" not in err and "already running" in err and str(server.proc.pid) in err and server.token not in err


def test_a_stale_server_json_is_ignored(tmp_path):
    home = tmp_path / "home"
    d = home / "serve"
    d.mkdir(parents=True, mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / "server.json").write_text(json.dumps({"pid": dead.pid, "pid_start": time.time(), "url": "http://x/"}))
    assert serve_client.discover(home) is None
    res = subprocess.run(Server(home).argv("--url"), env=cli_env(home), capture_output=True, timeout=30)
    assert res.returncode == 1 and b"no server is running" in res.stderr
    s = Server(home).start()
    try:
        assert serve_client.discover(home)["pid"] == s.proc.pid
        stop = subprocess.run(Server(home).argv("--stop"), env=cli_env(home), capture_output=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
        assert s.proc.wait(10) == 0 and not (d / "server.json").exists()
    finally:
        s.kill()


def test_a_quiet_run_is_heard_by_its_heartbeat(server):
    """No output for longer than silent_after: the agent's heartbeats (at
    the server's interval, 1 s here) keep it heard, not silent."""
    c = server.client
    rid = c.start("local", ["sleep", "30"], run_id="quiet-%d" % os.getpid())["id"]
    first = wait_for(lambda: c.run(rid)["last_seen"], 5, "a first callback")
    silent_after = c.server()["silent_after"]
    polls = _metric(server, 'chaperone_catch_ups_total{result="ok"}')
    time.sleep(silent_after + 1)
    v = c.run(rid)
    assert v["state"] == "running" and v["stdout_bytes"] == 0
    assert v["last_seen"] > first and not v["silent"], v
    # Heard by its heartbeats, not by polls of its spool (due after poll_after without news).
    assert _metric(server, 'chaperone_catch_ups_total{result="ok"}') == polls
    c.signal(rid, "KILL")


def _metric(server, name) -> float:
    _, _, text = raw(server.port, "GET", "/metrics", auth(server))
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_detach_prints_the_url_and_returns(tmp_path):
    home = tmp_path / "home"
    s = Server(home)
    res = subprocess.run(s.argv("--detach"), env=cli_env(home), capture_output=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        lines = res.stdout.decode().splitlines()
        assert "in the background" in lines[0] and lines[1].startswith(s.url + "?token=")
        info = serve_client.discover(home)
        assert info is not None and info["token"] == lines[1].split("?token=")[1]
        assert serve_client.connect(home).server()["pid"] == info["pid"]
        log = (home / "serve" / "log").read_bytes()
        assert info["token"].encode() not in log and stat.S_IMODE((home / "serve" / "log").stat().st_mode) == 0o600
        again = subprocess.run(s.argv("--detach"), env=cli_env(home), capture_output=True, timeout=60)
        assert again.returncode == 1 and b"already running" in again.stderr
    finally:
        stop = subprocess.run(s.argv("--stop"), env=cli_env(home), capture_output=True, timeout=60)
    assert stop.returncode == 0 and serve_client.discover(home) is None
