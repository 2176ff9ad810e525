"""The fast path of ``chaperone run local`` (chaperone/cli/fastrun.py)
against the normal path, with real processes.

The fast path is run with click, asyncio and pydantic made unimportable
(``sys.modules[name] = None``): the normal path cannot run like that, so
whatever such a run does, the fast path did (and without re, json,
shlex, enum or hashlib: what they cost is most of what it saves).  The normal path is the same
command with ``CHAPERONE_FAST_RUN=0``.  Both must give the same exit
status, the same output bytes and messages, and the same records (as
``chaperone status --json`` shows them afterwards).
"""

import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from support.helpers import (REPO, cli, cli_env, kill_marked, marker_number, read_terminal, read_until, unique,
                             wait_no_procs)

#: The normal path's modules, and what the fast path must not load either
#: (re, json, shlex, enum: ~8 ms of a 40 ms command; hashlib: OpenSSL).
BLOCKED = ("click", "asyncio", "pydantic", "re", "json", "shlex", "enum", "hashlib")
#: The entry point (chaperone.__main__, where the head start tries the fast path), with
#: the normal path's modules made unimportable.
FAST = [sys.executable, "-c", "import sys\nfor m in %r: sys.modules[m] = None\n"
        "from chaperone.__main__ import main\nmain()" % (BLOCKED,)]
#: The same entry point, normal path.
NORMAL = [sys.executable, "-c", "from chaperone.__main__ import main\nmain()"]

#: Fields of a run's JSON that differ between any two runs (times, pids).
VOLATILE = ("created", "start_time", "end_time", "duration", "pid", "last_seen")


def run_cli(argv, home, *args, env=None, **kw):
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv + [str(a) for a in args], env=cli_env(home, **(env or {})), cwd=str(home),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kw)


def record_row(home, run_id):
    db = sqlite3.connect(str(home / "runs.db"))
    try:
        db.row_factory = sqlite3.Row
        row = dict(db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())
    finally:
        db.close()
    last = json.loads(row.pop("last"))
    for key in ("agent_pid", "agent_start", "pid", "pgid", "pid_start", "start_time", "end_time", "end_ticks",
                "rusage"):
        assert key in last
        last[key] = type(last[key]).__name__  # (present, of the same type)
    row["last"] = last
    for key in ("created", "seen"):
        assert isinstance(row.pop(key), float)
    return json.loads(json.dumps(row).replace(str(home), "HOME"))


def shown(home, run_id):
    """The run as the normal CLI shows it afterwards (status --json)."""
    res = cli(home, "status", "--json", run_id)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in VOLATILE:
        info[key] = info[key] is not None
    return json.loads(json.dumps(info).replace(str(home), "HOME"))


def both(tmp_path, *args, env=None, view=False):
    """Run ``chaperone run --id X local ARGS`` by both paths (each in a home
    of its own, the same id); their results, rows and views."""
    out = {}
    run_id = unique("fast")
    for name, argv in (("fast", FAST), ("normal", NORMAL)):
        home = tmp_path / name
        home.mkdir()
        extra = dict(env or {}, CHAPERONE_FAST_RUN="1" if name == "fast" else "0")
        res = run_cli(argv, home, "run", "--id", run_id, "local", *args, env=extra)
        out[name] = (res.returncode, res.stdout, res.stderr.replace(str(home).encode(), b"HOME"),
                     record_row(home, run_id), shown(home, run_id) if view else None)
    return out


CASES = {
    "exit status": ["--", "sh", "-c", "echo out; echo err >&2; exit 7"],
    "binary output, no final newline": ["--", "sh", "-c", r"printf '\000\377\376a\nb'; printf '\001\200' >&2"],
    "killed by a signal": ["--", "sh", "-c", "kill -TERM $$"],
    "not found": ["--", "no-such-program-%s" % unique(), "arg"],
    "not executable": ["--", str(REPO / "README.md")],
    "shell command line": ["echo", "$((6*7))", "'a  b'", ";", "exit", "3"],
    "options": ["-q", "-T", "-n", "-e", "GREETING=hi there", "--cwd", "/", "--kill-grace", "2s", "--",
                "sh", "-c", 'echo "$GREETING in $(pwd)"'],
    "timeout": ["--timeout", "0.3s", "--", "sleep", "30"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_is_the_normal_path(tmp_path, case):
    out = both(tmp_path, *CASES[case], view=case in ("exit status", "not found"))
    fast, normal = out["fast"], out["normal"]
    assert fast[0] == normal[0]  # exit status
    assert fast[1] == normal[1]  # stdout, byte for byte
    assert fast[2] == normal[2]  # stderr (the messages too)
    assert fast[3] == normal[3]  # the record, as stored
    assert fast[4] == normal[4]  # as status --json shows it
    expected = {"exit status": 7, "binary output, no final newline": 0, "killed by a signal": 143,
                "not found": 127, "not executable": 126, "shell command line": 3, "options": 0,
                "timeout": 143}[case]
    assert fast[0] == expected, fast[2]
    if case == "binary output, no final newline":
        assert fast[1] == b"\x00\xff\xfea\nb" and fast[2] == b"\x01\x80"
    if case == "options":
        assert fast[1] == b"hi there in /\n"


def test_generated_id_and_the_id_line_on_a_terminal(tmp_path):
    """Without --id: a new id, said on stderr when stderr is a terminal (not
    with -q), recorded as the normal path records it."""
    home = tmp_path / "home"
    home.mkdir()
    lines = {}
    for quiet in ((), ("-q",)):
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen(FAST + ["run", *quiet, "local", "--", "sh", "-c", "printf hello"],
                                    env=cli_env(home), cwd=str(home), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            slave = None
            out, _ = proc.communicate(timeout=30)
            err = read_terminal(master)
        finally:
            os.close(master)
            if slave is not None:
                os.close(slave)
        assert proc.returncode == 0 and out == b"hello"
        lines[quiet] = err
    ps = cli(home, "ps", "-a", "--json")
    runs = json.loads(ps.stdout)
    assert len(runs) == 2 and {r["state"] for r in runs} == {"done"}
    ids = sorted(r["id"] for r in runs)
    for run_id in ids:
        date, hms, tail = run_id.split("-")
        assert len(date) == 8 and len(hms) == 6 and len(tail) == 6 and int(tail, 16) >= 0
    said = lines[()].decode().strip()
    assert said.startswith("chaperone: run ") and said.endswith(" on local"), said
    assert said.split()[2] in ids
    assert lines[("-q",)] == b""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ctrl_c_sends_sigint_then_detaches(tmp_path):
    """First Ctrl-C: SIGINT to the program (its exit status is the run's);
    with a program that ignores it, the second detaches (130), the run goes
    on, recorded running; both paths alike."""
    results = {}
    for name, argv in (("fast", FAST), ("normal", NORMAL)):
        home = tmp_path / name
        home.mkdir()
        env = cli_env(home, CHAPERONE_FAST_RUN="1" if name == "fast" else "0")
        m = marker_number()
        script = 'trap "echo got INT; exit 5" INT; echo ready; sleep %s & wait' % m
        proc = subprocess.Popen(argv + ["run", "--id", "I", "local", "--", "sh", "-c", script], env=env,
                                cwd=str(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            read_until(proc.stdout, b"ready\n")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            kill_marked(m)  # (the background sleep ignores SIGINT: sh -c)
        first = (proc.returncode, out, err.replace(b"run I ", b"run ID "),
                 json.loads(json.dumps(shown(home, "I")).replace(str(m), "M")))

        m = marker_number()
        script = 'trap "" INT; echo ready; sleep %s' % m
        proc = subprocess.Popen(argv + ["run", "--id", "J", "local", "--", "sh", "-c", script], env=env,
                                cwd=str(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            read_until(proc.stdout, b"ready\n")
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
            info = json.loads(cli(home, "status", "--json", "J").stdout)
            second = (proc.returncode, out, err, info["state"])
            assert cli(home, "kill", "-s", "KILL", "J").returncode == 0
            assert cli(home, "wait", "J").returncode == 137
            wait_no_procs(m, timeout=5)
        finally:
            kill_marked(m)
        results[name] = first, second
    fast, normal = results["fast"], results["normal"]
    assert fast == normal
    code, out, err, view = fast[0]
    assert code == 5 and out == b"got INT\n"
    assert err == b"\nchaperone: sending SIGINT to run ID (Ctrl-C again to detach)\n"
    assert view["state"] == "done" and view["exit_code"] == 5
    code, out, err, state = fast[1]
    assert code == 130 and state == "running"
    assert b"detached; run J goes on" in err and b"chaperone logs -f J" in err


def test_what_the_fast_path_leaves_to_the_normal_one(tmp_path):
    """Piped stdin, -d, --json, a host, an existing id, a bad option: the
    fast path declines (the normal path, whose modules are blocked here,
    is what would run: the command fails instead of running)."""
    home = tmp_path / "home"
    home.mkdir()
    ok = run_cli(FAST, home, "run", "--id", "taken", "local", "--", "true")
    assert ok.returncode == 0, ok.stderr
    for args, kw in (
        (("run", "local", "--", "cat"), {"input": b"data", "stdin": None}),
        (("run", "-d", "local", "--", "true"), {}),
        (("run", "--json", "local", "--", "true"), {}),
        (("run", "--id", "taken", "local", "--", "true"), {}),
        (("run", "--no-such-option", "local", "--", "true"), {}),
        (("run", "-e", "NOEQUALS", "local", "--", "true"), {}),
        (("run", "-t", "local", "--", "true"), {}),
    ):
        res = run_cli(FAST, home, *args, **kw)
        halted = [m for m in BLOCKED if b"import of %s halted" % m.encode() in res.stderr]
        assert res.returncode != 0 and halted, (args, res.stdout, res.stderr)
    # ... and the normal path does them as always.
    res = run_cli(NORMAL, home, "run", "local", "--", "cat", input=b"data", stdin=None)
    assert res.returncode == 0 and res.stdout == b"data", res.stderr


@pytest.mark.timeout(60)
def test_a_relative_cwd_is_taken_from_the_current_directory(tmp_path):
    """``run local --cwd sub``: ./sub, as any local command would take it
    (both paths; on a host it is taken from the home directory, as ssh)."""
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    for argv, fast in ((FAST, "1"), (NORMAL, "0")):
        res = run_cli(argv, home, "run", "-q", "--cwd", "sub", "local", "--", "pwd", env={"CHAPERONE_FAST_RUN": fast})
        assert (res.returncode, res.stdout) == (0, str(home / "sub").encode() + b"\n"), res.stderr


def _on_a_terminal(argv, home, env):
    """``argv`` with stdout and stderr on one pseudo-terminal: (status, what the screen got)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, env=env, cwd=str(home), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        slave = None
        screen = read_terminal(master)
        return proc.wait(timeout=30), screen
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


@pytest.mark.timeout(60)
def test_the_end_note_starts_its_own_line_on_a_terminal(tmp_path):
    """Output without a final newline, then the run's end note (here its
    timeout): on a terminal the note starts a line of its own, as a shell's
    prompt would not; both paths."""
    for argv, fast in ((FAST, "1"), (NORMAL, "0")):
        home = tmp_path / ("h" + fast)
        home.mkdir()
        code, screen = _on_a_terminal(argv + ["run", "-q", "--timeout", "0.5", "local", "--", "sh", "-c",
                                              "printf partial; sleep 30"],
                                      home, cli_env(home, CHAPERONE_FAST_RUN=fast))
        assert code == 143, screen
        assert screen.startswith(b"partial\r\nchaperone: run "), screen


def test_the_fast_path_says_the_program_meets_no_terminal_as_the_normal_one(tmp_path):
    """stdin a terminal the program does not get: both paths say so on
    stderr, in the same words (before: only the normal path did)."""
    home = tmp_path / "home"
    home.mkdir()
    said = {}
    for name, entry, env in (("fast", FAST, {}), ("normal", NORMAL, {"CHAPERONE_FAST_RUN": "0"})):
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen(entry + ["run", "local", "--", "true"], env=cli_env(home, **env), cwd=str(home),
                                    stdin=slave, stdout=subprocess.PIPE, stderr=slave)
            os.close(slave)
            slave = None
            proc.communicate(timeout=30)
            said[name] = read_terminal(master).decode()
        finally:
            os.close(master)
            if slave is not None:
                os.close(slave)
        assert proc.returncode == 0, said[name]
    for text in said.values():
        assert "no terminal there: stdin is /dev/null" in text, said
    assert said["fast"].split(" on local", 1)[1] == said["normal"].split(" on local", 1)[1]
