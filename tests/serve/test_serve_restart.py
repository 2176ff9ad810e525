"""`chaperone serve` SIGKILLed with runs in flight and started again: every
unfinished run is re-attached, and every byte arrives exactly once (local
runs; and a remote host through the real sshd, its callbacks through the SSH
tunnel).  A host whose link is cut (the netns test host) is shown silent
within a bounded time, its run's state stays right, and polling reconciles
when the link is back."""

import threading
import time

import pytest

from support.servehelpers import Server, kill_runs, raw, wait_for

# Writes n lines and a binary block, a little at a time; exit 0.
WRITER = ("import sys, time\n"
          "n, pause = int(sys.argv[1]), float(sys.argv[2])\n"
          "for i in range(n):\n"
          "    sys.stdout.buffer.write(b'line %d \\xff\\x00 of ' % i + sys.argv[3].encode() + b'\\n')\n"
          "    sys.stdout.flush()\n"
          "    if i % 10 == 0: sys.stderr.write('e%d\\n' % i); sys.stderr.flush()\n"
          "    time.sleep(pause)\n")


def expected(n, tag):
    out = b"".join(b"line %d \xff\x00 of %s\n" % (i, tag.encode()) for i in range(n))
    err = b"".join(b"e%d\n" % i for i in range(0, n, 10))
    return out, err


def _follow(client, rid, into):
    into[rid] = b"".join(chunk for _, chunk in client.follow(rid, reconnect_for=60))


def restart_mid_run(server, host, n, pause, count, spool=None):
    c = server.client
    ids = []
    for i in range(count):
        tag = "run%d" % i
        v = c.start(host, ["python3", "-c", WRITER, str(n), str(pause), tag], spool=spool)
        ids.append((v["id"], tag))
    followed = {}
    threads = [threading.Thread(target=_follow, args=(c, rid, followed), daemon=True) for rid, _ in ids]
    for t in threads:
        t.start()
    wait_for(lambda: all(c.run(rid)["stdout_bytes"] > 0 for rid, _ in ids), 30, "output before the kill")
    server.kill()  # SIGKILL: no goodbye
    time.sleep(2 * pause * 10)  # the runs go on writing meanwhile
    server.start()
    server.wait_attached(60)
    c = server.client
    for rid, tag in ids:
        end = c.wait(rid, timeout=120)
        out, err = expected(n, tag)
        assert end["state"] == "done" and end["exit_code"] == 0, end
        assert end["stdout_bytes"] == len(out) and end["stderr_bytes"] == len(err)
        assert c.output(rid) == (out, True)
        assert c.output(rid, "stderr") == (err, True)
        mirror = server.home / "mirror" / rid
        assert (mirror / "stdout").read_bytes() == out  # nothing twice, nothing missing
    for t in threads:
        t.join(60)
    for rid, tag in ids:
        assert followed.get(rid) == expected(n, tag)[0], rid  # a follower across the restart
    return ids


@pytest.mark.timeout(120)
def test_restart_with_local_runs_in_flight(tmp_path):
    server = Server(tmp_path / "home", heartbeat=1.0).start()
    try:
        restart_mid_run(server, "local", n=120, pause=0.02, count=4)
        log = server.log_text()
        assert "re-attached 4 of 4 unfinished runs" in log, log
    finally:
        server.kill()
        kill_runs(tmp_path)


@pytest.mark.timeout(150)
def test_restart_with_remote_runs_in_flight(sshd, tmp_path):
    server = Server(tmp_path / "home", heartbeat=1.0, ssh_config=sshd.config_file).start()
    try:
        restart_mid_run(server, "testhost", n=150, pause=0.02, count=2, spool=str(tmp_path / "spool"))
        status, _, text = raw(server.port, "GET", "/metrics", {
            "Host": "127.0.0.1:%d" % server.port, "Authorization": "Bearer " + server.token})
        assert b'chaperone_callbacks_total{kind="output",status="200"}' in text  # pushed through the tunnel
        log = server.log_text()
        assert "re-attached 2 of 2 unfinished runs" in log, log
    finally:
        server.kill()
        kill_runs(tmp_path)


@pytest.fixture(scope="module")
def nshost():
    from support.netns import nshost as make  # (the netns test host: skipped where it cannot be made)

    yield from make.__wrapped__()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_silent_host_gets_a_badge_and_is_polled_back(nshost, tmp_path):
    """The link to the host goes down mid-run: within silent_after (+ the
    monitor's tick) the run shows ``silent`` while its state stays
    ``running``; polls fail meanwhile (counted); when the link is back, a
    poll over SSH reconciles, the badge goes, and the run ends with every
    byte."""
    from support.netns import ALIAS

    server = Server(tmp_path / "home", heartbeat=1.0, ssh_config=nshost.config_file).start()
    c = server.client
    try:
        info = c.server()
        n, pause = 400, 0.05  # ~20 s
        rid = c.start(ALIAS, ["python3", "-c", WRITER, str(n), str(pause), "ns"], spool=str(tmp_path / "spool"))["id"]
        wait_for(lambda: c.run(rid)["stdout_bytes"] > 0, 30, "first output")
        assert not c.run(rid)["silent"]
        with nshost.outage():
            cut = time.monotonic()
            v = wait_for(lambda: (lambda v: v if v["silent"] else None)(c.run(rid)),
                         info["silent_after"] + 5, "the silent badge")
            took = time.monotonic() - cut
            assert v["state"] == "running" and v["exit_code"] is None, v  # a badge, not a wrong state
            assert took <= info["silent_after"] + 2, took
            wait_for(lambda: b'chaperone_catch_ups_total{result="failed"}' in raw(
                server.port, "GET", "/metrics", {"Host": "127.0.0.1:%d" % server.port,
                                                 "Authorization": "Bearer " + server.token})[2],
                     30, "a failed poll of the silent host")
        back = time.monotonic()
        wait_for(lambda: not c.run(rid)["silent"], 30, "the badge to go")
        assert time.monotonic() - back < 30
        end = c.wait(rid, timeout=90)
        out, err = expected(n, "ns")
        assert end["state"] == "done" and end["exit_code"] == 0
        assert c.output(rid) == (out, True) and c.output(rid, "stderr") == (err, True)
    finally:
        server.kill()
        kill_runs(tmp_path)


@pytest.mark.timeout(120)
def test_a_start_that_never_arrived_is_failed_not_lost(tmp_path):
    """Records of starts that never reached their host (a scheduler killed
    while sending them): ``serve`` settles them as the library does, an
    old one ``failed`` (safe to start again), one young enough to be still
    on its way left ``starting`` (before: both ``lost``, "its spool is
    gone", which says the program may have run)."""
    from chaperone.records import Records
    from chaperone.states import START_GRACE

    home = tmp_path / "home"
    home.mkdir()
    records = Records(home / "runs.db")
    for rid in ("ghost-old", "ghost-young"):
        records.add(rid, "local", {"host": "local", "root": str(home / "spool")}, ["true"])
    records.db.execute("UPDATE runs SET created = created - ? WHERE id = 'ghost-old'", (START_GRACE + 1,))
    records.close()
    server = Server(home).start()
    try:
        server.wait_attached(60)
        c = server.client
        old, young = c.run("ghost-old"), c.run("ghost-young")
    finally:
        server.stop()
    assert old["state"] == "failed" and "never reached" in (old["error"] or ""), old
    assert young["state"] == "starting", young
