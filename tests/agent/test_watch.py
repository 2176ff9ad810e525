"""wait() of many runs: one agent ``watch`` call per host answers every
pending wait, each run's end reaching its waiter within a fraction of a
second of the supervisor recording it (issue 11, item 4: 50 concurrent
waits used to return a median 6.8 s late, one follow channel each)."""

import asyncio
import datetime
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time

import pytest

from chaperone import Chaperone
from chaperone.agent_source import agent_module
from chaperone.errors import NoSuchRun
from chaperone.transports.memory import MemoryHost, MemoryTransport, run_virtual
from support.helpers import AGENT, agent_start, kill_marked, program, unique, wait_pid_field

FRAME = struct.Struct("!cQI")


def ended_at(state):
    return datetime.datetime.fromisoformat(state["end_time"]).timestamp()


def read_frames(stream, seen, done):
    """Collect (arrival time, kind, payload) frames from ``stream``."""
    try:
        while True:
            head = stream.read(FRAME.size)
            if len(head) < FRAME.size:
                return
            kind, _, length = FRAME.unpack(head)
            payload = stream.read(length)
            seen.append((time.time(), kind, json.loads(payload) if payload else None))
    finally:
        done.set()


def watch_proc(root, ids):
    proc = subprocess.Popen([sys.executable, str(AGENT), "--root", str(root), "watch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(" ".join(ids).encode())
    proc.stdin.close()
    seen, done = [], threading.Event()
    threading.Thread(target=read_frames, args=(proc.stdout, seen, done), daemon=True).start()
    return proc, seen, done


# The agent's watch ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_watch_answers_each_run_as_it_ends(tmp_path):
    """Runs ending at different times: a frame with each final state as
    soon as it is recorded (inotify: no poll), in the order they end; a
    run that is not there gets its X frame at once; then the end."""
    root = tmp_path / "spool"
    tag = unique("w")
    try:
        for i, secs in enumerate((3.0, 2.0, 2.5)):
            agent_start(root, program("%s-%d" % (tag, i), ["sh", "-c", "sleep %s" % secs, tag]))
        proc, seen, done = watch_proc(root, ["%s-%d" % (tag, i) for i in range(3)] + ["nope", tag + "-1"])
        assert done.wait(30)
        assert proc.wait(10) == 0, proc.stderr.read()
        kinds = [k for _, k, _ in seen]
        assert kinds == [b"X", b"S", b"S", b"S", b"E"]
        assert seen[0][2] == {"id": "nope", "error": "no such run: nope", "code": 4}
        # in the order they ended (as recorded: their starts, one after the other, may take long on a
        # loaded machine, so the order of the sleeps alone does not say it)
        assert sorted(p["id"] for _, _, p in seen[1:4]) == [tag + "-0", tag + "-1", tag + "-2"]
        assert [p["id"] for _, _, p in seen[1:4]] == [p["id"] for _, _, p in
                                                      sorted(seen[1:4], key=lambda s: ended_at(s[2]))]
        for arrived, _, state in seen[1:4]:
            assert state["state"] == "done" and state["return_code"] == 0
            assert arrived - ended_at(state) < 0.5, "answered %.3f s after the end" % (arrived - ended_at(state))
    finally:
        kill_marked(tag)


@pytest.mark.timeout(60)
def test_watch_finds_a_run_whose_supervisor_died(tmp_path):
    """A supervisor that dies (SIGKILL) writes no state: the watch looks at
    each supervisor once a second, and answers the run ``lost``."""
    root = tmp_path / "spool"
    tag = unique("wl")
    try:
        st = agent_start(root, program(tag, ["sh", "-c", "sleep 60", tag]))
        wait_pid_field(root, tag)
        proc, seen, done = watch_proc(root, [tag])
        time.sleep(0.3)
        os.kill(st["agent_pid"], signal.SIGKILL)
        killed = time.time()
        assert done.wait(20)
        assert proc.wait(10) == 0
        assert [k for _, k, _ in seen] == [b"S", b"E"]
        assert seen[0][2]["state"] == "lost" and "is gone without a result" in seen[0][2]["error"]
        assert seen[0][0] - killed < 3.0
    finally:
        kill_marked(tag)


@pytest.mark.timeout(60)
def test_watch_without_inotify_polls(tmp_path, monkeypatch):
    """Where there is no inotify, each state.json is looked at every
    WATCH_POLL: still within a fraction of a second."""
    agent = agent_module()
    monkeypatch.setattr(agent, "dir_watch", lambda path, libc: None)
    root = tmp_path / "spool"
    tag = unique("wp")
    r, w = os.pipe()

    class Out:
        fd = w

        def frame(self, kind, offset, data):
            agent.write_all(w, agent.FRAME.pack(kind, offset, len(data)) + bytes(data))

    try:
        for i, secs in enumerate((2.0, 2.5)):
            agent_start(root, program("%s-%d" % (tag, i), ["sh", "-c", "sleep %s" % secs, tag]))
        watch = agent.Watch(str(root), ["%s-0" % tag, "%s-1" % tag], Out())
        seen, done = [], threading.Event()
        threading.Thread(target=read_frames, args=(os.fdopen(r, "rb", buffering=0), seen, done), daemon=True).start()
        watch.run()
        assert watch.fd is None  # (it polled)
        os.close(w)
        assert done.wait(10)
        assert [k for _, k, _ in seen] == [b"S", b"S", b"E"]
        for arrived, _, state in seen[:2]:
            assert arrived - ended_at(state) < 0.5
    finally:
        kill_marked(tag)


@pytest.mark.timeout(60)
def test_watch_ends_when_its_reader_is_gone(tmp_path):
    """Nobody reads the watch any more (the client, or its connection,
    died): it ends at once (141), the runs go on."""
    root = tmp_path / "spool"
    tag = unique("wr")
    try:
        agent_start(root, program(tag, ["sh", "-c", "sleep 60", tag]))
        proc = subprocess.Popen([sys.executable, str(AGENT), "--root", str(root), "watch"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(tag.encode())
        proc.stdin.close()
        time.sleep(0.5)
        proc.stdout.close()
        assert proc.wait(5) == 141
        assert json.loads((root / tag / "state.json").read_bytes())["state"] == "running"
    finally:
        kill_marked(tag)


# The library: one watcher per host ---------------------------------------------------------------


def test_many_waits_share_a_few_watch_calls(tmp_path):
    """60 runs on one (in-memory) host, waited at once, in three waves:
    each wait returns the moment its run ends, through at most two
    ``watch`` calls at a time (a wave past that replaces the oldest call),
    never a follow; a wait given up on (timeout) leaves the others be; a
    run that is gone raises."""
    host = MemoryHost("fake")
    ends = {}

    async def sleeper(p):
        await p.sleep(float(p.argv[1]))
        ends[p.id] = asyncio.get_running_loop().time()
        return 0

    host.program("sleep", sleeper)

    async def main():
        loop = asyncio.get_running_loop()
        async with Chaperone(tmp_path, transports={"fake": MemoryTransport(host)}) as ch:
            runs, waits = [], []
            returned = {}

            async def wait(run):
                state = await run.wait()
                returned[run.id] = loop.time()
                return state

            for wave in range(3):
                for i in range(20):
                    runs.append(await ch.start("fake", ["sleep", str(100 + 10 * i + wave)]))
                waits += [asyncio.ensure_future(wait(r)) for r in runs[-20:]]
                await asyncio.sleep(1)
            gone = await ch.start("fake", ["sleep", "5000"])
            given_up = await ch.start("fake", ["sleep", "5000"])
            with pytest.raises(asyncio.TimeoutError):
                await ch.wait(given_up.id, timeout=50)
            host.remove(gone.id)
            with pytest.raises(NoSuchRun):
                await ch.wait(gone.id)
            states = await asyncio.gather(*waits)
            assert all(s.state == "done" and s.exit_code == 0 for s in states)
            assert returned == {r.id: ends[r.id] for r in runs}
            calls = [c for c in host.calls if "watch" in c or "follow" in c]
            assert all("watch" in c for c in calls)
            assert len(calls) <= 6, calls  # (3 waves, the runs that raised, a replaced call)
            assert all(ch.records.get(r.id).state == "done" for r in runs)

    run_virtual(main(), timeout=86400)


@pytest.mark.timeout(240)
def test_concurrent_waits_over_ssh_return_at_each_end(sshd, tmp_path):
    """40 runs on a real sshd (MaxSessions 10), waited at once: each
    wait() returns within a fraction of a second of its run's recorded
    end (the median well under 0.2 s), through one watch."""
    tag = unique("ws")

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[sshd.config_file]) as ch:
            runs = await asyncio.gather(*(ch.start("testhost", ["sh", "-c", "sleep %.1f" % (4 + 0.1 * (i % 20)), tag])
                                          for i in range(40)))
            late = []

            async def one(run):
                began = time.time()
                state = await run.wait()
                late.append(time.time() - max(began, ended_at(state.model_dump())))

            await asyncio.gather(*(one(r) for r in runs))
            return late

    try:
        late = asyncio.run(main())
    finally:
        kill_marked(tag)
    assert statistics.median(late) < 0.2, sorted(late)
    assert max(late) < 1.5, sorted(late)


# Push: wait() returns with the final callback ------------------------------------------------------


@pytest.mark.timeout(120)
def test_push_wait_returns_with_the_final_callback(tmp_path):
    """With push, wait() returns as the final callback lands, not after
    telling the agent to stop calling back (an SSH call: here made to take
    2 s); those releases go in one call per host, in the background, and
    close() waits for them."""
    from chaperone.transports.local import LocalTransport

    class SlowRelease(LocalTransport):
        calls = []

        async def open(self, args, stdin=b""):
            self.calls.append(list(args))
            if "release" in args or "control" in args:
                await asyncio.sleep(2.0)
            return await super().open(args, stdin)

    transport = SlowRelease(root=str(tmp_path / "spool"))
    tag = unique("wpush")

    async def main():
        async with Chaperone(tmp_path / "home", push=True, transports={"local": transport}) as ch:
            runs = await asyncio.gather(*(ch.start("local", ["sh", "-c", "sleep %.1f" % (1.5 + 0.1 * i), tag])
                                          for i in range(8)))
            late = []

            async def one(run):
                began = time.time()
                state = await run.wait()
                late.append(time.time() - max(began, ended_at(state.model_dump())))

            await asyncio.gather(*(one(r) for r in runs))
            return late

    try:
        late = asyncio.run(main())
    finally:
        kill_marked(tag)
    assert max(late) < 1.0, sorted(late)
    assert not [c for c in transport.calls if "control" in c]
    assert 1 <= len([c for c in transport.calls if "release" in c]) <= 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("push", [False, True])
def test_waits_on_a_closed_chaperone_and_starts_after_close_fail_at_once(tmp_path, push):
    """close(): a wait() in flight raises ChaperoneError (push too: before,
    it waited on for ever), and start() on a closed Chaperone refuses
    (before, it started a run nobody could wait on)."""
    from chaperone.errors import ChaperoneError

    async def main():
        ch = Chaperone(tmp_path / "home", push=push)
        await ch.open()
        run = await ch.start("local", ["sleep", "3"])
        waiter = asyncio.ensure_future(run.wait())
        await asyncio.sleep(0.3)
        await ch.close()
        with pytest.raises(ChaperoneError, match="was closed"):
            await asyncio.wait_for(waiter, 10)
        with pytest.raises(ChaperoneError, match="was closed"):
            await asyncio.wait_for(ch.start("local", ["true"]), 10)
        await ch.open()
        await ch.signal(run.id, "KILL")
        await ch.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_push_wait_on_a_start_that_never_arrived_raises(tmp_path):
    """Push: a start whose connection dropped (recorded ``unknown``) and
    that never reached the host: wait() asks the host at once and raises
    StartFailed, as pull does (before: it waited for callbacks for ever)."""
    from chaperone.errors import ConnectionLost, StartFailed
    from chaperone.transports.local import LocalTransport

    class Dropping(LocalTransport):
        async def open(self, args, stdin=b"", **kw):
            if "start" in args:
                raise ConnectionLost("connection to local lost: dropped (a test)")
            return await super().open(args, stdin, **kw)

    async def main():
        transport = Dropping(root=str(tmp_path / "spool"))
        async with Chaperone(tmp_path / "home", push=True, transports={"local": transport}) as ch:
            with pytest.raises(ConnectionLost):
                await ch.start("local", ["true"], id="never-arrived")
            assert ch.records.get("never-arrived").state == "unknown"
            with pytest.raises(StartFailed, match="never reached"):
                await asyncio.wait_for(ch.wait("never-arrived"), 10)

    asyncio.run(main())
