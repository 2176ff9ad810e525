"""Real network outages: the host is a network namespace of its own, reached
over a veth pair, and the link is taken down (``ip link set ... down``) for
longer than SSH keepalive needs to notice (3 s x 3).  The run on the host
must go on, and every client must end with all of its output, once.

Needs root (network namespaces) and OpenSSH: skipped otherwise, but under
``CHAPERONE_REQUIRE_SSHD=1`` as root a namespace that cannot be made is a
failure.  Traffic goes only to loopback and to the namespace made here; the
namespace, the veth pair and the sshd in it are removed even when a test
fails.
"""

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import textwrap
import time

import pytest

from support.helpers import cli, cli_popen, wait_for
from support.netns import ALIAS, nshost  # noqa: F401  (nshost: the fixture)

from chaperone.api import Chaperone

@pytest.fixture
def spool(tmp_path):
    """The runs' spool root on the host (``--spool``): the namespace shares
    our filesystem, so the test reads it directly."""
    return tmp_path / "spool"


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def file_size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _agents(spool):
    """Pids of the agents (started by these tests) that serve ``spool``."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(spool) in cmd and any("agent" in a for a in cmd):
            pids.append(p.pid)
    return pids


def agent_alive(pid, spool) -> bool:
    return pid is not None and pid in _agents(spool)


def kill_agents(spool):
    for pid in _agents(spool):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def lines(n: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(1, n + 1))


KEEPALIVE_DETECTION = 12.0  # asyncssh: keepalive_interval 3 s, keepalive_count_max 3
OUTAGE = KEEPALIVE_DETECTION + 3.0


# --- 1. the foreground CLI across an outage ---------------------------------------------


@pytest.mark.timeout(75)
def test_foreground_run_survives_a_link_outage(nshost, spool, tmp_path):
    """`chaperone run` on a host whose link goes down for longer than
    keepalive detection: it says once per attempt that it is reconnecting,
    and ends with exit 0 and every line exactly once; the program went on
    writing to its spool all through the outage."""
    n = 200  # ~20 s: still running when the link comes back
    run_id = "netns-fg-" + secrets.token_hex(3)
    home = tmp_path / "home"
    home.mkdir()
    out_file = tmp_path / "cli.out"
    spooled = spool / run_id / "stdout"
    with open(out_file, "wb") as out:
        proc = cli_popen(home, "-F", nshost.config_file, "run", ALIAS, "--id", run_id, "--spool", spool,
                         "--", "sh", "-c", "for i in $(seq 1 %d); do echo line $i; sleep 0.1; done" % n,
                         stdout=out)
    try:
        def started():
            assert proc.poll() is None, "the CLI ended early: %r" % proc.stderr.read()
            return out_file.read_bytes().count(b"\n") >= 10

        wait_for(started, 20, "the first lines over SSH")
        with nshost.outage():
            t0 = time.monotonic()
            before = file_size(spooled)
            assert not nshost.reachable(), "the link is down, yet sshd answers"
            time.sleep(OUTAGE)
            during = file_size(spooled)
            shown_during = out_file.read_bytes().count(b"\n")
        outage = time.monotonic() - t0
        assert proc.poll() is None, "the CLI gave up during the outage: %r" % proc.stderr.read()
        stderr = proc.communicate(timeout=45)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = out_file.read_bytes()
    notices = stderr.decode(errors="replace").splitlines()
    assert proc.returncode == 0, stderr
    assert out == lines(n)
    # The program went on during the outage, and nothing of it came through the dead link.
    assert outage >= KEEPALIVE_DETECTION
    assert during >= before + len(b"line 100\n") * 50, (before, during)
    assert shown_during < n
    assert (spool / run_id / "stdout").read_bytes() == lines(n)
    # It told the user, one line at a time, and nothing else on stderr.
    assert notices, "no reconnect notice on stderr"
    assert "lost" in notices[0], notices  # keepalive noticed the dead link
    assert all(l.startswith("chaperone: ") and l.endswith("reconnecting") for l in notices), notices
    assert len(notices) <= 10, notices


# --- 2. the scheduler's callback tunnel across an outage ----------------------------------


FAST = {"retry_frequency": 0.5, "output_latency": 0.05}

WRITER = textwrap.dedent("""
    import hashlib, sys, time
    blocks, pause = int(sys.argv[1]), float(sys.argv[2])
    h = hashlib.sha256()
    for i in range(blocks):
        block = hashlib.sha256(b"netns" + str(i).encode()).digest() * 32768  # 1 MiB
        h.update(block)
        sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        time.sleep(pause)
    sys.stderr.write(h.hexdigest())
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ssh_client", ["openssh", "asyncssh"])
def test_scheduler_callbacks_survive_a_link_outage(nshost, spool, tmp_path, ssh_client):
    """HTTPS callbacks through the SSH remote forward; the link goes down
    2 s into a ~10 s, 20 MiB run and comes back after the run ended: the
    tunnel heals, and wait() ends with exactly the program's bytes."""
    blocks = 20

    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(nshost.config_file)],
                             config=FAST, heal_interval=0.5, ssh_client=ssh_client) as ch:
            run = await ch.start(ALIAS, ["python3", "-c", WRITER, str(blocks), "0.5"],
                                 ssh={"spool": str(spool)})
            rid, push = run.id, ch.push
            await asyncio.sleep(2.0)
            old_tunnel = push.tunnel(rid)
            held_before = push.mirror(rid).held("stdout")
            try:
                nshost.link(False)
                await asyncio.sleep(OUTAGE)
                held_during = push.mirror(rid).held("stdout")
                old_closed = old_tunnel.closed()
            finally:
                nshost.link(True)
            t_up = time.monotonic()
            st = (await run.wait()).model_dump()
            settle = time.monotonic() - t_up
            m = push.mirror(rid)
            new_tunnel = push.tunnel(rid)
            return dict(st=st, out=m.read("stdout"), err=m.read("stderr"), held_before=held_before,
                        held_during=held_during, old_closed=old_closed,
                        new_tunnel_is_new=new_tunnel is not old_tunnel, new_closed=new_tunnel.closed(),
                        settle=settle)

    try:
        r = asyncio.run(asyncio.wait_for(main(), 80))
    finally:
        # The agent may still be trying to deliver its final state to this
        # scheduler, now gone (see the xfail test below): do not leave it.
        kill_agents(spool)
    st, out, err = r["st"], r["out"], r["err"]
    facts = {k: v for k, v in r.items() if k not in ("st", "out", "err")}
    assert st["state"] == "done" and st["return_code"] == 0, (st, facts)
    assert len(out) == st["stdout_bytes"] == blocks << 20
    assert len(err) == st["stderr_bytes"] == 64
    assert hashlib.sha256(out).hexdigest() == err.decode()
    # The spool on the host holds the same bytes.
    assert (spool / st["id"] / "stdout").stat().st_size == blocks << 20
    # The fault was real: callbacks flowed before it, the tunnel's
    # connection died of it, and a new tunnel took over (not the 30 s
    # safety net of wait()).
    assert 0 < r["held_before"] < blocks << 20, facts
    assert r["held_during"] < blocks << 20, facts
    assert r["old_closed"], ("keepalive did not notice the outage", facts)
    assert r["new_tunnel_is_new"] and not r["new_closed"], facts
    assert r["settle"] < 25, facts  # wait()'s own safety net would take 30 s


@pytest.mark.timeout(45)
def test_new_callback_address_reaches_a_run_that_ended(nshost, spool, tmp_path):
    """What the heal does for a run that ended during an outage: the agent,
    still trying to deliver its final state to a dead address, is told the
    new one (PushReceiver.rewire, as its heal does), delivers through the new
    tunnel, and exits.  No catch-up here: only the callbacks."""
    run_id = "netns-rw-" + secrets.token_hex(3)

    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(nshost.config_file)],
                             config=FAST) as ch:
            push = ch.push
            # Port 1 on the host's loopback: nothing listens (the old tunnel).
            dead = {"url": "https://127.0.0.1:1/api/v1/agent/", "token": "t" * 43, "cert": push.server.cert_pem}
            await ch.start(ALIAS, ["sh", "-c", "echo ended"], id=run_id, ssh={"spool": str(spool)},
                           callback=dead, config=FAST)
            await asyncio.get_running_loop().run_in_executor(
                None, wait_for, lambda: b'"done"' in read_bytes(spool / run_id / "state.json"), 10,
                "the program's end")
            await asyncio.sleep(1.0)  # the agent is now retrying the dead address
            await push.rewire(run_id)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10 and (push.states.get(run_id) or {}).get("state") != "done":
                await asyncio.sleep(0.1)
            while push.states.get(run_id) and time.monotonic() - t0 < 15 and _agents(spool):
                await asyncio.sleep(0.1)  # acknowledged: the agent exits
            return push.states.get(run_id), push.mirror(run_id).read("stdout"), _agents(spool)

    try:
        st, out, agents = asyncio.run(asyncio.wait_for(main(), 35))
    finally:
        kill_agents(spool)
    assert st is not None, "no state came through the callbacks at the new address"
    assert st["state"] == "done" and st["return_code"] == 0, st
    assert out == b"ended\n"
    assert not agents, "the agent was still running after its final state was delivered"


# --- 3. the run goes on, on the host, while the link is down ------------------------------


@pytest.mark.timeout(60)
def test_run_goes_on_during_the_outage(nshost, spool, tmp_path):
    """Seen from inside the namespace while the host is unreachable: the
    spool's stdout grows (read with ``ip netns exec NS stat``); afterwards
    `chaperone wait` and `logs` have it all."""
    n = 60  # ~6 s
    run_id = "netns-bg-" + secrets.token_hex(3)
    home = tmp_path / "home"
    home.mkdir()
    cfg = ["-F", nshost.config_file]
    res = cli(home, *cfg, "run", "-d", ALIAS, "--id", run_id, "--spool", spool, "--",
              "sh", "-c", "for i in $(seq 1 %d); do echo line $i; sleep 0.1; done" % n)
    assert res.returncode == 0, res.stderr
    spooled = spool / run_id / "stdout"
    wait_for(lambda: nshost.size_inside(spooled) > 0, 10, "the first output in the spool")
    with nshost.outage():
        assert not nshost.reachable()
        first = nshost.size_inside(spooled)
        time.sleep(3.0)
        second = nshost.size_inside(spooled)
        assert not nshost.reachable()
    assert second > first + len(b"line 10\n") * 10, (first, second)
    res = cli(home, *cfg, "wait", run_id, timeout=40)
    assert res.returncode == 0, res.stderr
    res = cli(home, *cfg, "logs", run_id, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == lines(n)
