"""Signals go to the run's processes only, and to each of them once.

* A state.json that names someone else's process (damaged, stale, or a
  number reused since) never gets it signalled: a canary ``sleep`` in its
  own session survives ``status``, ``list`` and ``kill`` of such a run.
* Fields that are not process ids are one error line for that run.
* ``kill`` of a run that ended reaches what it left behind in its process
  group (proven the run's by the recorded start time).
* Each signal reaches each process of the tree once: the program, a
  grandchild in its group and one that left it (setsid), locally, with a
  Ctrl-C of a foreground ``chaperone run``, and over SSH.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.helpers import (
    AGENT, CLI, agent, agent_start, cli, cli_env, cli_popen, kill_marked, marker_number, one_line_error, pid_alive,
    procs_with, program, read_state, wait_for, wait_no_procs, wait_state,
)

sys.path.insert(0, str(AGENT.parent))
import agent as ag  # noqa: E402  (the agent module: its own helpers, same host)


@pytest.fixture
def canary():
    """A process in a session and group of its own, which must survive."""
    m = marker_number()
    proc = subprocess.Popen(["sleep", m], start_new_session=True)
    wait_for(lambda: ag.proc_stat(proc.pid), 5, what="the canary")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def write_state(root, run_id, st):
    with open(os.path.join(str(root), run_id, "state.json"), "w") as f:
        json.dump(st, f)


def dead_supervisor_run(root, run_id, **changes):
    """A real run whose supervisor (and so, by PDEATHSIG, its program) was
    SIGKILLed, left ``running`` in state.json with ``changes`` applied."""
    m = marker_number()
    st = agent_start(root, program(run_id, ["sleep", m]))
    os.kill(st["agent_pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(st["pid"]), 5, what="the program to go with its supervisor")
    st = read_state(root, run_id)
    assert st["state"] == "running"
    st.update(changes)
    write_state(root, run_id, st)
    return st


@pytest.mark.timeout(60)
def test_a_state_naming_another_group_never_gets_it_signalled(tmp_path, canary):
    """The supervisor is gone; state.json names the canary as the program
    (pgid/pid) or as the supervisor (agent_pid): status, list and kill
    mark the run lost or refuse, and the canary lives."""
    root = tmp_path / "spool"
    c = canary.pid
    dead_supervisor_run(root, "g1", pid=c, pgid=c)  # recorded start time: the old program's
    dead_supervisor_run(root, "g2", pid=c, pgid=c, pid_start=None)
    dead_supervisor_run(root, "g3", agent_pid=c)
    for args in (["status", "g1"], ["list"], ["signal", "g2", "KILL"], ["status", "g3"], ["list"]):
        res = agent(root, *args)
        assert res.returncode in (0, 1), (args, res)
        assert b"Traceback" not in res.stderr
        time.sleep(0.05)
        assert pid_alive(c), "the canary was signalled by %s" % args
    for run_id in ("g1", "g2", "g3"):
        st = read_state(root, run_id)
        assert st["state"] == "lost", st
    assert "process %d is another program now" % c in read_state(root, "g1")["error"]
    assert "start time was not recorded" in read_state(root, "g2")["error"]
    # kill of a lost run that names the canary: refused, one line
    res = agent(root, "signal", "g1", "KILL")
    assert res.returncode == 1
    assert "not signalled" in one_line_error(res.stderr)
    # a finished run naming it: the same
    st = agent_start(root, program("g4", ["true"]))
    st = wait_state(root, "g4")
    st.update(pid=c, pgid=c)
    write_state(root, "g4", st)
    res = agent(root, "signal", "g4", "TERM")
    assert res.returncode == 1 and "another program" in one_line_error(res.stderr)
    assert pid_alive(c)


@pytest.mark.timeout(90)
def test_a_damaged_process_field_is_one_error_line_for_that_run(tmp_path, canary):
    """Strings, floats, booleans, negative and huge numbers where a
    process id or a start time belongs: one line (exit 3) for that run;
    list lists the others; nothing signalled."""
    root = tmp_path / "spool"
    agent_start(root, program("ok", ["true"]))
    wait_state(root, "ok")
    dead_supervisor_run(root, "bad")
    good = read_state(root, "bad")
    c = canary.pid
    values = (str(c), c + 0.5, True, -c, 0, 2 ** 70, 10 ** 5000, [c], None)
    for field in ("pgid", "pid", "agent_pid", "pid_start", "agent_start", "end_ticks"):
        for i, value in enumerate(values):
            if value == 0 and field.endswith(("_start", "_ticks")) or value is None and field != "pid_start":
                continue  # (0 ticks is a time; only a missing pid_start is tried: the others may be null)
            st = dict(good, pgid=c, pid=c) if value is None else dict(good)
            st[field] = value if value != 10 ** 5000 else 0
            text = json.dumps(st)
            if value == 10 ** 5000:  # (more digits than Python converts)
                text = text.replace('"%s": 0' % field, '"%s": %s' % (field, "9" * 5000))
            (root / "bad" / "state.json").write_text(text)
            commands = [["status", "bad"]] if i % 3 else [["signal", "bad", "KILL"], ["follow", "bad"], ["clean", "bad"]]
            for args in commands:
                res = agent(root, *args)
                if value is None:  # valid: marked lost, nothing signalled
                    assert res.returncode == 0, res
                    assert "start time was not recorded" in json.loads(res.stdout.decode())["error"]
                    continue
                assert res.returncode == 3, (field, value, args, res)
                line = one_line_error(res.stderr)
                assert line.startswith("chaperone-agent: run bad: state.json is damaged ("), line
                assert (field in line or value == 10 ** 5000) and len(line) < 400, line
            if i == 1:
                res = agent(root, "list")
                assert res.returncode == 0
                assert [s["id"] for s in json.loads(res.stdout.decode())] == ["ok"]
                assert "run bad: state.json is damaged" in one_line_error(res.stderr)
            assert pid_alive(c), (field, value)


@pytest.mark.timeout(60)
def test_lost_run_kills_its_own_leftover_group_only(tmp_path, canary):
    """The proof still lets the lost-run check do its work: the program's
    group, leader gone (PDEATHSIG), members alive, is SIGKILLed; the canary
    is not."""
    root = tmp_path / "spool"
    m = marker_number()
    try:
        st = agent_start(root, program("lo", ["sh", "-c", "sleep %s & sleep %s; wait" % (m, m)]))
        wait_for(lambda: len(procs_with(m)) == 2, 10, what="two sleeps")
        os.kill(st["agent_pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(st["pid"]), 5, what="the program to die")
        res = agent(root, "status", "lo")
        st = json.loads(res.stdout.decode())
        assert st["state"] == "lost" and "killed what was left" in st["error"], st
        wait_no_procs(m)
        assert pid_alive(canary.pid)
    finally:
        kill_marked(m)


# --- kill of a run that ended: what it left behind -------------------------------------


@pytest.mark.timeout(60)
def test_kill_of_an_ended_run_reaches_its_leftovers(tmp_path, canary):
    root = tmp_path / "spool"
    m = marker_number()
    try:
        agent_start(root, program("left", ["sh", "-c", "(sleep %s; echo late) & exit 0" % m]))
        st = wait_state(root, "left")
        assert st["state"] == "done" and st["return_code"] == 0
        assert st["end_ticks"] is not None and st["pid_start"] is not None
        assert procs_with(m), "the leftover runs on"
        res = agent(root, "signal", "left", "TERM")
        assert res.returncode == 0, res.stderr
        answer = json.loads(res.stdout.decode())
        assert answer["state"] == "done" and "left behind in its process group %d" % st["pgid"] in answer["note"]
        wait_no_procs(m)
        assert pid_alive(canary.pid)
        assert read_state(root, "left")["state"] == "done"  # (nothing recorded)
        assert (root / "left" / "stdout").read_bytes() == b""
        res = agent(root, "signal", "left", "TERM")
        assert res.returncode == 1
        assert one_line_error(res.stderr) == (
            "chaperone-agent: run left is not running (done); its process group was not signalled: "
            "nothing of it runs any more")
    finally:
        kill_marked(m)


@pytest.mark.timeout(60)
def test_kill_of_an_ended_run_with_a_grace_and_the_cli(tmp_path):
    """Leftovers that ignore SIGTERM: --grace ends them with SIGKILL; the
    CLI's kill says it sent the signal."""
    home = tmp_path / "home"
    home.mkdir()
    m = marker_number()
    try:
        res = cli(home, "run", "-d", "--id", "lg", "local", "--", "sh", "-c",
                  "(trap '' TERM; sleep %s) & exit 0" % m)
        assert res.returncode == 0, res.stderr
        wait_state(home / "spool", "lg")
        assert procs_with(m)
        res = cli(home, "kill", "--grace", "0.3", "lg")
        assert res.returncode == 0, res.stderr
        assert b"sent SIGTERM to run lg" in res.stdout
        wait_no_procs(m)
    finally:
        kill_marked(m)


# --- each signal once --------------------------------------------------------------------

#: The program: counts INT, TERM, HUP and USR1 in itself, in a child and
#: its two children (the supervisor's great-grandchildren): one stays in
#: the program's process group, one leaves it with setsid.  Each process
#: keeps DIR/NAME.json up to date; DIR/ready when all four run.
COUNTER = textwrap.dedent("""\
    import json, os, signal, sys, time
    d = sys.argv[1]
    def count(name):
        counts = {}
        def handler(sig, frame):
            counts[signal.Signals(sig).name] = counts.get(signal.Signals(sig).name, 0) + 1
            tmp = os.path.join(d, name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(counts, f)
            os.rename(tmp, os.path.join(d, name + ".json"))
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(s, handler)
        open(os.path.join(d, name + ".up"), "w").close()
        while True:
            time.sleep(3600)
    if os.fork() == 0:
        if os.fork() == 0:
            count("in_group")
        if os.fork() == 0:
            os.setsid()
            count("left_group")
        count("child")
    count("program")
    """)
NAMES = ("program", "child", "in_group", "left_group")


def counts(d):
    out = {}
    for name in NAMES:
        try:
            out[name] = json.loads((d / (name + ".json")).read_text())
        except (OSError, ValueError):
            out[name] = {}
    return out


def check_each_once(d, send):
    """``send(NAME)`` each signal in turn; every process counts it once."""
    wait_for(lambda: all((d / (n + ".up")).exists() for n in NAMES), 20, what="the four processes")
    for i, sig in enumerate(("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")):
        send(sig)
        wait_for(lambda: all(c.get(sig) for c in counts(d).values()), 15, what="%s everywhere" % sig)
        time.sleep(0.5)  # (a second delivery would come by now)
        got = counts(d)
        assert all(c.get(sig) == 1 for c in got.values()), (sig, got)
        assert all(sum(c.values()) == i + 1 for c in got.values()), got


def write_counter(tmp_path):
    d = tmp_path / "counts"
    d.mkdir()
    prog = tmp_path / "counter.py"
    prog.write_text(COUNTER)
    return d, prog


@pytest.mark.timeout(90)
def test_each_signal_reaches_each_process_once(tmp_path):
    root = tmp_path / "spool"
    d, prog = write_counter(tmp_path)
    try:
        agent_start(root, program("once", [sys.executable, str(prog), str(d)], config={"kill_grace": 600}))
        check_each_once(d, lambda sig: agent(root, "signal", "once", sig).check_returncode())
        assert agent(root, "signal", "once", "KILL").returncode == 0
        assert wait_state(root, "once")["signal"] == "SIGKILL"
    finally:
        kill_marked(str(prog))


@pytest.mark.timeout(90)
def test_one_ctrl_c_is_one_sigint(tmp_path):
    """A foreground `chaperone run`: Ctrl-C (SIGINT to the CLI) is one
    SIGINT for each process of the run."""
    home = tmp_path / "home"
    home.mkdir()
    d, prog = write_counter(tmp_path)
    proc = cli_popen(home, "run", "--id", "fg", "local", "--", sys.executable, str(prog), str(d))
    try:
        wait_for(lambda: all((d / (n + ".up")).exists() for n in NAMES), 20, what="the four processes")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: all(c.get("SIGINT") for c in counts(d).values()), 15, what="SIGINT everywhere")
        time.sleep(0.5)
        assert all(c == {"SIGINT": 1} for c in counts(d).values()), counts(d)
    finally:
        agent(home / "spool", "signal", "fg", "KILL")
        proc.communicate(timeout=30)
        kill_marked(str(prog))


@pytest.mark.timeout(120)
def test_each_signal_once_over_ssh(sshd, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    spool = tmp_path / "remote-spool"
    d, prog = write_counter(tmp_path)

    def chaperone(*args):
        res = subprocess.run(CLI + ["-F", sshd.config_file] + [str(a) for a in args], env=cli_env(home),
                             cwd=str(home), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res

    try:
        chaperone("run", "-d", "--id", "sshonce", "--spool", spool, "--kill-grace", "600", "testhost", "--",
                  "python3", prog, d)
        check_each_once(d, lambda sig: chaperone("kill", "-s", sig, "sshonce"))
        chaperone("kill", "-s", "KILL", "sshonce")
        assert wait_state(spool, "sshonce")["signal"] == "SIGKILL"
    finally:
        kill_marked(str(prog))
