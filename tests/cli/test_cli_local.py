"""``chaperone`` on this machine (host ``local``), as a user runs it.

Each test has its own CHAPERONE_HOME; real processes, real signals.
"""

import datetime
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

from support.helpers import (
    cli, cli_env, cli_popen, kill_marked, marker_number, one_line_error, pid_alive, procs_with,
    ps_ids, read_state, read_until, spool_dir, spool_root, unique, wait_for, wait_no_procs,
)

from chaperone.models import RunInfo

PY = sys.executable


def state_of(home, run_id):
    return read_state(spool_root(home), run_id)


# --- exit codes -------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script,code", [
    ("exit 7", 7),
    ("kill -TERM $$", 143),
    ("kill -9 $$", 137),
])
def test_run_exit_code(home, script, code):
    run_id = unique("ec")
    res = cli(home, "run", "local", "--id", run_id, "--", "sh", "-c", script)
    assert res.returncode == code, res.stderr
    st = state_of(home, run_id)
    assert st["state"] == "done"
    if code >= 128 and script.startswith("kill"):
        assert st["signal"] == signal.Signals(code - 128).name and st["return_code"] is None
    else:
        assert st["return_code"] == code and st["signal"] is None


@pytest.mark.timeout(30)
def test_false_is_done_not_error(home):
    res = cli(home, "run", "local", "--id", "f", "--", "false")
    assert res.returncode == 1
    assert res.stderr == b""  # a program failing is not chaperone failing
    st = state_of(home, "f")
    assert (st["state"], st["return_code"], st["errno"], st["error"]) == ("done", 1, None, None)


@pytest.mark.timeout(30)
def test_exec_errors(home, tmp_path):
    noexec = tmp_path / "script.sh"
    noexec.write_text("#!/bin/sh\necho never\n")
    os.chmod(str(noexec), 0o644)
    missing = "no-such-program-%s" % unique()

    res = cli(home, "run", "local", "--id", "nf", "--", missing, "arg")
    assert res.returncode == 127
    line = one_line_error(res.stderr)
    assert missing in line and "No such file or directory" in line
    assert res.stdout == b""
    st = state_of(home, "nf")
    assert st["state"] == "error" and st["errno"] == errno.ENOENT and missing in st["error"]

    res = cli(home, "run", "local", "--id", "nx", "--", str(noexec))
    assert res.returncode == 126
    assert "Permission denied" in one_line_error(res.stderr)
    st = state_of(home, "nx")
    assert st["state"] == "error" and st["errno"] == errno.EACCES

    bad = str(tmp_path / "no-such-dir")
    res = cli(home, "run", "local", "--id", "cw", "--cwd", bad, "--", "true")
    assert res.returncode not in (0, None)
    assert bad in one_line_error(res.stderr)
    st = state_of(home, "cw")
    assert st["state"] == "error" and st["errno"] == errno.ENOENT and "cwd" in st["error"]

    # detached: the same error, found at once
    res = cli(home, "run", "local", "-d", "--id", "nf2", "--", missing)
    assert res.returncode == 127 and res.stdout.strip() == b"nf2"
    assert missing in one_line_error(res.stderr)
    # and `wait` reports it the same way
    res = cli(home, "wait", "nf2")
    assert res.returncode == 127 and missing in one_line_error(res.stderr)


# --- output is bytes -----------------------------------------------------------------


OUT = b"\x00\x01\xff\xfe bin\x00ary \xc3\x28 not utf-8\nlast line, no newline"
ERR = b"err\x00\x80\xffside"


@pytest.mark.timeout(30)
def test_binary_stdout_and_stderr_exact(home):
    code = ("import sys, time; o, e = sys.stdout.buffer, sys.stderr.buffer\n"
            "o.write(%r); o.flush(); e.write(%r); e.flush()" % (OUT, ERR))
    res = cli(home, "run", "local", "--id", "b", "--", PY, "-c", code)
    assert res.returncode == 0, res.stderr
    assert res.stdout == OUT
    assert res.stderr == ERR
    res = cli(home, "logs", "b")
    assert (res.returncode, res.stdout) == (0, OUT)
    res = cli(home, "logs", "b", "--stderr")
    assert (res.returncode, res.stdout) == (0, ERR)
    assert (spool_dir(home, "b") / "stdout").read_bytes() == OUT


@pytest.mark.timeout(30)
def test_stdin_file_reaches_program_exactly(home, tmp_path):
    data = bytes(range(256)) * 1000 + b"\x00tail without newline"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    res = cli(home, "run", "local", "--id", "in", "--stdin", str(src), "--", "cat")
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    run_dir = spool_dir(home, "in")
    assert (run_dir / "stdin").read_bytes() == data
    assert stat.S_IMODE(os.stat(str(run_dir)).st_mode) == 0o700
    for name in os.listdir(str(run_dir)):
        assert stat.S_IMODE(os.lstat(str(run_dir / name)).st_mode) == 0o600, name


# --- 200 MB ----------------------------------------------------------------------------


GEN = r"""
import hashlib, os, random, sys, time
base = random.Random(7).randbytes(10 ** 6)
h = hashlib.sha256()
out = sys.stdout.buffer
gate = sys.argv[1] if len(sys.argv) > 1 else None
for i in range(200):
    if i == 100 and gate:  # half way: wait until the test has looked (at most 60 s)
        out.flush()
        end = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.01)
    block = i.to_bytes(8, "big") + base[8:]
    h.update(block)
    out.write(block)
out.flush()
sys.stderr.write(h.hexdigest())
"""


def sha256_file(path):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.timeout(90)
def test_200mb_detached_exact_and_supervisor_memory_flat(home, tmp_path):
    gate = tmp_path / "gate"  # (the program waits half way until the test has sampled: a loaded machine
    #                            would otherwise see it all written before the first sample)
    res = cli(home, "run", "local", "-d", "--id", "big", "--", PY, "-c", GEN, str(gate))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == b"big"
    sup = psutil.Process(state_of(home, "big")["agent_pid"])
    stdout_file = spool_dir(home, "big") / "stdout"
    waiter = cli_popen(home, "wait", "big")
    samples = []  # (supervisor RSS, bytes spooled so far)
    while waiter.poll() is None:
        try:
            samples.append((sup.memory_info().rss, os.path.getsize(str(stdout_file))))
        except psutil.NoSuchProcess:
            break
        if len([1 for _, size in samples if 0 < size < 200 * 10 ** 6]) >= 5:
            gate.touch()
        time.sleep(0.01)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    during = [rss for rss, size in samples if 0 < size < 200 * 10 ** 6]
    assert during, "the supervisor was never sampled while the output flowed: %r" % samples[:5]
    peak = max(rss for rss, size in samples)
    assert peak < 40 << 20, "supervisor RSS peaked at %d bytes" % peak

    st = state_of(home, "big")
    assert st["state"] == "done" and st["return_code"] == 0
    assert st["stdout_bytes"] == 200 * 10 ** 6
    spool = spool_dir(home, "big")
    want = (spool / "stderr").read_text()
    assert len(want) == 64
    assert os.path.getsize(str(spool / "stdout")) == 200 * 10 ** 6
    assert sha256_file(spool / "stdout") == want

    copy = tmp_path / "logs.out"
    with open(str(copy), "wb") as f:
        res = subprocess.run(
            [PY, "-c", "from chaperone.cli import main; main()", "logs", "big"],
            stdout=f, stderr=subprocess.PIPE, env=dict(os.environ, CHAPERONE_HOME=str(home)),
            timeout=60,
        )
    assert res.returncode == 0, res.stderr
    assert sha256_file(copy) == want
    os.unlink(str(copy))


# --- timeout -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_timeout_polite_program_gets_sigterm(home):
    t0 = time.monotonic()
    res = cli(home, "run", "local", "--id", "tp", "--timeout", "1", "--", "sleep", "30")
    assert res.returncode == 143
    assert time.monotonic() - t0 < 8
    assert "timed out" in one_line_error(res.stderr)
    st = state_of(home, "tp")
    assert st["timed_out"] is True and st["signal"] == "SIGTERM"


# --- kill a process tree -------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["term", "kill", "grace"])
def test_kill_whole_tree_including_setsid_grandchild(home, how):
    m = marker_number()
    trap = 'trap "" TERM; ' if how == "grace" else ""
    script = trap + "sleep %s & sleep %s & (setsid sleep %s &) ; wait" % (m, m, m)
    run_id = "kt-" + how
    res = cli(home, "run", "local", "-d", "--id", run_id, "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    try:
        sleeps = wait_for(lambda: len(procs_with(m)) == 3 and procs_with(m), 10, what="3 sleeps")
        escaped = [p for p in sleeps if os.getsid(p.pid) != os.getsid(state_of(home, run_id)["pid"])]
        assert len(escaped) == 1  # one of them is in a session of its own
        args = {"term": [], "kill": ["-s", "KILL"], "grace": ["--grace", "0.5"]}[how]
        t0 = time.monotonic()
        res = cli(home, "kill", run_id, *args)
        assert res.returncode == 0, res.stderr
        assert ("sent %s to run %s" % ("SIGKILL" if how == "kill" else "SIGTERM", run_id)).encode() in res.stdout
        res = cli(home, "wait", run_id)
        assert res.returncode == (143 if how == "term" else 137)
        if how == "grace":
            assert time.monotonic() - t0 >= 0.5
        wait_no_procs(m, timeout=3)
    finally:
        kill_marked(m)


# --- losing the supervisor, losing the CLI ---------------------------------------------------


@pytest.mark.timeout(30)
def test_supervisor_sigkilled_reads_lost_and_program_dies(home):
    m = marker_number()
    res = cli(home, "run", "local", "-d", "--id", "lost", "--", "sh", "-c", "sleep %s & sleep %s; wait" % (m, m))
    assert res.returncode == 0, res.stderr
    try:
        wait_for(lambda: len(procs_with(m)) == 2, 10, what="2 sleeps")
        st = state_of(home, "lost")
        os.kill(st["agent_pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(st["pid"]), 5, what="the program to die with its supervisor")
        res = cli(home, "status", "lost", "--json")
        assert res.returncode == 0, res.stderr
        now = json.loads(res.stdout)
        assert now["state"] == "lost"
        assert "supervisor" in now["error"]
        RunInfo.model_validate_json(res.stdout)
        wait_no_procs(m, timeout=3)
        res = cli(home, "wait", "lost")
        assert res.returncode == 255
        assert "lost" in one_line_error(res.stderr)
        res = cli(home, "status", "lost")
        assert b"lost" in res.stdout
    finally:
        kill_marked(m)


LINES = b"".join(b"line %d\n" % i for i in range(1, 31))
LOOP = "for i in $(seq 1 30); do echo line $i; sleep 0.1; done"


@pytest.mark.timeout(30)
def test_cli_sigkilled_during_run_program_carries_on(home):
    proc = cli_popen(home, "run", "local", "--id", "X", "--", "sh", "-c", LOOP)
    try:
        read_until(proc.stdout, b"line 2\n", timeout=10)
        proc.kill()
        proc.wait(timeout=5)
        st = state_of(home, "X")
        assert st["state"] == "running" and pid_alive(st["pid"])
        res = cli(home, "wait", "X")
        assert res.returncode == 0, res.stderr
        res = cli(home, "logs", "X")
        assert res.stdout == LINES
        res = cli(home, "status", "X", "--json")
        st = RunInfo.model_validate_json(res.stdout)
        assert st.state == "done" and st.return_code == 0
    finally:
        proc.stdout.close()
        proc.stderr.close()


# --- status, ps, logs -f, clean, kill -s ----------------------------------------------------


@pytest.mark.timeout(60)
def test_status_ps_logs_follow_clean(home, tmp_path):
    gate = tmp_path / "gate"
    # 10 lines, then it waits for the gate (so it is surely running while
    # we look), then 20 more lines
    script = ("for i in $(seq 1 10); do echo line $i; echo err $i >&2; done; "
              "while [ ! -e %s ]; do sleep 0.05; done; "
              "for i in $(seq 11 30); do echo line $i; echo err $i >&2; sleep 0.01; done" % gate)
    res = cli(home, "run", "local", "-d", "--id", "F", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    follower = cli_popen(home, "logs", "-f", "F")
    try:
        assert read_until(follower.stdout, b"line 10\n") == b"".join(b"line %d\n" % i for i in range(1, 11))
        res = cli(home, "status", "F", "--json")
        assert res.returncode == 0
        st = RunInfo.model_validate_json(res.stdout)
        assert st.id == "F" and st.state == "running" and st.pid
        res = cli(home, "status", "F")
        assert b"running" in res.stdout and b"F" in res.stdout

        res = cli(home, "clean", "F")
        assert res.returncode != 0
        assert "running" in one_line_error(res.stderr)
        assert spool_dir(home, "F").is_dir()

        res = cli(home, "kill", "F", "-s", "BOGUS")
        assert res.returncode != 0
        assert "BOGUS" in one_line_error(res.stderr)

        res = cli(home, "ps")
        assert res.returncode == 0
        row = [l for l in res.stdout.decode().splitlines() if l.startswith("F ")]
        assert len(row) == 1 and "local" in row[0]

        assert follower.poll() is None  # still following the running run
        gate.write_text("go")
        out, err = follower.communicate(timeout=20)
        assert follower.returncode == 0, err
        assert out == b"".join(b"line %d\n" % i for i in range(11, 31))  # stdout only, once
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    res = cli(home, "status", "F", "--json")
    st = RunInfo.model_validate_json(res.stdout)
    assert st.state == "done" and st.return_code == 0 and st.stdout_bytes == len(LINES)
    res = cli(home, "ps", "-a", "--json")
    rows = dict((r["id"], r) for r in json.loads(res.stdout))
    assert rows["F"]["state"] == "done" and rows["F"]["argv"][0] == "sh"

    res = cli(home, "clean", "F")
    assert res.returncode == 0, res.stderr
    assert not spool_dir(home, "F").exists()
    assert "F" not in ps_ids(home)
    res = cli(home, "status", "F")
    assert res.returncode != 0 and "no such run" in one_line_error(res.stderr)


@pytest.mark.timeout(30)
def test_clean_force_kills_running_run(home):
    m = marker_number()
    res = cli(home, "run", "local", "-d", "--id", "G", "--", "sleep", m)
    assert res.returncode == 0
    try:
        wait_for(lambda: procs_with(m), 5, what="the sleep")
        res = cli(home, "clean", "G", "--force")
        assert res.returncode == 0, res.stderr
        assert not spool_dir(home, "G").exists()
        assert ps_ids(home) == []
        wait_no_procs(m, timeout=3)
    finally:
        kill_marked(m)


@pytest.mark.timeout(30)
def test_huge_timeout_and_infinite_grace(home):
    m = marker_number()
    res = cli(home, "run", "local", "-d", "--id", "H", "--timeout", "1e308", "--", "sleep", m)
    assert res.returncode == 0, res.stderr
    try:
        res = cli(home, "kill", "H", "--grace", "inf")
        assert res.returncode != 0
        assert "grace" in one_line_error(res.stderr)
        st = json.loads(cli(home, "status", "H", "--json").stdout)
        assert st["state"] == "running" and pid_alive(st["pid"])  # not lost
        assert cli(home, "kill", "H", "--grace", "0.2").returncode == 0
        assert cli(home, "wait", "H").returncode == 143
    finally:
        kill_marked(m)


# --- Ctrl-C -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_ctrl_c_goes_to_the_program(home):
    m = marker_number()
    script = 'trap "echo got INT; exit 5" INT; echo ready; sleep %s & wait' % m
    proc = cli_popen(home, "run", "local", "--id", "I", "--", "sh", "-c", script)
    try:
        read_until(proc.stdout, b"ready\n")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 5, err
        assert out == b"got INT\n"
        assert b"sending SIGINT" in err
        st = state_of(home, "I")
        assert st["state"] == "done" and st["return_code"] == 5
    finally:
        kill_marked(m)  # the background sleep ignores SIGINT (sh -c)


@pytest.mark.timeout(30)
def test_ctrl_c_twice_detaches(home):
    m = marker_number()
    script = 'trap "" INT; echo ready; sleep %s' % m
    proc = cli_popen(home, "run", "local", "--id", "J", "--", "sh", "-c", script)
    try:
        read_until(proc.stdout, b"ready\n")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode != 0
        assert b"detached" in err and b"chaperone logs -f J" in err
        res = cli(home, "status", "J", "--json")
        st = json.loads(res.stdout)
        assert st["state"] == "running" and pid_alive(st["pid"])
        res = cli(home, "kill", "J", "-s", "KILL")
        assert res.returncode == 0
        assert cli(home, "wait", "J").returncode == 137
        wait_no_procs(m, timeout=3)
    finally:
        kill_marked(m)


# --- a timeout that needs the SIGKILL (runs in the background meanwhile) ---------


@pytest.fixture(scope="module")
def slow_timeout_run(tmp_path_factory):
    """The CLI has no --kill-grace, so the default kill_grace (10 s) applies:
    started with this module's first test, checked by its last one."""
    home = tmp_path_factory.mktemp("timeout-home")
    m = marker_number()
    t0 = time.monotonic()
    proc = cli_popen(home, "run", "local", "--id", "ti", "--timeout", "1", "--",
                     "sh", "-c", 'trap "" TERM; sleep %s' % m)
    yield home, proc, t0, m
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    kill_marked(m)


@pytest.fixture(scope="module", autouse=True)
def _start_slow_timeout_early(slow_timeout_run):
    yield


@pytest.mark.timeout(40)
def test_timeout_term_ignored_ends_with_sigkill_after_grace(slow_timeout_run):
    home, proc, t0, m = slow_timeout_run
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 137, err
    assert "timed out; killed by SIGKILL" in one_line_error(err)
    st = state_of(home, "ti")
    assert st["timed_out"] is True and st["signal"] == "SIGKILL"
    # timeout (1 s) + kill_grace (10 s), give or take scheduling
    took = (datetime.datetime.fromisoformat(st["end_time"])
            - datetime.datetime.fromisoformat(st["start_time"])).total_seconds()
    assert 10.9 <= took < 14, took
    assert time.monotonic() - t0 >= 10.9
    assert not procs_with(m)


def test_ps_fits_80_columns_with_a_long_error(home):
    """ps fits an 80-column terminal: a failed run's long error is cut at a
    word boundary with an ellipsis, as the command is (issue 10 item 7)."""
    r = cli(home, "-F", "/dev/null", "run", "nohost", "--", "sh", "-c", "echo a long command line here")
    assert r.returncode == 255
    out = subprocess.run([sys.executable, "-m", "chaperone", "ps", "-a"], env={**cli_env(home), "COLUMNS": "80"},
                         capture_output=True, timeout=60, cwd=str(home))
    lines = out.stdout.decode().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out
    assert all(len(line) <= 80 for line in lines), lines
    shown = lines[1].split("nohost", 1)[1].split("\u2026", 1)[0].strip()   # the status as cut
    assert shown.startswith("failed:") and ("failed: unknown host nohost: " + "x").startswith(shown + " "), lines


def test_status_without_ids_shows_the_runs_not_over(home, tmp_path):
    """`status` with no id: every run not over (as recorded), re-read now,
    in status's own columns; runs over are `ps -a`'s business."""
    m = marker_number()
    try:
        assert cli(home, "run", "-q", "--id", "over", "local", "--", "true").returncode == 0
        assert cli(home, "run", "-d", "--id", "going", "local", "--", "sleep", m).returncode == 0
        res = cli(home, "status")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.decode().splitlines()
        assert lines[0].split() == ["ID", "HOST", "STATE", "RESULT", "DURATION", "STDOUT", "STDERR"], lines
        assert [line.split()[:3] for line in lines[1:]] == [["going", "local", "running"]], lines
        res = cli(home, "status", "--json")
        assert [(i["id"], i["state"]) for i in json.loads(res.stdout)] == [("going", "running")]
    finally:
        kill_marked(m)


def test_a_newline_in_a_command_stays_on_its_row(home):
    assert cli(home, "run", "-q", "--id", "nl", "local", "--", "sh", "-c", "echo a\necho b").returncode == 0
    lines = cli(home, "ps", "-a").stdout.decode().splitlines()
    assert len(lines) == 2 and lines[1].startswith("nl ") and lines[1].endswith("sh -c 'echo a\\necho b'"), lines


def test_logs_since_a_bare_number_is_a_time_as_docker(home):
    """``--since 0``: everything (the epoch), as docker; a duration needs its unit."""
    assert cli(home, "run", "-q", "--id", "s0", "local", "--", "sh", "-c", "echo one; echo two >&2").returncode == 0
    for since in ("0", "1", "3600"):
        res = cli(home, "logs", "--since", since, "s0")
        assert (res.returncode, res.stdout, res.stderr) == (0, b"one\n", b"two\n"), since
    assert cli(home, "logs", "--since", "1h", "s0").stdout == b"one\n"


def test_wait_says_a_never_started_runs_error_once(home):
    cli(home, "run", "-d", "--id", "never", "nohost.invalid", "--", "true")
    res = cli(home, "wait", "never")
    assert res.returncode == 255
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chaperone: run never never started: unknown host "), lines


def test_refusals_exit_1_and_a_damaged_state_3(home):
    """As docs/cli.md's table says: a refusal (nothing done) is 1, a damaged
    state 3; never 255, which says chaperone failed or lost the run."""
    m = marker_number()
    try:
        assert cli(home, "run", "-q", "--id", "over", "local", "--", "true").returncode == 0
        res = cli(home, "kill", "over")
        assert res.returncode == 1 and one_line_error(res.stderr).startswith("chaperone: run over is not running")
        assert cli(home, "run", "-d", "--id", "going", "local", "--", "sleep", m).returncode == 0
        res = cli(home, "clean", "going")
        assert res.returncode == 1 and "kill it first, or clean --force" in one_line_error(res.stderr)
        (home / "spool" / "over" / "state.json").write_bytes(b"{damaged")
        for args in (("status", "over"), ("logs", "over")):
            res = cli(home, *args)
            assert res.returncode == 3 and "state.json is damaged" in one_line_error(res.stderr), args
    finally:
        kill_marked(m)


@pytest.mark.timeout(60)
def test_clean_force_forgets_a_run_whose_host_is_gone(home, tmp_path):
    """A run started on a host that is then gone for good: clean says why
    it cannot and what -f does (exit 255); clean -f forgets it here (its
    spool stays there), exit 0, and ps no longer shows it."""
    from support.sshd import SSHD

    server = SSHD()
    server.start()
    stopped = False
    try:
        run_id = unique("away")  # (the host's spool is this user's home: shared by every test session)
        res = cli(home, "-F", server.config_file, "run", "-d", "--id", run_id, "testhost", "--", "sleep", "1")
        assert res.returncode == 0, res.stderr
        server.stop()
        stopped = True
        res = cli(home, "-F", server.config_file, "clean", run_id)
        assert res.returncode == 255 and "clean -f forgets it here" in one_line_error(res.stderr), res.stderr
        res = cli(home, "-F", server.config_file, "clean", "-f", run_id)
        assert (res.returncode, res.stdout) == (0, b"forgot %s\n" % run_id.encode()), res.stderr
        assert "forgotten here, its spool on testhost stays" in one_line_error(res.stderr)
        assert cli(home, "ps", "-a", "-q").stdout == b""
    finally:
        if not stopped:
            server.stop()


@pytest.mark.timeout(60)
def test_wait_says_an_outage_once(home):
    """wait on a host that went away: one line saying it reconnects (not
    one per attempt), then 124 when --timeout passes."""
    from support.sshd import SSHD

    server = SSHD()
    server.start()
    config = home / "ssh_config"  # (stop() removes the server's files: its port stays named here)
    try:
        config.write_bytes(open(server.config_file, "rb").read())
        run_id = unique("w")  # (the host's spool is this user's home: shared by every test session)
        res = cli(home, "-F", config, "run", "-d", "--id", run_id, "testhost", "--", "sleep", "30")
        assert res.returncode == 0, res.stderr
    finally:
        server.stop()
    res = cli(home, "-F", config, "wait", "--timeout", "4s", run_id)
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 124, res.stderr
    assert sum("reconnecting" in line for line in lines) == 1, lines


def test_the_times_of_a_run_object_read_alike(home):
    """created, start_time and end_time (and last_seen) in one format:
    ISO 8601 in UTC as the agent writes them (+00:00, microseconds)."""
    import datetime

    assert cli(home, "run", "-q", "--id", "t", "local", "--", "true").returncode == 0
    info = json.loads(cli(home, "status", "--json", "t").stdout)
    for key in ("created", "start_time", "end_time"):
        value = info[key]
        assert value.endswith("+00:00"), (key, value)
        assert datetime.datetime.fromisoformat(value).tzinfo is not None


@pytest.mark.timeout(60)
def test_docker_s_logs_n_inspect_and_stop_t(home):
    """docker's habits: ``logs -n N`` (its --tail), ``inspect ID`` prints
    the JSON object, ``stop -t S ID`` sends SIGTERM then SIGKILL after S
    seconds (docker's default: 10)."""
    res = cli(home, "run", "local", "--id", "dock1", "-q", "--", "sh", "-c", "echo a; echo b; echo c")
    assert res.returncode == 0, res.stderr
    assert cli(home, "logs", "-n", "1", "dock1").stdout == b"c\n"
    obj = json.loads(cli(home, "inspect", "dock1").stdout)
    assert (obj["id"], obj["state"], obj["exit_code"]) == ("dock1", "done", 0)
    res = cli(home, "run", "-d", "local", "--id", "dock2", "--", "sh", "-c", "trap '' TERM; sleep 30")
    assert res.returncode == 0, res.stderr
    time.sleep(0.3)
    assert cli(home, "stop", "-t", "1", "dock2").returncode == 0
    res = cli(home, "wait", "--timeout", "20s", "dock2")
    assert res.returncode == 128 + signal.SIGKILL, res.stderr


@pytest.mark.timeout(60)
def test_shell_completion_completes_run_ids(home):
    """click's completion (docs/cli.md) completes the ids of recorded runs
    for every command that takes them, newest first."""
    for run_id in ("comp-a1", "comp-a2", "other-b"):
        assert cli(home, "run", "local", "--id", run_id, "-q", "--", "true").returncode == 0
    env = cli_env(home, _CHAPERONE_COMPLETE="bash_complete")
    for words, cword in (("chaperone logs comp-", 2), ("chaperone kill -s KILL comp-a", 4),
                         ("chaperone attach comp", 2), ("chaperone status comp", 2)):
        res = subprocess.run([sys.executable, "-m", "chaperone.cli"], capture_output=True, timeout=30,
                             env=dict(env, COMP_WORDS=words, COMP_CWORD=str(cword)))
        assert res.stdout.decode().split() == ["plain,comp-a2", "plain,comp-a1"], (words, res)


@pytest.mark.timeout(60)
def test_attach_takes_the_run_as_tmux_does(home):
    """``attach -t ID`` (tmux's habit) is ``attach ID``: the output from now
    on and the run's exit status; two different runs, or none, are one
    usage line (before: "No such option '-t'")."""
    stop = home / "stop"
    started = cli(home, "run", "-d", "--id", "tmuxish", "local", "--", "sh", "-c",
                  "while [ ! -e %s ]; do echo late; sleep 0.1; done; exit 5" % stop)
    assert started.returncode == 0, started.stderr
    attached = cli_popen(home, "attach", "-t", "tmuxish")
    try:
        first = attached.stdout.readline()  # (attached: its output from now on comes)
        stop.touch()
        rest, err = attached.communicate(timeout=30)
    finally:
        attached.kill()
    assert first == b"late\n" and set((first + rest).splitlines()) == {b"late"}, (first, rest, err)
    assert attached.returncode == 5, err
    for args in (["attach", "-t", "tmuxish", "other"], ["attach"]):
        res = cli(home, *args)
        assert res.returncode == 2 and res.stderr.count(b"\n") == 1, res.stderr
        assert b"Traceback" not in res.stderr


@pytest.mark.timeout(60)
def test_docker_run_habits_name_env_file_and_rm(home, tmp_path, monkeypatch):
    """docker's ``run`` habits: ``--name`` is the id; ``--env-file`` (docker's
    format: NAME=VALUE lines, # comments, values as written) under ``-e``,
    and ``-e NAME`` takes this machine's value; ``--rm`` removes the run
    (spool and record) once it has ended, keeping its exit status; ``-d
    --rm`` is one usage line.  (Before: "No such option" for each.)"""
    env_file = tmp_path / "env"
    env_file.write_text("# settings\nA=1\n\nB=two 'words'\nC=from-file\n")
    monkeypatch.setenv("FROM_HERE", "here-value")
    res = cli(home, "run", "--name", "dn1", "--env-file", env_file, "-e", "C=3", "-e", "FROM_HERE", "local", "--",
              "sh", "-c", 'printf "%s|%s|%s|%s" "$A" "$B" "$C" "$FROM_HERE"')
    assert (res.returncode, res.stdout) == (0, b"1|two 'words'|3|here-value"), res.stderr
    listed = json.loads(cli(home, "ps", "-a", "--json").stdout)
    assert [r["id"] for r in listed] == ["dn1"] and (spool_root(home) / "dn1").is_dir()

    res = cli(home, "run", "--rm", "--name", "gone", "local", "--", "sh", "-c", "echo out; exit 3")
    assert (res.returncode, res.stdout) == (3, b"out\n"), res.stderr
    assert [r["id"] for r in json.loads(cli(home, "ps", "-a", "--json").stdout)] == ["dn1"]
    assert not (spool_root(home) / "gone").exists()

    for args in (["run", "-d", "--rm", "local", "--", "true"], ["run", "--env-file", tmp_path / "nope", "local",
                                                                  "--", "true"]):
        res = cli(home, *args)
        assert res.returncode == 2 and res.stderr.count(b"\n") == 1, res.stderr
    assert b"--env-file" in res.stderr and b"No such file" in res.stderr


@pytest.mark.timeout(60)
def test_docker_ps_and_inspect_habits_filter_and_format(home):
    """``ps -f KEY=VALUE`` and ``--format`` (docker's Go-template subset),
    ``inspect -f``/``status --format``: the same fields as ``--json``;
    a bad filter or template is one usage line, before any work.  (Before:
    "No such option" for each.)"""
    for run_id, code in (("fmt-ok", 0), ("fmt-three", 3), ("other", 3)):
        assert cli(home, "run", "--id", run_id, "local", "--", "sh", "-c", "exit %d" % code).returncode == code
    res = cli(home, "ps", "-a", "--format", "{{.ID}}|{{.Status}}|{{.ExitCode}}|{{.host}}|{{json .argv}}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().splitlines() == [
        'other|exited 3|3|local|["sh", "-c", "exit 3"]', 'fmt-three|exited 3|3|local|["sh", "-c", "exit 3"]',
        'fmt-ok|exited 0|0|local|["sh", "-c", "exit 0"]']
    res = cli(home, "ps", "-a", "--format", "table {{.ID}}\\t{{.Status}}")
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["ID", "STATUS"] and lines[1].split() == ["other", "exited", "3"], lines
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # (aligned columns)
    # filters: one key again widens, another narrows; without -a, finished runs match too (as docker's)
    assert cli(home, "ps", "-q", "-f", "status=exited", "-f", "exited=3").stdout == b"other\nfmt-three\n"
    assert cli(home, "ps", "-q", "-f", "name=fmt", "-f", "exited=0", "-f", "exited=3").stdout == \
        b"fmt-three\nfmt-ok\n"
    assert cli(home, "ps", "-q", "-f", "id=fmt-o", "-f", "status=done").stdout == b"fmt-ok\n"
    assert cli(home, "ps", "-q", "-f", "status=running").stdout == b""
    res = cli(home, "inspect", "-f", "{{.State}} {{.ExitCode}} {{upper .host}}", "fmt-three")
    assert (res.returncode, res.stdout) == (0, b"done 3 LOCAL\n"), res.stderr
    assert json.loads(cli(home, "status", "--format", "{{json .}}", "fmt-ok").stdout)["id"] == "fmt-ok"
    for args in (["ps", "-f", "colour=red"], ["ps", "-f", "status=sleeping"], ["ps", "--format", "{{.Nope}}"],
                 ["ps", "--format", "{{range .}}{{end}}"], ["inspect", "-f", "{{.State", "fmt-ok"]):
        res = cli(home, *args)
        assert res.returncode == 2 and res.stdout == b"" and res.stderr.count(b"\n") == 1, (args, res.stderr)
        assert b"Traceback" not in res.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag,name", [("-9", "SIGKILL"), ("-INT", "SIGINT"), ("-SIGHUP", "SIGHUP"),
                                       ("-USR1", "SIGUSR1")])
def test_kill_takes_the_signal_as_kill_does(home, flag, name):
    """kill(1)'s habit, ``chaperone kill -9 ID`` (or ``-INT``, ``-SIGHUP``),
    is ``kill -s``: the run ends by that signal.  (Before: "No such option
    '-9'".)"""
    run_id = "killflag-%s" % flag.strip("-").lower()
    assert cli(home, "run", "-d", "--id", run_id, "local", "--", "sleep", "60").returncode == 0
    res = cli(home, "kill", flag, run_id)
    assert res.returncode == 0 and ("sent %s to run %s" % (name, run_id)).encode() in res.stdout, res.stderr
    res = cli(home, "wait", run_id)
    assert res.returncode == 128 + signal.Signals[name].value, res.stderr


@pytest.mark.timeout(60)
def test_top_lists_the_runs_processes_as_docker_top(home):
    """``chaperone top ID``: a table of the run's processes (the program
    first, a child that left its group included); ``--json`` the same as
    objects; a run with nothing left running says so on stderr."""
    tag = str(os.getpid())
    assert cli(home, "run", "-d", "--id", "topped", "local", "--", "sh", "-c",
               "(setsid sleep 51%s &); sleep 52%s" % (tag, tag)).returncode == 0
    for _ in range(100):
        procs = json.loads(cli(home, "top", "--json", "topped").stdout)
        if len(procs) == 3:
            break
        time.sleep(0.05)
    assert [p["argv"][-1] for p in procs] == ["(setsid sleep 51%s &); sleep 52%s" % (tag, tag), "51" + tag,
                                              "52" + tag] or sorted(p["argv"][-1] for p in procs[1:]) == \
        ["51" + tag, "52" + tag], procs
    res = cli(home, "top", "topped")
    lines = res.stdout.decode().splitlines()
    assert res.returncode == 0 and lines[0].split() == ["PID", "PPID", "S", "TIME", "RSS", "ELAPSED", "COMMAND"]
    assert lines[1].split()[0] == str(procs[0]["pid"]) and len(lines) == 4, lines
    assert cli(home, "kill", "-s", "KILL", "topped").returncode == 0
    cli(home, "wait", "topped")
    res = cli(home, "top", "topped")
    assert (res.returncode, res.stdout) == (0, b"") and b"no process running" in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_logs_until_stops_at_that_time_as_docker(home):
    """``logs --until TIME`` (docker's): only what was written before then,
    both streams in write order; a bad time is one usage line.  (Before:
    "No such option '--until'".)"""
    assert cli(home, "run", "--id", "untl", "local", "--", "sh", "-c",
               "echo a; sleep 0.6; echo b >&2; sleep 0.6; echo c").returncode == 0
    stamped = cli(home, "logs", "-t", "untl").stdout.decode().splitlines()
    assert [line.split()[1] for line in stamped] == ["a", "c"]
    when = [datetime.datetime.fromisoformat(line.split()[0][:26] + "+00:00").timestamp() for line in stamped]
    mid = "%.3f" % ((when[0] + when[1]) / 2)  # (between a and c: b, on stderr, was written about then)
    res = cli(home, "logs", "--until", mid, "untl")
    assert (res.returncode, res.stdout) == (0, b"a\n"), res.stderr
    res = cli(home, "logs", "--until", "%.3f" % (when[1] - 0.001), "untl")
    assert (res.stdout, res.stderr) == (b"a\n", b"b\n")
    res = cli(home, "logs", "--until", "%.3f" % (when[1] + 0.001), "untl")
    assert (res.stdout, res.stderr) == (b"a\nc\n", b"b\n")
    res = cli(home, "logs", "--since", "%.3f" % (when[0] + 0.001), "--until", "%.3f" % (when[1] - 0.001), "untl")
    assert (res.stdout, res.stderr) == (b"", b"b\n")
    res = cli(home, "logs", "-f", "--until", mid, "untl", timeout=20)  # (a time past: nothing to follow)
    assert (res.returncode, res.stdout) == (0, b"a\n"), res.stderr
    res = cli(home, "logs", "--until", "yesterday-ish", "untl")
    assert res.returncode == 2 and res.stderr.count(b"\n") == 1 and b"--until" in res.stderr


@pytest.mark.timeout(60)
def test_a_name_given_with_id_is_never_taken_by_a_prefix(home):
    """As docker: a prefix takes a generated id (``20261202-1``), never a
    name chosen with ``--id``: ``kill job1`` with only ``job10`` recorded
    is "no such run" (before: it killed job10, and ``rm -f job1`` removed
    it); the same for a group's name.  And kill's ``--grace -1`` is its own
    value, named as given (before: "invalid --grace '-s1'")."""
    assert cli(home, "run", "-d", "--id", "job10", "local", "--", "sleep", "60").returncode == 0
    assert cli(home, "run", "-d", "-H", "local", "--id", "grp10", "--", "sleep", "60").returncode == 0
    generated = cli(home, "run", "-d", "local", "--", "sleep", "60").stdout.decode().strip()
    try:
        for args in (["kill", "job1"], ["clean", "-f", "job1"], ["status", "job1"], ["kill", "grp1"]):
            res = cli(home, *args)
            assert res.returncode == 4 and b"no such run" in res.stderr, (args, res.stderr)
        assert json.loads(cli(home, "status", "--json", "job10").stdout)["state"] == "running"
        res = cli(home, "kill", generated[:17])
        assert res.returncode == 0 and ("to run %s " % generated).encode() in res.stdout, res.stderr
        res = cli(home, "kill", "--grace", "-1", "job10")
        assert res.returncode == 2 and b"invalid --grace '-1'" in res.stderr, res.stderr
    finally:
        cli(home, "kill", "-s", "KILL", "job10", "grp10", generated)


@pytest.mark.timeout(60)
def test_logs_tail_of_a_busy_run_is_n_lines(home):
    """``logs -n N`` of a run that writes all the time: its last N lines as
    of the call, N lines, on each path (one stream, both, with times)
    (before: what it wrote meanwhile came too: hundreds or thousands of
    lines for ``-n 1``)."""
    writer = "import sys, time\nfor i in range(200000):\n    print(i, flush=True)\n    time.sleep(0.0005)\n"
    assert cli(home, "run", "-d", "--id", "busy", "local", "--", sys.executable, "-c", writer).returncode == 0
    try:
        time.sleep(0.5)
        for args in (["--stdout"], [], ["-t"]):
            for n in (1, 3):
                res = cli(home, "logs", "-n", str(n), *args, "busy")
                lines = res.stdout.decode().splitlines()
                assert res.returncode == 0 and len(lines) == n, (args, n, lines[:5], len(lines))
                numbers = [int(line.split()[-1]) for line in lines]
                assert numbers == list(range(numbers[0], numbers[0] + n)), numbers
    finally:
        cli(home, "kill", "-s", "KILL", "busy")


@pytest.mark.timeout(60)
def test_stop_returns_once_the_run_has_stopped_as_docker_stop(home):
    """``stop -t 1 ID && rm ID`` (docker's habit) for a program that ignores
    SIGTERM: stop returns once SIGKILL has ended it, so rm works (before:
    stop returned at once, and rm said it was still running)."""
    assert cli(home, "run", "-d", "--id", "stubborn", "local", "--", "sh", "-c",
               "trap '' TERM; sleep 60").returncode == 0
    time.sleep(0.3)
    start = time.monotonic()
    res = cli(home, "stop", "-t", "1", "stubborn")
    assert res.returncode == 0 and b"sent SIGTERM" in res.stdout, res.stderr
    assert time.monotonic() - start >= 0.9
    res = cli(home, "rm", "stubborn")
    assert res.returncode == 0 and b"cleaned stubborn" in res.stdout, res.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("typo", ["-host", "-dhost"])
def test_a_typo_with_h_in_it_is_a_usage_error_not_the_help(home, typo):
    """``run -host node1 true`` (a typo): exit 2 and one line, nothing run
    (before: click read -h in it, printed the help and exited 0, so a
    script's ``&&`` went on)."""
    res = cli(home, "run", typo, "local", "touch", "ran")
    assert res.returncode == 2 and res.stdout == b"" and res.stderr.count(b"\n") == 1, res
    assert typo.encode() in res.stderr and not (home / "ran").exists()


@pytest.mark.timeout(60)
def test_a_group_id_and_a_run_id_are_never_the_same(home):
    """``run -H ... --id X`` where X is a run, and ``run --id X`` where X
    is a group: each a usage line (before: both accepted, and ``kill X``
    reached only one of them)."""
    assert cli(home, "run", "-d", "-H", "local", "--id", "grp", "--", "sleep", "30").returncode == 0
    assert cli(home, "run", "-d", "--id", "single", "local", "--", "sleep", "30").returncode == 0
    try:
        for args, words in ((["run", "-d", "--id", "grp", "local", "--", "sleep", "30"], b"id of a group"),
                            (["run", "-d", "-H", "local", "--id", "single", "--", "sleep", "30"], b"id of a run")):
            res = cli(home, *args)
            assert res.returncode == 2 and words in res.stderr and res.stderr.count(b"\n") == 1, res.stderr
        assert sorted(cli(home, "ps", "-q").stdout.split()) == [b"grp-local", b"single"]
        assert cli(home, "run", "-d", "-H", "local", "--id", "grp", "--", "sleep", "30").returncode == 0  # (again)
    finally:
        cli(home, "kill", "-s", "KILL", "grp", "single")


@pytest.mark.timeout(60)
def test_damaged_records_and_a_home_that_is_a_file_are_one_line_each(tmp_path):
    """A ``runs.db`` that is not SQLite, and a ``CHAPERONE_HOME`` that is a
    file (or under one): one line naming the path and what to do, no
    "internal error" (before: "internal error: DatabaseError: file is not a
    database (please report it)", and "File exists: PATH")."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "runs.db").write_bytes(b"not a database, not at all" * 100)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for home, words in ((damaged, [str(damaged / "runs.db"), "move it aside"]),
                        (afile, [str(afile), "is a file"]), (afile / "sub", [str(afile / "sub"), "is a file"])):
        for args in (["ps"], ["run", "local", "--", "true"], ["status", "x"]):
            from support.helpers import CLI

            res = subprocess.run(CLI + args, env=dict(cli_env(tmp_path), CHAPERONE_HOME=str(home)),
                                 capture_output=True, timeout=30)
            err = res.stderr.decode()
            assert res.returncode not in (0, 2) and err.count("\n") == 1, (home, args, err)
            assert "internal error" not in err and all(w in err for w in words), (home, args, err)


@pytest.mark.timeout(60)
def test_wait_timeout_says_how_long_with_its_unit(home):
    """``wait --timeout 1.5 ID``: exit 124 and "still running after 1.5s"
    (before: "after 1.5", no unit); ``--timeout 1s`` is said as given."""
    assert cli(home, "run", "-d", "--id", "slowish", "local", "--", "sleep", "20").returncode == 0
    try:
        for given, said in (("1.5", b"after 1.5s"), ("1s", b"after 1s")):
            res = cli(home, "wait", "--timeout", given, "slowish")
            assert res.returncode == 124 and res.stderr == b"chaperone: run slowish: still running " + said + b"\n", \
                res.stderr
    finally:
        cli(home, "kill", "-s", "KILL", "slowish")


@pytest.mark.timeout(30)
def test_a_bad_host_name_in_a_pattern_is_a_usage_error_before_any_start(home):
    """``-H 'node[1-3],-node2'`` (a typo for ``!node2``): exit 2, one line
    naming the name, nothing started or recorded (before: node1-3 ran,
    and a failed row for ``-node2``, exit 255)."""
    res = cli(home, "run", "-H", "local,-node2", "--", "touch", "ran")
    assert res.returncode == 2 and res.stderr.count(b"\n") == 1 and b"-node2" in res.stderr, res.stderr
    assert not (home / "ran").exists() and cli(home, "ps", "-a", "-q").stdout == b""


@pytest.mark.timeout(60)
def test_ps_fits_a_narrow_terminal(home):
    """``ps`` in 70 columns, generated ids, a long command: every line fits
    (times short, status and command cut), in 80 the long forms stay
    (before: 71-76 characters in 70 columns, wrapped)."""
    from support.helpers import CLI

    for _ in range(2):
        assert cli(home, "run", "local", "--", "sh", "-c", "exit 0; " + "x" * 80).returncode == 0
    assert cli(home, "run", "-d", "local", "--", "sleep", "20").returncode == 0
    try:
        for columns, short in ((70, True), (120, False)):
            res = subprocess.run(CLI + ["ps", "-a"], env=dict(cli_env(home), COLUMNS=str(columns)),
                                 capture_output=True, timeout=30)
            lines = res.stdout.decode().splitlines()
            assert res.returncode == 0 and len(lines) == 4, res
            assert max(map(len, lines)) <= columns, lines
            assert ("s ago" in lines[1] and "seconds ago" not in lines[1]) == short, lines
    finally:
        cli(home, "kill", "-s", "KILL", *cli(home, "ps", "-q").stdout.decode().split())


@pytest.mark.timeout(60)
def test_a_bad_kill_signal_and_rm_with_a_recorded_id_are_said_plainly(home):
    """``kill -99 ID``, ``kill -BOGUS ID``: "unknown signal" (before: "No
    such option '-9'", "'-B'"); ``run --rm --id X`` with X recorded: a usage
    line, and X stays (before: it re-attached to the old run and removed
    it)."""
    assert cli(home, "run", "--id", "old", "local", "--", "true").returncode == 0
    for flag, word in (("-99", b"'99'"), ("-BOGUS", b"'BOGUS'")):
        res = cli(home, "kill", flag, "old")
        assert res.returncode == 2 and b"unknown signal " + word in res.stderr, res.stderr
    res = cli(home, "run", "--rm", "--id", "old", "local", "--", "true")
    assert res.returncode == 2 and b"--rm" in res.stderr and res.stderr.count(b"\n") == 1, res.stderr
    assert cli(home, "ps", "-a", "-q").stdout == b"old\n"


@pytest.mark.timeout(60)
def test_format_edges_as_docker(home):
    """``--format ''`` and ``--format table`` are the default table; a
    ``table`` template with no runs prints its header; ``--format`` with
    ``--json`` is one usage line, for ps and status alike (before: blank
    lines, nothing, and the two resolved in opposite ways)."""
    assert cli(home, "run", "--id", "fe", "local", "--", "true").returncode == 0
    default = cli(home, "ps", "-a").stdout
    for template in ("", "table"):
        assert cli(home, "ps", "-a", "--format", template).stdout == default
    res = cli(home, "ps", "-a", "-f", "name=zzz", "--format", "table {{.ID}}\\t{{.Status}}")
    assert res.stdout.split() == [b"ID", b"STATUS"], res.stdout
    for args in (["ps", "-a", "--json", "--format", "{{.ID}}"], ["status", "--json", "--format", "{{.ID}}", "fe"]):
        res = cli(home, *args)
        assert res.returncode == 2 and res.stdout == b"" and b"--json" in res.stderr, (args, res)
    assert cli(home, "inspect", "-f", "{{.State}}", "fe").stdout == b"done\n"
