"""The SSH transport on a real OpenSSH server: agent shipping, reconnecting
after the client or the SSH session dies, many runs over one connection.

The sshd fixture logs in as this user, so the "remote" home is this user's
home: the agent lives in ``~/.chaperone/agent-<hash>.py`` there.  Runs use a
spool under the test's tmp_path (``--spool``) where they can, so nothing
piles up in ``~/.chaperone/runs``.
"""

import asyncio
import signal
import json
import os
import pwd
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support.helpers import CLI, cli_env

REMOTE_HOME = Path(pwd.getpwuid(os.getuid()).pw_dir)


def chaperone(sshd, home, *args, timeout=60):
    return subprocess.run(CLI + ["-F", sshd.config_file] + [str(a) for a in args], env=cli_env(home),
                          cwd=str(home), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def popen(sshd, home, *args):
    return subprocess.Popen(CLI + ["-F", sshd.config_file] + [str(a) for a in args], env=cli_env(home),
                            cwd=str(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def lines_script(n, delay=0.1, code=0):
    """sh: ``line i`` on stdout for i in 1..n, ``err i`` on stderr every
    tenth, ``delay`` s apart, then exit ``code``."""
    return ("for i in $(seq 1 %d); do echo line $i; [ $((i %% 10)) -eq 0 ] && echo err $i >&2; "
            "sleep %s; done; exit %d" % (n, delay, code))


def expected_lines(n):
    out = b"".join(b"line %d\n" % i for i in range(1, n + 1))
    err = b"".join(b"err %d\n" % i for i in range(10, n + 1, 10))
    return out, err


class Reader:
    """Collects a pipe in a thread; ``wait_for(pred)`` polls what came."""

    def __init__(self, pipe):
        self.data = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe):
        for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            with self._lock:
                self.data += chunk

    def wait_for(self, pred, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if pred(self.data):
                    return self.data
            time.sleep(0.02)
        raise AssertionError("timed out waiting; got %r" % self.data[-500:])

    def join(self, timeout=30):
        self._thread.join(timeout)
        return self.data


# Agent shipping ----------------------------------------------------------


def agent_hash():
    from chaperone.agent_source import agent_hash

    return agent_hash()


def agent_file(home=REMOTE_HOME):
    from chaperone.agent_source import agent_bytes

    return Path(home) / ".chaperone" / ("agent-%s.py" % agent_hash()[:16]), agent_bytes()


@pytest.fixture
def own_host(tmp_path):
    """An sshd whose sessions have a home of their own: its agent file can
    be removed or damaged without pulling it from under the tests that run
    meanwhile (in the other xdist worker) on the shared sshd."""
    from support.sshd import require_sshd, sshd_with_home

    require_sshd()
    home = tmp_path / "remote-home"
    server = sshd_with_home(home)
    try:
        yield server, home
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_agent_is_shipped_again_after_removal(own_host, tmp_path):
    sshd, home = own_host
    path, content = agent_file(home)
    path.unlink(missing_ok=True)
    res = chaperone(sshd, tmp_path, "run", "--spool", tmp_path / "spool", "testhost", "--", "echo", "hi")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"hi\n", b"")
    assert path.read_bytes() == content
    # Private: the file 0600 in a 0700 directory, no temporary left behind.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not list(path.parent.glob(".agent.*.tmp"))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", ["modified", "truncated", "empty"])
def test_damaged_agent_is_detected_and_shipped_again(own_host, tmp_path, damage):
    sshd, home = own_host
    path, content = agent_file(home)
    path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    # Same name, other content.  "modified" is still a working agent (its
    # own --expect-hash check catches it); "truncated" and "empty" never get
    # that far (the loader's check must).
    bad = {"modified": content + b"\n# changed\n",
           "truncated": content[: len(content) // 2].rsplit(b"\n", 1)[0] + b"\n",
           "empty": b""}[damage]
    path.write_bytes(bad)
    if damage == "modified":
        # The agent's own check, on the host: exit 97 ("ship me again"),
        # nothing run, nothing printed.
        check = subprocess.run(
            sshd.ssh_argv("python3 -I -S %s --expect-hash %s list" % (path, agent_hash())),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        assert (check.returncode, check.stdout, check.stderr) == (97, b"", b"")
    res = chaperone(sshd, tmp_path, "run", "--spool", tmp_path / "spool", "testhost", "--",
                    "echo", "once", timeout=30)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"once\n", b"")
    assert path.read_bytes() == content
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# Reconnecting ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_run_survives_the_client_being_killed(sshd, tmp_path):
    run_id = "sigkilled-client"
    spool = tmp_path / "spool"
    proc = popen(sshd, tmp_path, "run", "--spool", spool, "--id", run_id, "testhost", "--",
                 "sh", "-c", "for i in $(seq 1 40); do echo line $i; sleep 0.1; done")
    out = Reader(proc.stdout)
    try:
        out.wait_for(lambda d: b"line 1\n" in d)
        time.sleep(1.0)
        proc.kill()  # SIGKILL: no chance to say goodbye
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    seen = out.join()
    # The client died mid-run (output reaches it within ~0.2 s) ...
    assert seen.count(b"\n") < 30, seen
    expected = b"".join(b"line %d\n" % i for i in range(1, 41))

    # ... and the program went on to its end without it.
    res = chaperone(sshd, tmp_path, "wait", run_id)
    assert (res.returncode, res.stderr) == (0, b"")
    res = chaperone(sshd, tmp_path, "logs", run_id)
    assert (res.returncode, res.stdout, res.stderr) == (0, expected, b"")
    st = chaperone(sshd, tmp_path, "status", run_id, "--json")
    state = json.loads(st.stdout)
    assert (state["state"], state["return_code"], state["signal"]) == ("done", 0, None)
    assert state["stdout_bytes"] == len(expected)


@pytest.mark.timeout(120)
def test_foreground_run_and_follower_reconnect_after_sessions_are_killed(sshd, tmp_path):
    """Kill every SSH session on the server side, twice, during one
    foreground run (and a ``logs -f`` of it from another process): both
    reconnect on their own and end with the complete output, each byte once,
    and the program's exit status."""
    run_id = "sessions-killed"
    n = 60
    expected_out, expected_err = expected_lines(n)
    run = popen(sshd, tmp_path, "run", "--spool", tmp_path / "spool", "--id", run_id, "testhost",
                "--", "sh", "-c", lines_script(n, 0.1, code=3))
    run_out, run_err = Reader(run.stdout), Reader(run.stderr)
    follower = None
    try:
        run_out.wait_for(lambda d: b"line 2\n" in d)
        follower = popen(sshd, tmp_path, "logs", "-f", "--stdout", run_id)
        fol_out, fol_err = Reader(follower.stdout), Reader(follower.stderr)
        fol_out.wait_for(lambda d: b"line 3\n" in d)

        for kill in (1, 2):
            have = run_out.wait_for(lambda d: True)
            assert sshd.kill_sessions(), "no SSH session to kill"
            run_err.wait_for(lambda d: d.count(b"reconnecting") == kill)
            # Output flows again (over a new connection) before the next kill.
            run_out.wait_for(lambda d: len(d) > len(have) + 20)
        fol_err.wait_for(lambda d: b"reconnecting" in d)
        assert run.wait(timeout=60) == 3
        assert follower.wait(timeout=60) == 0, fol_err.join()
    finally:
        for p in (run, follower):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    assert b"line %d\n" % n not in have, "the second kill must come before the end"
    assert run_out.join() == expected_out
    err_lines = run_err.join().splitlines(keepends=True)
    notices = [l for l in err_lines if b"reconnecting" in l]
    assert len(notices) == 2, err_lines
    assert all(l.startswith(b"chaperone: ") and b"testhost" in l for l in notices), notices
    assert b"".join(l for l in err_lines if l not in notices) == expected_err

    assert fol_out.join() == expected_out
    fol_notices = [l for l in fol_err.join().splitlines() if l]
    assert fol_notices and all(b"reconnecting" in l for l in fol_notices), fol_notices
    assert len(fol_notices) <= 2, fol_notices


# Many runs, one connection ---------------------------------------------------


def _new_session_pids(sshd, before):
    return sorted(set(sshd.session_pids()) - set(before))


def _open(transport):
    return [c for c in transport._conns if not c.closed]


async def _until(pred, timeout=60):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _wait_for_flag(flag, text):
    """sh: wait until ``flag`` exists (the host is this machine), then print."""
    return ["sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; echo %s" % (flag, text)]


@pytest.mark.timeout(90)
def test_ten_parallel_runs_share_one_connection(sshd, tmp_path):
    from chaperone.api import Chaperone
    from chaperone.protocol import End, OutputChunk

    flag = tmp_path / "go"

    async def main():
        before = sshd.session_pids()
        async with Chaperone(home=tmp_path, ssh_config=[sshd.config_file], ssh_client="asyncssh") as ch:
            spool = {"root": str(tmp_path / "spool")}
            runs = await asyncio.gather(*(
                ch.start("testhost", ["sh", "-c", "echo started %d" % i], ssh=spool) for i in range(10)))
            assert len({r.id for r in runs}) == 10
            assert all(r.state.state in ("running", "done") for r in runs), [r.state for r in runs]
            transport = ch.transport("testhost", **spool)
            assert len(_open(transport)) == 1
            new = _new_session_pids(sshd, before)
            assert len(new) == 1, new

            # Ten streaming runs at once: ten channels open together, still
            # one connection (MaxSessions 10).
            async def one(i):
                out, end = b"", None
                async for event in ch.run("testhost", _wait_for_flag(flag, "stream%d" % i),
                                                   ssh=spool):
                    if isinstance(event, OutputChunk):
                        out += event.data
                    elif isinstance(event, End):
                        end = event
                return out, end

            tasks = [asyncio.ensure_future(one(i)) for i in range(10)]
            try:
                await _until(lambda: sum(c.channels for c in transport._conns) == 10)
                assert [c.channels for c in _open(transport)] == [10]
                assert _new_session_pids(sshd, before) == new
            finally:
                flag.touch()
            results = await asyncio.gather(*tasks)
            assert [r[0] for r in results] == [b"stream%d\n" % i for i in range(10)]
            assert all(r[1] is not None for r in results)
            # Each slot is free again once its channel is closed.
            await _until(lambda: [c.channels for c in _open(transport)] == [0], timeout=10)
            states = await asyncio.gather(*(ch.wait(r.id) for r in runs))
            assert [(st.state, st.return_code) for st in states] == [("done", 0)] * 10
            outputs = await asyncio.gather(*(ch.read(r.id) for r in runs))
            assert outputs == [b"started %d\n" % i for i in range(10)]

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_fifteen_follows_open_a_second_connection(sshd, tmp_path):
    from chaperone.api import Chaperone
    from chaperone.protocol import OutputChunk, StateUpdate

    flag = tmp_path / "go"

    async def main():
        async with Chaperone(home=tmp_path, ssh_config=[sshd.config_file], ssh_client="asyncssh") as ch:
            spool = {"root": str(tmp_path / "spool")}
            runs = await asyncio.gather(*(
                ch.start("testhost", _wait_for_flag(flag, "follow%d" % i), ssh=spool) for i in range(15)))
            before_follows = sshd.session_pids()

            async def follow(run):
                out, state = b"", None
                async for event in ch.events(run.id):
                    if isinstance(event, StateUpdate):
                        state = event.state
                    elif isinstance(event, OutputChunk):
                        out += event.data
                return out, state

            tasks = [asyncio.ensure_future(follow(r)) for r in runs]
            transport = ch.client(runs[0].id).transport
            try:
                # 15 channels at once: 10 on the first connection (MaxSessions
                # 10), 5 on a second one, rather than a failed channel.
                await _until(lambda: sum(c.channels for c in transport._conns) == 15)
                assert sorted(c.channels for c in _open(transport)) == [5, 10]
                # The starts' connection carries the first 10 (one transport
                # per host: starts and follows share it), a new one the rest.
                assert len(_new_session_pids(sshd, before_follows)) == 1
            finally:
                flag.touch()
            results = await asyncio.gather(*tasks)
            for i, (out, state) in enumerate(results):
                assert out == b"follow%d\n" % i
                assert (state["state"], state["return_code"]) == ("done", 0)

    asyncio.run(main())


@pytest.mark.timeout(90)
def test_a_slot_is_reused_only_once_its_channel_is_closed(sshd, tmp_path):
    """Ten follows that stop at the run's end close their channels while the
    agents behind them may still be exiting; ten calls right after must not
    be refused by sshd (MaxSessions 10) for channels it still counts, nor
    need a second connection."""
    from chaperone.client import AgentClient
    from chaperone.protocol import End
    from chaperone.transports.ssh.via_asyncssh import SSHTransport
    from chaperone.transports.target import Target

    async def follow_to_the_end(client, run_id):
        events = [e async for e in client.follow(run_id)]
        assert isinstance(events[-1], End)
        return events[-1]

    async def main():
        transport = SSHTransport(Target("testhost", config=[sshd.config_file], spool=str(tmp_path / "spool")))
        client = AgentClient(transport)
        try:
            run_id = (await client.start(json.dumps({"id": "slots", "program": {"argv": ["true"]}}).encode()))["id"]
            await follow_to_the_end(client, run_id)
            for _ in range(2):
                await asyncio.gather(*(follow_to_the_end(client, run_id) for _ in range(10)))
                states = await asyncio.gather(*(client.status(run_id) for _ in range(10)))
                assert [(st["state"], st["return_code"]) for st in states] == [("done", 0)] * 10
            assert len(_open(transport)) == 1
        finally:
            await transport.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_wait_gives_its_channel_back_when_it_returns(sshd, tmp_path):
    from chaperone.api import Chaperone

    async def main():
        async with Chaperone(home=tmp_path, ssh_config=[sshd.config_file], ssh_client="asyncssh") as ch:
            run = await ch.start("testhost", ["true"], ssh={"root": str(tmp_path / "spool")})
            await ch.wait(run.id)
            transport = ch.client(run.id).transport
            # Closed, or at least closing (the slot is free once it is closed).
            assert [c.channels - c.closing for c in _open(transport)] == [0]

    asyncio.run(main())


def _ssh_children():
    """The ssh processes under this process's watchdogs (sh -c ... ssh)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    rows = [line.split(None, 2) for line in out if len(line.split(None, 2)) == 3]
    watchdogs = {int(p) for p, pp, _ in rows if int(pp) == os.getpid()}
    return {int(p) for p, pp, a in rows if int(pp) in watchdogs and a.split()[0].endswith("/ssh")}


@pytest.mark.timeout(90)
def test_an_ssh_killed_while_logging_in_is_a_lost_connection(sshd, tmp_path):
    """A follow whose connection drops reconnects; if that new ssh is killed
    before it logged in (the watchdog's shell says "Killed"), that too is a
    connection lost, tried again, not a failure that ends the follow."""
    from chaperone.api import Chaperone
    from chaperone.protocol import OutputChunk

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[str(sshd.config_file)], ssh_client="openssh") as ch:
            run = await ch.start("testhost", ["sh", "-c", "for i in $(seq 30); do echo $i; sleep 0.1; done"])
            reconnects, out = [], []

            async def follow():
                async for ev in run.events(on_reconnect=lambda e, d: reconnects.append(e)):
                    if isinstance(ev, OutputChunk):
                        out.append(ev.data)

            task = asyncio.ensure_future(follow())
            await asyncio.sleep(1)
            old = _ssh_children()
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            while not _ssh_children() - old:
                await asyncio.sleep(0.002)
            for pid in _ssh_children() - old:
                os.kill(pid, signal.SIGKILL)  # (its handshake takes a good part of a second: still logging in)
            await asyncio.wait_for(task, 60)
            return b"".join(out), reconnects

    out, reconnects = asyncio.run(main())
    assert out == b"".join(b"%d\n" % i for i in range(1, 31))
    assert len(reconnects) >= 2, reconnects


def test_a_killed_ssh_reads_as_a_lost_connection():
    from chaperone.errors import ConnectionLost
    from chaperone.transports.ssh.failures import ssh_error
    from chaperone.transports.target import Target

    for word in ("Killed", "Terminated"):
        e = ssh_error(Target.parse("gpu1"), word.encode() + b"\n", False)
        assert isinstance(e, ConnectionLost) and word.lower() in str(e), e


@pytest.mark.timeout(60)
def test_close_ends_the_calls_in_flight_instead_of_connecting_again(sshd, tmp_path):
    """A wait() still in flight when its Chaperone closes fails with a
    ChaperoneError once it needs the host again; it does not open a new
    connection (an ssh master nobody would close) nor the records again."""
    from chaperone.api import Chaperone
    from chaperone.errors import ChaperoneError

    async def main():
        ch = Chaperone(tmp_path / "home", ssh_config=[str(sshd.config_file)], ssh_client="openssh")
        await ch.open()
        run = await ch.start("testhost", ["sleep", "2"])
        waiter = asyncio.ensure_future(run.wait())
        await asyncio.sleep(0.5)
        await ch.close()
        try:
            await asyncio.wait_for(waiter, 30)
            outcome = "returned"
        except ChaperoneError as e:
            outcome = str(e)
        await asyncio.sleep(0.5)
        return outcome, _ssh_children(), ch._records

    outcome, sshs, records = asyncio.run(main())
    assert "was closed" in outcome, outcome
    assert sshs == set() and records is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("push", [False, True])
def test_close_leaves_no_zombie(sshd, tmp_path, push):
    """A scheduler closes its Chaperone and goes on: the ssh masters (the
    connection's, the tunnel's) and their watchdogs are reaped by then."""
    from chaperone.api import Chaperone

    async def main():
        async with Chaperone(tmp_path / ("home%d" % push), ssh_config=[str(sshd.config_file)],
                             ssh_client="openssh", push=push) as ch:
            run = await ch.start("testhost", ["true"])
            await run.wait()
        out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(os.getpid())], capture_output=True,
                             text=True).stdout
        return [line for line in out.splitlines() if line.split()[1].startswith("Z")]

    assert asyncio.run(main()) == []
