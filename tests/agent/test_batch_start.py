"""Many starts on one host at once: one batched agent call (``start`` with
a JSON array), its documents shared among processes on the host (the
agent's ``start_shared``), each run started, answered and recorded as a
single start is; a bad document fails its run only; a batch cut by a
killed connection leaves no run recorded ``running`` that never started."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from support.helpers import AGENT, program, run_async, wait_for, wait_state

from chaperone import Chaperone
from chaperone.client import AgentClient
from chaperone.errors import ChaperoneError, UsageError
from chaperone.states import AGENT_STATES, FINAL_STATES

CLIENTS = ["openssh", "asyncssh"]


def _count_agent_starts(monkeypatch):
    """Count the library's agent start calls: (single, [batch sizes])."""
    calls = {"single": 0, "batches": []}
    start, start_many = AgentClient.start, AgentClient.start_many

    async def one(self, program_json):
        calls["single"] += 1
        return await start(self, program_json)

    async def many(self, programs):
        calls["batches"].append(len(programs))
        return await start_many(self, programs)

    monkeypatch.setattr(AgentClient, "start", one)
    monkeypatch.setattr(AgentClient, "start_many", many)
    return calls


# On the host: the agent's shared batch ----------------------------------------------

#: Runs agent.start_shared(ROOT, DOCS, workers=3) in a process of its own;
#: with "die", each helper starts half of its slice, then dies unanswered.
SHARED = textwrap.dedent("""
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("agent", sys.argv[1])
    ag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ag)
    root, docs, mode = ag.ensure_root(sys.argv[2]), json.load(sys.stdin), sys.argv[3]
    me, real = os.getpid(), ag.start_many

    def start_many(root, part, close=()):
        if mode == "die" and os.getpid() != me:  # a helper
            real(root, part[:len(part) // 2], close)
            os._exit(3)
        return real(root, part, close)

    ag.start_many = start_many
    print(json.dumps(ag.start_shared(root, docs, workers=3)))
""")


def _shared(root, docs, mode="plain"):
    res = subprocess.run([sys.executable, "-c", SHARED, str(AGENT), str(root), mode],
                         input=json.dumps(docs).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout.decode())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["plain", "die"])
def test_a_shared_batch_answers_each_document_in_order_and_starts_each_run_once(tmp_path, mode):
    """Three processes share a batch of 36 (a slice each): the answers are
    in the documents' order; an id given in two slices starts one program;
    a bad document is rejected alone; a helper that dies half way through
    its slice ("die") is made good by the agent (the runs it started are
    answered, not started twice; the others started)."""
    root = tmp_path / "root"
    mark = tmp_path / "ran"
    mark.mkdir()
    docs = [program("sh-%d" % i, ["sh", "-c", 'echo x >> "$0/$1"', str(mark), "sh-%d" % i]) for i in range(36)]
    docs[30] = dict(docs[0])  # the same id as the first, in another slice
    docs[17] = {"id": "bad/17", "program": {"argv": ["true"]}}
    answers = _shared(root, docs, mode)
    assert len(answers) == 36
    assert answers[17]["id"] == "bad/17" and "invalid run id" in answers[17]["rejected"]
    for i, answer in enumerate(answers):
        if i != 17:
            assert answer["id"] == docs[i]["id"] and answer["state"] in ("running", "done"), (i, answer)
    assert answers[30]["pid"] == answers[0]["pid"]
    for i in range(36):
        if i not in (17, 30):
            assert wait_state(root, "sh-%d" % i, ("done",))["return_code"] == 0
    wait_for(lambda: len(os.listdir(mark)) == 34, what="34 programs ran")
    for name in os.listdir(mark):
        assert (mark / name).read_bytes() == b"x\n", name  # once each, sh-0 too


@pytest.mark.timeout(60)
def test_the_supervisors_of_a_shared_batch_do_not_hold_it_open(tmp_path):
    """The agent answers a shared batch when every program started, not
    when they end (no supervisor keeps a helper's pipe open)."""
    root = tmp_path / "root"
    docs = [program("sl-%d" % i, ["sleep", "30"]) for i in range(24)]
    t0 = time.monotonic()
    answers = _shared(root, docs)
    took = time.monotonic() - t0
    try:
        assert [a["state"] for a in answers] == ["running"] * 24
        assert took < 20, took
    finally:
        for a in answers:
            if a.get("pgid"):
                try:
                    os.killpg(a["pgid"], 9)
                except ProcessLookupError:
                    pass


# Over SSH: the library's batches -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("client", CLIENTS)
def test_two_hundred_starts_at_once_are_one_batch_with_exact_output(sshd, tmp_path, client, monkeypatch):
    """200 Chaperone.start at once on one host: one agent call for all,
    200 runs, each with exactly its own output (bytes, no newline)."""
    calls = _count_agent_starts(monkeypatch)
    spool = tmp_path / "spool"

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[sshd.config_file], ssh_client=client) as ch:
            await ch.start("testhost", ["true"], ssh={"spool": str(spool)})  # connect, ship
            calls["single"], calls["batches"] = 0, []
            runs = await asyncio.gather(*(
                ch.start("testhost", ["sh", "-c", r'printf "%s\000\377" "$0"', "out-%d" % i],
                         id="b%d" % i, ssh={"spool": str(spool)}) for i in range(200)))
            ids = [r.id for r in runs]
            for _ in range(300):  # (one call for all: a wait() each would be 200)
                await ch.refresh(ids)
                if all(ch.record(i).state in FINAL_STATES for i in ids):
                    break
                await asyncio.sleep(0.1)
            states = [ch.get(i).state for i in ids]
            some = await asyncio.gather(*(runs[i].read("stdout") for i in (0, 101, 199)))
            return ids, states, some

    ids, states, some = run_async(main(), 140)
    assert calls == {"single": 0, "batches": [200]}
    assert ids == ["b%d" % i for i in range(200)]
    assert [(s.state, s.return_code) for s in states] == [("done", 0)] * 200
    assert some == [b"out-%d\x00\xff" % i for i in (0, 101, 199)]
    # Every run's output as the host holds it: exactly its own bytes.
    assert [(spool / i / "stdout").read_bytes() for i in ids] == [b"out-%d\x00\xff" % i for i in range(200)]
    assert [(spool / i / "stderr").read_bytes() for i in ids] == [b""] * 200


@pytest.mark.timeout(120)
def test_a_bad_program_in_a_batch_fails_its_run_only(sshd, tmp_path, monkeypatch):
    """One batch of 40: a program that cannot be executed, one whose cwd
    is missing, and an id whose spool is damaged (the agent rejects it):
    those three fail, each with its own error; the 37 others run."""
    calls = _count_agent_starts(monkeypatch)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "damaged").mkdir(mode=0o700)
    (spool / "damaged" / "state.json").write_bytes(b"{not json")

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[sshd.config_file]) as ch:
            await ch.start("testhost", ["true"], ssh={"spool": str(spool)})
            calls["batches"] = []

            def one(i):
                ssh = {"spool": str(spool)}
                if i == 5:
                    return ch.start("testhost", [str(tmp_path / "no-such-program")], id="noexec", ssh=ssh)
                if i == 25:
                    return ch.start("testhost", ["true"], id="nocwd", cwd=str(tmp_path / "no-such-dir"), ssh=ssh)
                if i == 33:
                    return ch.start("testhost", ["true"], id="damaged", ssh=ssh)
                return ch.start("testhost", ["sh", "-c", "echo ok %d" % i], id="ok%d" % i, ssh=ssh)

            got = await asyncio.gather(*(one(i) for i in range(40)), return_exceptions=True)
            ids = [g.id for g in got if not isinstance(g, BaseException)]
            for _ in range(300):
                await ch.refresh(ids)
                if all(ch.record(i).state in FINAL_STATES for i in ids):
                    break
                await asyncio.sleep(0.1)
            states = [ch.get("ok%d" % i).state for i in range(40) if i not in (5, 25, 33)]
            bad = {i: got[i].state if i == 33 else ch.get(got[i].id).state for i in (5, 25)}
            return got, states, bad, ch.record("damaged")

    got, states, bad, damaged = run_async(main(), 110)
    assert calls["batches"] == [40]
    assert [(s.state, s.return_code) for s in states] == [("done", 0)] * 37
    assert [(spool / ("ok%d" % i) / "stdout").read_bytes() for i in range(40) if i not in (5, 25, 33)] == [
        b"ok %d\n" % i for i in range(40) if i not in (5, 25, 33)]
    assert bad[5].state == "error" and "no-such-program" in bad[5].error
    assert bad[25].state == "error" and "no-such-dir" in bad[25].error
    assert isinstance(got[33], UsageError) and "damaged" in str(got[33])
    assert damaged.state == "failed"


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("when", ["sending", "starting"])
def test_a_batch_cut_by_a_killed_connection_records_no_run_running_that_never_started(sshd, tmp_path, when):
    """The connection dies (sshd's sessions killed) while a batch of 200 is
    on its way ("sending": 200 x 48 KiB of stdin in it) or being started
    on the host ("starting": once some spools exist): every start raises
    or returns; no run is recorded ``running`` (nor any state only a
    started run has) unless the host has it, and after a refresh each
    record says what the host says (``failed`` for a run it never had)."""
    spool = tmp_path / "spool"
    ids = ["cut%d" % i for i in range(200)]
    data = os.urandom(48 << 10) if when == "sending" else None

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[sshd.config_file], ssh_client="asyncssh",
                             config={"retry_frequency": 0.2}) as ch:
            await ch.start("testhost", ["true"], ssh={"spool": str(spool)})
            starts = asyncio.gather(*(ch.start("testhost", ["sleep", "60"], id=i, stdin=data,
                                               ssh={"spool": str(spool)}) for i in ids), return_exceptions=True)
            if when == "sending":
                await asyncio.sleep(0.05)
            else:
                for _ in range(2000):
                    if len([n for n in os.listdir(spool) if n.startswith("cut")]) >= 5:
                        break
                    await asyncio.sleep(0.005)
            killed = sshd.kill_sessions()
            got = await starts
            recorded = {i: ch.record(i).state for i in ids}
            # The agent may go on starting the batch after the cut: wait
            # until the spool has been still for 2 s.
            last, still = None, 0
            while still < 20:
                now = sorted(os.listdir(spool))
                still = still + 1 if now == last and not any(n.startswith(".new-") for n in now) else 0
                last = now
                await asyncio.sleep(0.1)
            on_host = {n for n in last if n.startswith("cut")}
            await ch.refresh(ids)
            settled = {i: ch.record(i).state for i in ids}
            return killed, got, recorded, on_host, settled

    killed, got, recorded, on_host, settled = run_async(main(), 140)
    try:
        assert killed
        failed = [g for g in got if isinstance(g, BaseException)]
        assert all(isinstance(g, ChaperoneError) for g in failed), failed[:3]
        assert failed, "the cut came after the whole batch was answered"
        if when == "sending":
            assert len(on_host) < 200, "the cut came after the host had the whole batch"
        else:
            assert on_host, "the cut came before the host started any of the batch"
        for i in ids:
            if i in on_host:
                assert settled[i] == "running", (i, settled[i])
            else:
                assert recorded[i] not in AGENT_STATES, (i, recorded[i])  # (what only a started run can be)
                assert settled[i] == "failed", (i, settled[i])
    finally:
        for n in os.listdir(spool):
            try:
                with open(spool / n / "state.json") as f:
                    st = json.loads(f.read())
                if st.get("pgid"):
                    os.killpg(st["pgid"], 9)
            except (OSError, ValueError):
                pass
