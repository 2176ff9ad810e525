"""The agent driven directly: ``agent.py --root DIR start < program.json``.

Real processes and signals; each test has its own spool root.
"""

import base64
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from support.helpers import load_agent, require_python  # noqa: E402
from support.helpers import (
    AGENT, agent, agent_cmd, agent_start, kill_marked, pid_alive, procs_with, program,
    marker_number, one_line_error, read_state, unique, wait_for, wait_no_procs, wait_state,
)

PY = sys.executable


def run_seconds(st):
    """Seconds from the run's start to its end, as the agent recorded them."""
    import datetime

    start = datetime.datetime.fromisoformat(st["start_time"])
    return (datetime.datetime.fromisoformat(st["end_time"]) - start).total_seconds()


@pytest.fixture
def root(tmp_path):
    # (a name of its own: pytest removes a passed test's tmp_path at once and
    # may give the next test the same path, while a supervisor of the last
    # run may still be writing its end there)
    return tmp_path / ("spool-" + uuid.uuid4().hex[:8])


# --- exec errors versus programs that fail ------------------------------------


@pytest.mark.timeout(20)
def test_false_is_done_with_return_code_1(root):
    agent_start(root, program("f1", ["false"]))
    st = wait_state(root, "f1")
    assert st["state"] == "done"
    assert st["return_code"] == 1
    assert st["signal"] is None and st["error"] is None and st["errno"] is None
    assert st["rusage"] is not None and st["end_time"] is not None


@pytest.mark.timeout(20)
def test_exec_errors_are_error_state_with_errno(root, tmp_path):
    noexec = tmp_path / "noexec.sh"
    noexec.write_text("#!/bin/sh\necho never\n")
    os.chmod(str(noexec), 0o644)
    cases = {
        "nf": (program("nf", ["/nonexistent/prog-%s" % unique()]), errno.ENOENT, "No such file"),
        "nx": (program("nx", [str(noexec)]), errno.EACCES, "Permission denied"),
        "cw": (program("cw", ["true"], cwd="/nonexistent-%s" % unique()), errno.ENOENT, "cwd"),
        "si": (program("si", ["cat"], stdin={"path": "/nonexistent-in"}), errno.ENOENT, "stdin /nonexistent-in"),
    }
    for run_id, (spec, err, text) in cases.items():
        first = agent_start(root, spec)
        # start answers once the exec succeeded or failed: already final here
        assert first["state"] == "error", first
        st = read_state(root, run_id)
        assert st["state"] == "error"
        assert st["errno"] == err, st
        assert text in st["error"], st
        assert st["return_code"] is None and st["pid"] is None
        assert os.path.getsize(str(root / run_id / "stdout")) == 0
    assert "/nonexistent-" in read_state(root, "cw")["error"]


@pytest.mark.timeout(30)
def test_nul_byte_in_argv_env_or_cwd_is_refused_up_front(root):
    """Valid JSON, but exec could never take it: refused before any run
    exists (one line, exit 2), not left to fail in the supervisor."""
    for run_id, spec in (
        ("nul1", program("nul1", ["echo", "a\x00b"])),
        ("nul2", program("nul2", ["echo", "x"], env={"A": "a\x00b"})),
        ("nul3", program("nul3", ["echo", "x"], cwd="/tmp\x00x")),
    ):
        res = agent(root, "start", "--follow", input=spec, timeout=20)
        assert res.returncode == 2, res.stderr
        assert "NUL" in one_line_error(res.stderr)
        assert res.stdout == b""
        assert not os.path.exists(os.path.join(root, run_id))


# --- output is bytes ----------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("capture", ["file", "pipe"])
def test_binary_output_and_stdin_data_are_exact(root, capture):
    payload = bytes(range(256)) * 3 + b"\xff\xfe\x00no newline"
    code = (
        "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d); "
        "sys.stderr.buffer.write(b'E\\x00\\x80' + str(len(d)).encode())"
    )
    spec = program("bin", [PY, "-c", code], stdin={"data": base64.b64encode(payload).decode()},
                   config={"capture": capture})
    agent_start(root, spec)
    st = wait_state(root, "bin")
    assert st["state"] == "done" and st["return_code"] == 0
    assert (root / "bin" / "stdout").read_bytes() == payload
    assert (root / "bin" / "stderr").read_bytes() == b"E\x00\x80" + str(len(payload)).encode()
    assert (root / "bin" / "stdin").read_bytes() == payload
    assert st["stdout_bytes"] == len(payload)
    # program.json keeps no copy of the data, only a pointer to the stdin file
    stored = json.loads((root / "bin" / "program.json").read_text())
    assert stored["program"]["stdin"] == {"data": "<in the stdin file>"}
    # `output` gives byte ranges exactly
    res = agent(root, "output", "bin", "--stream", "stdout", "--offset", "5", "--length", "300")
    assert res.returncode == 0
    assert res.stdout == payload[5:305]


# --- idempotent start -----------------------------------------------------------


@pytest.mark.timeout(30)
def test_start_twice_sequentially_runs_once(root, tmp_path):
    log = tmp_path / "ran.log"
    spec = program("seq", ["sh", "-c", 'echo "$$" >> "%s"; sleep 0.5' % log])
    first = agent_start(root, spec)
    second = agent_start(root, spec)
    assert first["pid"] and first["pid"] == second["pid"]
    st = wait_state(root, "seq")
    third = agent_start(root, spec)  # after the end: still the same run
    assert third["state"] == "done" and third["pid"] == first["pid"]
    assert st["return_code"] == 0
    assert log.read_text().split() == [str(first["pid"])]


@pytest.mark.timeout(40)
def test_concurrent_starts_run_one_program(root, tmp_path):
    log = tmp_path / "ran.log"
    spec = json.dumps(program("conc", ["sh", "-c", 'echo "$$" >> "%s"; sleep 1' % log])).encode()
    procs = [
        subprocess.Popen(agent_cmd(root, "start"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(8)
    ]
    # release them together: each blocks on stdin until now
    for p in procs:
        p.stdin.write(spec)
    for p in procs:
        p.stdin.close()
    states = []
    for p in procs:
        out, err = p.stdout.read(), p.stderr.read()
        assert p.wait(timeout=30) == 0, err.decode()
        states.append(json.loads(out.decode().splitlines()[0]))
    pids = set(s["pid"] for s in states)
    assert len(pids) == 1 and None not in pids, states
    st = wait_state(root, "conc")
    assert st["state"] == "done" and st["pid"] in pids
    assert log.read_text().split() == [str(st["pid"])]
    # no leftover private build directories
    assert sorted(os.listdir(str(root))) == ["conc"]


# --- timeout ---------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_timeout_escalates_to_sigkill_after_kill_grace(root):
    marker = unique("to")
    spec = program("to", ["sh", "-c", 'trap "" TERM; sleep 30 & wait; echo %s' % marker],
                   config={"timeout": 1, "kill_grace": 1})
    t0 = time.monotonic()
    agent_start(root, spec)
    st = wait_state(root, "to", timeout=15)
    assert time.monotonic() - t0 >= 1.95
    assert st["state"] == "done"
    assert st["timed_out"] is True
    assert st["signal"] == "SIGKILL"
    assert st["return_code"] is None
    # SIGTERM at 1 s is ignored; SIGKILL at 2 s; the end is recorded soon after
    assert 1.95 <= run_seconds(st) < 4, run_seconds(st)


@pytest.mark.timeout(20)
def test_timeout_sigterm_is_enough_for_a_polite_program(root):
    agent_start(root, program("tp", ["sleep", "30"], config={"timeout": 0.5, "kill_grace": 5}))
    st = wait_state(root, "tp", timeout=10)
    assert st["timed_out"] is True and st["signal"] == "SIGTERM"
    assert 0.45 <= run_seconds(st) < 2.5, run_seconds(st)  # no wait for the 5 s grace


# --- signals and the process tree --------------------------------------------------


@pytest.mark.timeout(30)
def test_signal_with_grace_kills_escaped_grandchild_ignoring_term(root):
    """The program dies of SIGTERM at once, but a grandchild that escaped with
    setsid ignores it: --grace must still SIGKILL it."""
    marker = "300.%d" % (os.getpid() % 1000 + 1000)
    marker = "%s%d" % (marker, int(time.time() * 1000) % 100000)
    script = '(trap "" TERM; exec setsid sleep %s >/dev/null 2>&1 </dev/null &); sleep %s & wait' % (marker, marker)
    try:
        agent_start(root, program("gr", ["sh", "-c", script]))
        wait_for(lambda: len(procs_with(marker)) == 2, 10, what="two sleeps")
        res = agent(root, "signal", "gr", "TERM", "--grace", "0.5")
        assert res.returncode == 0, res.stderr.decode()
        st = wait_state(root, "gr", timeout=10)
        assert st["signal"] == "SIGTERM"
        wait_no_procs(marker, timeout=5)
    finally:
        kill_marked(marker)


@pytest.mark.timeout(20)
def test_signal_not_running_and_unknown_signal(root):
    agent_start(root, program("sg", ["true"]))
    wait_state(root, "sg")
    res = agent(root, "signal", "sg", "TERM")
    assert res.returncode != 0 and b"not running" in res.stderr
    res = agent(root, "signal", "sg", "SIGBOGUS")
    assert res.returncode != 0 and b"unknown signal" in res.stderr


@pytest.mark.timeout(30)
def test_odd_numbers_never_crash_the_supervisor(root):
    """A huge (finite) timeout, a grace of inf/nan, a bogus signal number
    sent to the control FIFO: the run must stay running, never `lost`."""
    m = marker_number()
    try:
        agent_start(root, program("odd", ["sleep", m], config={"timeout": 1e308, "kill_grace": 1e300}))
        for grace in ("inf", "nan", "-1", "1e400"):
            res = agent(root, "signal", "odd", "CONT", "--grace", grace)
            assert res.returncode != 0, grace
            assert "--grace" in one_line_error(res.stderr)
        res = agent(root, "signal", "odd", "CONT", "--grace", "1e308")
        assert res.returncode == 0, res.stderr
        with open(str(root / "odd" / "control"), "wb") as fifo:
            for msg in ({"op": "signal", "signal": 999}, {"op": "signal", "signal": "TERM"},
                        {"op": "signal", "signal": 0}, {"op": "signal", "signal": 18, "grace": "x"},
                        [1, 2], "junk"):
                fifo.write(json.dumps(msg).encode() + b"\n")
            fifo.write(b"\xff\xfe not json\n")
        time.sleep(0.5)
        res = agent(root, "status", "odd")
        st = json.loads(res.stdout.decode())
        assert st["state"] == "running", st
        assert procs_with(m)
        assert agent(root, "signal", "odd", "KILL").returncode == 0
        st = wait_state(root, "odd")
        assert (st["state"], st["signal"], st["timed_out"]) == ("done", "SIGKILL", False)
        assert not (root / "odd" / "agent.log").exists()
    finally:
        kill_marked(m)


# --- supervisor death ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_supervisor_killed_run_is_lost_and_program_dies(root):
    marker = "301.%d" % (int(time.time() * 1000) % 1000000)
    agent_start(root, program("lo", ["sh", "-c", "sleep %s & sleep %s; wait" % (marker, marker)]))
    wait_for(lambda: len(procs_with(marker)) == 2, 10, what="two sleeps")
    st = read_state(root, "lo")
    pid, sup = st["pid"], st["agent_pid"]
    assert psutil.Process(pid).ppid() == sup
    try:
        os.kill(sup, signal.SIGKILL)
        # PDEATHSIG: the program itself goes with its supervisor
        wait_for(lambda: not pid_alive(pid), 5, what="the program to die")
        res = agent(root, "status", "lo")
        assert res.returncode == 0
        st = json.loads(res.stdout.decode())
        assert st["state"] == "lost"
        assert "supervisor" in st["error"] and str(sup) in st["error"]
        # status killed the rest of the process group
        wait_no_procs(marker, timeout=5)
        assert read_state(root, "lo")["state"] == "lost"  # recorded, not just shown
    finally:
        kill_marked(marker)


# --- the spool: modes, secrets ------------------------------------------------------


DUMMY_CERT = "-----BEGIN CERTIFICATE-----\nMIIBdummy\n-----END CERTIFICATE-----\n"


@pytest.mark.timeout(30)
def test_spool_modes_and_token_never_stored(root, tmp_path):
    token = "T" + unique("tok") * 3 + "x" * 10
    token = token[:43]
    assert len(token) == 43
    stdin_data = base64.b64encode(b"some input").decode()
    spec = program(
        "sec", ["sh", "-c", "cat; sleep 1; echo done >&2"], stdin={"data": stdin_data},
        callback={"url": "https://127.0.0.1:9/api/", "token": token, "cert": DUMMY_CERT},
        config={"retry_frequency": 0.2, "callback_timeout": 1},
    )
    agent_start(root, spec)
    st = read_state(root, "sec")
    sup = st["agent_pid"]
    # while it runs: no process has the token in its argv or environment
    for p in psutil.process_iter(["cmdline"]):
        try:
            assert not any(token in a for a in (p.info["cmdline"] or ())), p
        except psutil.NoSuchProcess:
            pass
    assert token.encode() not in open("/proc/%d/environ" % sup, "rb").read()
    wait_state(root, "sec", timeout=15)
    wait_for(lambda: not pid_alive(sup), 10, what="the supervisor to give up the callback")

    run_dir = root / "sec"
    assert stat.S_IMODE(os.stat(str(run_dir)).st_mode) == 0o700
    names = sorted(os.listdir(str(run_dir)))
    for name in ("program.json", "state.json", "stdout", "stderr", "stdin", "control"):
        assert name in names
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for d in dirnames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o700
        for f in filenames:
            path = os.path.join(dirpath, f)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                with open(path, "rb") as fh:
                    assert token.encode() not in fh.read(), path
    stored = json.loads((run_dir / "program.json").read_text())
    assert stored["callback"]["token"] != token
    assert stored["callback"]["url"] == "https://127.0.0.1:9/api/"
    assert (run_dir / "stdout").read_bytes() == b"some input"


# --- list, clean, python 3.8 ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_list_and_clean(root):
    agent_start(root, program("c1", ["true"]))
    agent_start(root, program("c2", ["sleep", "30"]))
    wait_state(root, "c1")
    res = agent(root, "list")
    listed = dict((s["id"], s["state"]) for s in json.loads(res.stdout.decode()))
    assert listed == {"c1": "done", "c2": "running"}
    res = agent(root, "clean", "c2")
    assert res.returncode != 0 and b"running" in res.stderr
    assert (root / "c2").is_dir()
    res = agent(root, "clean", "c2", "--force")
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout.decode())["state"] == "done"
    res = agent(root, "clean", "c1")
    assert res.returncode == 0
    assert os.listdir(str(root)) == []
    res = agent(root, "status", "c1")
    assert res.returncode == 4 and b"no such run" in res.stderr


@pytest.mark.timeout(30)
def test_agent_runs_on_python38(root):
    PY38 = require_python("3.8")
    payload = b"\x00\x01binary\xff"
    spec = program("p38", [PY38, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                   stdin={"data": base64.b64encode(payload).decode()}, config={"timeout": 20})
    res = agent(root, "start", "--follow", input=spec, python=PY38)
    assert res.returncode == 0, res.stderr.decode()
    assert (root / "p38" / "stdout").read_bytes() == payload
    st = read_state(root, "p38")
    assert st["state"] == "done" and st["return_code"] == 0
    # the follow stream ends with the final state and an end frame
    assert res.stdout.endswith(b"E" + b"\x00" * 12)
    res = agent(root, "start", input=program("p38b", ["/nonexistent-38"]), python=PY38)
    assert json.loads(res.stdout.decode())["errno"] == errno.ENOENT
    res = agent(root, "status", "nope", python=PY38)
    assert res.returncode == 4 and res.stderr.count(b"\n") == 1


@pytest.mark.timeout(30)
def test_batch_start_starts_each_document_on_its_own(root):
    """`start` with a JSON array (what the library sends for concurrent
    starts to one host): a rejected document does not stop the others, and
    an id twice in one batch starts one program."""
    good = [program("batch-%d" % i, ["sh", "-c", "echo %d >> %s/ran-%d" % (i, root, i)]) for i in range(3)]
    docs = [good[0], {"id": "bad/id", "program": {"argv": ["true"]}}, good[1], good[2], good[1],
            {"program": {"argv": ["true"]}}]
    res = agent(root, "start", input=json.dumps(docs).encode())
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout.decode())
    assert len(answers) == len(docs)
    assert answers[1]["id"] == "bad/id" and "invalid run id" in answers[1]["rejected"]
    assert answers[5]["id"] is None and "missing field 'id'" in answers[5]["rejected"]
    for i, at in ((0, 0), (1, 2), (2, 3)):
        assert answers[at]["id"] == "batch-%d" % i and answers[at]["state"] in ("running", "done")
        st = wait_state(root, "batch-%d" % i, ("done",))
        assert st["return_code"] == 0
        with open(os.path.join(str(root), "ran-%d" % i)) as f:
            assert f.read() == "%d\n" % i  # once, even for batch-1 given twice
    assert answers[4]["pid"] == answers[2]["pid"]
    assert not os.path.exists(os.path.join(str(root), "bad"))
    assert agent(root, "start", input=b"[]").returncode == 2


@pytest.mark.timeout(30)
def test_spool_root_parents_the_agent_creates_are_private(tmp_path):
    """`--root a/b/runs` where none exists: every directory the agent makes
    is 0700 (e.g. ~/.chaperone on a new host), not only the last."""
    root = tmp_path / "a" / "b" / "runs"
    agent_start(root, program("priv-1", ["true"]))
    for d in (tmp_path / "a", tmp_path / "a" / "b", root, root / "priv-1"):
        assert stat.S_IMODE(os.stat(str(d)).st_mode) == 0o700, d


# --- the command line and the clock, without argparse and datetime ---------------------


def _load_agent():
    return load_agent("chaperone_agent_parse_test")


def _argparse_reference(ag):
    """The agent's command line as it was defined with argparse (which costs
    10+ ms at every agent call to import and build)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ag.AgentError("usage: %s" % message)

    p = Parser(prog="agent.py", allow_abbrev=False)
    for opt in ("--root", "--marker", "--expect-hash"):
        p.add_argument(opt, default=None)
    p.add_argument("--login-env", type=int, default=None)
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("start", allow_abbrev=False)
    s.add_argument("--follow", action="store_true")
    for name in ("status", "list", "follow", "output", "signal", "clean", "control", "stdin"):
        s = sub.add_parser(name, allow_abbrev=False)
        if name != "list":
            s.add_argument("id")
        if name == "follow":
            s.add_argument("--stdout-offset", type=int, default=0)
            s.add_argument("--stderr-offset", type=int, default=0)
        elif name == "output":
            s.add_argument("--stream", choices=ag.STREAMS, required=True)
            s.add_argument("--offset", type=int, default=0)
            s.add_argument("--length", type=int, default=None)
            s.add_argument("--direct", action="store_true")
            s.add_argument("--counted", action="store_true")
        elif name == "signal":
            s.add_argument("signal")
            s.add_argument("--grace", type=float, default=None)
        elif name == "clean":
            s.add_argument("--force", action="store_true")

    def parse(argv):
        args = p.parse_args(argv)
        if not args.command:
            raise ag.AgentError("usage: no command")
        args.root = os.path.abspath(args.root or ag.default_root())
        if getattr(args, "id", None) is not None:
            ag.check_id(args.id)
        return vars(args)

    return parse


def test_command_line_parses_as_argparse_did():
    import random

    ag = _load_agent()
    reference = _argparse_reference(ag)

    def verdict(parse, argv):
        try:
            return True, parse(argv)
        except ag.AgentError:
            return False, None

    tokens = ["start", "status", "follow", "output", "signal", "list", "clean", "control", "x", "run-1",
              "TERM", "-1", "-2.5", "--follow", "--force", "--root", "--root=/tmp/r", "/tmp/r", "--marker",
              "M", "--expect-hash", "abc", "--stdout-offset", "--stderr-offset", "5", "z", "--stream",
              "stdout", "stderr", "stdin", "--offset", "--length", "--grace", "1e308", "nan", "--", "-x",
              "--bogus", "--direct", "--counted", "--grace=3", "--stream=stderr", "--force=1", "a b", "-", "../x", "--login-env", "12"]
    cases = [["status", "x"], ["signal", "x", "TERM", "--grace", "-1"], ["list"], ["start", "--follow"],
             ["output", "x", "--stream", "stdout", "--offset", "3", "--length", "4"], ["clean", "x", "--force"],
             ["--root", "/tmp/q", "--marker", "MM", "follow", "r", "--stdout-offset", "7", "--stderr-offset", "-2"],
             ["signal", "--grace", "2", "x", "KILL"], ["--expect-hash=h", "control", "x"], ["status", "--", "x"]]
    rng = random.Random(5)
    cases += [[rng.choice(tokens) for _ in range(rng.randint(0, 6))] for _ in range(5000)]
    for argv in cases:
        ok, got = verdict(lambda a: vars(ag.parse_args(a)), argv)
        assert (ok, got) == verdict(reference, argv), argv


def test_agent_help_and_usage_errors():
    res = subprocess.run([PY, str(AGENT), "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=20)
    assert res.returncode == 0 and b"usage: agent.py" in res.stdout
    for argv in (["status", "x", "y"], ["output", "x"], ["--root"], ["follow", "x", "--stdout-offset", "z"]):
        res = subprocess.run([PY, str(AGENT)] + argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=20)
        assert res.returncode == 2 and res.stdout == b""
        assert one_line_error(res.stderr).startswith("chaperone-agent: usage: "), argv


def test_now_iso_is_datetimes_isoformat():
    import datetime

    ag = _load_agent()
    for _ in range(50):
        before = datetime.datetime.now(datetime.timezone.utc)
        text = ag.now_iso()
        after = datetime.datetime.now(datetime.timezone.utc)
        when = datetime.datetime.fromisoformat(text)
        assert before <= when <= after and text.endswith("+00:00")
        assert when.isoformat() == text  # the same spelling datetime gives


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["follow", "start --follow"])
def test_a_follow_whose_reader_is_gone_ends_at_once(root, how):
    """The client of a follow died (its SSH session or the CLI was killed):
    the agent sees the hang-up on its stdout while it waits for output and
    ends, instead of waiting unseen for the run's end (hours, for a long
    run); the run itself goes on."""
    if how == "follow":
        agent_start(root, program("quiet", ["sleep", "30"]))
        argv, stdin = agent_cmd(root, "--marker", "M", "follow", "quiet"), b""
    else:
        argv = agent_cmd(root, "--marker", "M", "start", "--follow")
        stdin = json.dumps(program("quiet", ["sleep", "30"])).encode()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
        assert proc.stdout.read(3) == b"\nM\n"  # it is following
        time.sleep(0.3)
        assert proc.poll() is None
        proc.stdout.close()  # the reader goes
        t0 = time.monotonic()
        code = proc.wait(10)
        assert time.monotonic() - t0 < 1.0
        assert code == 141, proc.stderr.read()
        assert read_state(root, "quiet")["state"] == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        agent(root, "signal", "quiet", "SIGKILL")
        wait_state(root, "quiet")


def test_a_signal_that_came_after_the_loop_ends_the_supervisor_once_restored():
    """A SIGTERM that reached the supervisor after its loop's last turn
    (its handler only queues signals for the loop) ends it as soon as the
    final state is on disk (restore_signals), instead of being lost while
    the supervisor goes on owing callbacks for a day."""
    import types

    ag = _load_agent()
    for pending, expect in (([signal.SIGCHLD, signal.SIGTERM], -signal.SIGTERM), ([signal.SIGCHLD], 0)):
        pid = os.fork()
        if pid == 0:  # (the child: exits 0 unless a signal ends it)
            try:
                ag.Supervisor.restore_signals(types.SimpleNamespace(pending=pending))
                time.sleep(0.2)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == expect


@pytest.mark.parametrize("cwd, where", [
    ("sub", "HOME/sub"), ("sub/deeper", "HOME/sub/deeper"), ("~", "HOME"), ("~/sub", "HOME/sub"),
    (None, "HOME"), ("ABS", "ABS"), ("missing", None),
])
def test_cwd_is_taken_from_the_home_directory_as_cd_after_ssh(tmp_path, cwd, where):
    """A relative ``cwd`` is taken from the home directory (ssh runs a
    command there: ``cd sub`` means ~/sub), ``~`` and ``~/...`` are it;
    an absolute one stays; a missing one is the run's error, named."""
    home = tmp_path / "home"
    (home / "sub" / "deeper").mkdir(parents=True)
    absolute = tmp_path / "elsewhere"
    absolute.mkdir()
    cwd = str(absolute) if cwd == "ABS" else cwd
    root = tmp_path / "spool"
    run_id = unique("cwd")
    env = dict(os.environ, HOME=str(home))
    res = subprocess.run(agent_cmd(root, "start"), input=json.dumps(program(run_id, ["pwd"], cwd=cwd)).encode(),
                         env=env, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    st = wait_state(root, run_id)
    if where is None:
        assert st["state"] == "error" and st["error"] == "cwd missing: No such file or directory", st
        return
    want = where.replace("HOME", str(home)).replace("ABS", str(absolute))
    assert st["state"] == "done", st
    assert (root / run_id / "stdout").read_bytes() == want.encode() + b"\n"



def test_a_signal_right_after_the_start_is_taken(tmp_path):
    """The start's answer comes once the program runs; a signal sent at
    once (a Ctrl-C right after the program's first line) finds the
    supervisor's control FIFO open: it is opened before the program
    starts, and the request waits there for the loop.  (Here the loop is
    made to start a second late: before, that was "its supervisor does not
    read its control FIFO".)"""
    root = tmp_path / "spool"
    run_id = unique("sig")
    patch = "_loop = Supervisor.loop\nSupervisor.loop = lambda self: (time.sleep(1.0), _loop(self))[1]"
    code = ("import sys; sys.path.insert(0, %r); import agent; exec(%r, vars(agent)); "
            "agent.exit_now(agent.main(['--root', %r, 'start']))" % (str(AGENT.parent), patch, str(root)))
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(program(run_id, ["sleep", "30"])).encode(),
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res
    res = agent(root, "signal", run_id, "TERM")
    assert res.returncode == 0, res.stderr
    assert wait_state(root, run_id)["signal"] == "SIGTERM"
