"""Hostile input to the agent: never a traceback, never a wrong state,
never a hang (issue 12, items 5, 6, 7 and 9).

* JSON nested deep (program.json, a batch, control messages) is refused
  before it is parsed; deep control messages never take a run down.
* A huge batch is one line, in bounded time.
* ``stdin.path`` of a device, a FIFO with no writer, a directory: the
  run is an ``error`` with one line, at once.
* A spool entry replaced by a FIFO, a symbolic link to /dev/zero or a
  directory: one error for that run from every command, no hang, no
  agent left behind.
* Arguments that are not UTF-8 (surrogates on the command line).
"""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from support.helpers import (
    AGENT, agent, agent_cmd, agent_start, kill_marked, marker_number, one_line_error, procs_with, program,
    read_state, wait_for, wait_state,
)


@pytest.fixture
def root(tmp_path):
    # (a name of its own: pytest removes a passed test's tmp_path at once and
    # may give the next test the same path, while a supervisor of the last
    # run may still be writing its end there)
    return tmp_path / ("spool-" + uuid.uuid4().hex[:8])


def deep(depth, leaf="1"):
    return "[" * depth + leaf + "]" * depth


# --- deep and huge JSON ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [33, 990, 100000])
def test_deep_program_json_is_one_line(root, depth):
    docs = {
        "array": deep(depth),
        "in-env": '{"id": "d", "program": {"argv": ["true"], "env": {"X": %s}}}' % deep(depth),
        "batch": "[" + '{"id": "b", "program": {"argv": ["true"]}}, ' + deep(depth) + "]",
        "object": '{"a": ' * depth + "1" + "}" * depth,
    }
    for name, doc in docs.items():
        res = agent(root, "start", input=doc.encode())
        assert res.returncode == 2, (name, res)
        line = one_line_error(res.stderr)
        assert line == "chaperone-agent: program.json is nested too deep (over 32 levels of arrays and objects)", line
    assert not root.exists() or not [n for n in os.listdir(str(root)) if not n.startswith(".")]


@pytest.mark.timeout(60)
def test_brackets_in_strings_do_not_count(root):
    """A legitimate program.json with many brackets in its strings starts."""
    argv = ["printf", "%s", "[" * 5000 + '\\"{' * 100 + "]" * 5000]
    st = agent_start(root, program("br", argv))
    st = wait_state(root, "br")
    assert st["return_code"] == 0
    assert (root / "br" / "stdout").read_bytes() == argv[2].encode()


@pytest.mark.timeout(60)
def test_a_16_mib_batch_of_integers_is_one_line_in_bounded_time(root):
    doc = ("[" + ",".join(["1234567"] * (2 << 20)) + "]").encode()[:16 << 20]
    doc = doc[:doc.rindex(b",")] + b"]"
    start = time.monotonic()
    res = agent(root, "start", input=doc)
    took = time.monotonic() - start
    assert res.returncode == 2, res
    assert one_line_error(res.stderr).startswith("chaperone-agent: program.json: a batch of ")
    assert took < 30, took
    res = agent(root, "start", input=b"[" + b"1," * (9 << 20) + b"1]")
    assert res.returncode == 2 and "too large" in one_line_error(res.stderr)


@pytest.mark.timeout(60)
def test_deep_control_messages_never_take_a_run_down(root):
    m = marker_number()
    try:
        agent_start(root, program("ctl", ["sleep", m]))
        for doc in (deep(990), deep(20000), '{"op": "callback", "url": %s}' % deep(990)):
            res = agent(root, "control", "ctl", input=doc.encode())
            assert res.returncode == 2, res
            assert "nested too deep" in one_line_error(res.stderr)
        res = agent(root, "control", "ctl", input=b"[" * 70000)
        assert res.returncode == 2 and "too large" in one_line_error(res.stderr)
        # Straight into the FIFO (as anything of this user could write):
        with open(str(root / "ctl" / "control"), "wb") as fifo:
            for doc in (deep(990), deep(990), '{"op": "signal", "signal": %s}' % deep(5000),
                        '{"op": "callback", "url": ' + deep(2000) + "}"):
                fifo.write(doc.encode() + b"\n")
            fifo.write(b"[" * 200000 + b"\n")  # (longer than a control line may be: dropped)
            fifo.write(b'{"op": "release"}\n')
        time.sleep(0.5)
        res = agent(root, "status", "ctl")
        st = json.loads(res.stdout.decode())
        assert st["state"] == "running", st
        assert not (root / "ctl" / "agent.log").exists()
        assert agent(root, "signal", "ctl", "KILL").returncode == 0
        st = wait_state(root, "ctl")
        assert (st["state"], st["signal"]) == ("done", "SIGKILL")
    finally:
        kill_marked(m)


# --- stdin.path that is not a regular file ---------------------------------------------------


def limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))


@pytest.mark.timeout(60)
def test_stdin_path_must_be_a_regular_file(root, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    cases = {"zero": ("/dev/zero", "a character device"), "fifo": (str(fifo), "a FIFO"),
             "dir": (str(tmp_path), "a directory")}
    for run_id, (path, kind) in cases.items():
        start = time.monotonic()
        # (bounded here whatever the agent does: an endless copy must not fill the disk)
        res = subprocess.run(agent_cmd(root, "start"), input=json.dumps(program(run_id, ["cat"], stdin={"path": path})).encode(),
                             capture_output=True, timeout=30, preexec_fn=limit_file_size)
        assert res.returncode == 0, res
        st = json.loads(res.stdout.decode())
        assert time.monotonic() - start < 10
        assert st["state"] == "error", st
        assert st["error"] == ("stdin %s: %s, not a regular file (stdin.path is copied into the spool before "
                               "the program starts)" % (path, kind)), st
        assert not (root / run_id / "stdin").exists()
    # A regular file is copied as it was when opened, 0600.
    src = tmp_path / "in"
    src.write_bytes(b"\x00\xffdata")
    os.chmod(str(src), 0o644)
    agent_start(root, program("reg", ["cat"], stdin={"path": str(src)}))
    assert wait_state(root, "reg")["return_code"] == 0
    assert (root / "reg" / "stdout").read_bytes() == b"\x00\xffdata"
    assert os.stat(str(root / "reg" / "stdin")).st_mode & 0o777 == 0o600


# --- spool entries that are not what the agent made ----------------------------------------------


def replace(path, how):
    if os.path.isdir(str(path)) and not os.path.islink(str(path)):
        os.rmdir(str(path))
    elif os.path.lexists(str(path)):
        os.unlink(str(path))
    if how == "fifo":
        os.mkfifo(str(path))
    elif how == "zero":
        os.symlink("/dev/zero", str(path))
    elif how == "dir":
        os.mkdir(str(path))
    elif how == "file":
        path.write_bytes(b"x" * 100)


COMMANDS = (["status", "R"], ["output", "R", "--stream", "stdout"], ["output", "R", "--stream", "stderr"],
            ["follow", "R"], ["list"], ["signal", "R", "TERM"], ["clean", "R"])


def check_no_agent_left(root, supervisors):
    """No agent command of this spool is left (blocked on a FIFO, say):
    only the supervisors of its runs live on."""
    left = procs_with(str(root), exact=False)
    left = [p for p in left if p.pid not in supervisors and any(c.endswith("agent.py") for c in (p.cmdline() or []))]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entry", ["state.json", "stdout", "stderr", "control"])
@pytest.mark.parametrize("how", ["fifo", "zero", "dir"])
def test_a_spool_entry_replaced_is_one_error_for_that_run(root, entry, how):
    """A finished run and a running one, each with ``entry`` replaced:
    every command answers within seconds, in one line for that run (or
    as if nothing were wrong, where the entry is not needed), and list
    lists the other run."""
    m = marker_number()
    try:
        agent_start(root, program("ok", ["true"]))
        agent_start(root, program("fin", ["sh", "-c", "printf out; printf err >&2"]))
        wait_state(root, "fin")
        supervisors = {agent_start(root, program("run", ["sleep", m]))["agent_pid"]}
        for run_id in ("fin", "run"):
            replace(root / run_id / entry, how)
            for args in COMMANDS:
                if args[0] == "follow" and run_id == "run" and entry == "control":
                    continue  # (a follow of a running run goes on while it runs: right)
                args = [run_id if a == "R" else a for a in args]
                res = agent(root, *args, timeout=20)
                assert b"Traceback" not in res.stderr, (args, res)
                if args == ["list"]:
                    assert res.returncode == 0
                    ids = [s["id"] for s in json.loads(res.stdout.decode())]
                    assert "ok" in ids, ids
                    continue
                if res.returncode != 0:
                    assert res.returncode in (1, 3), (args, res)
                    line = one_line_error(res.stderr)
                    assert "run %s" % run_id in line, line
                if entry == "state.json":
                    assert res.returncode == 3, (args, res)
            check_no_agent_left(root, supervisors)
    finally:
        kill_marked(m)


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_arguments_that_are_not_utf8(root):
    """Bytes that are not UTF-8 on the agent's command line (Python sees
    surrogates): a marker is written back as the very bytes; elsewhere
    one line, never a traceback."""
    agent_start(root, program("u", ["true"]))
    wait_state(root, "u")
    base = [os.fsencode(a) for a in agent_cmd(root)]
    res = subprocess.run(base + [b"--marker", b"M\xff\xfe", b"status", b"u"], capture_output=True, timeout=30)
    assert res.returncode == 0, res
    assert res.stdout.startswith(b"\nM\xff\xfe\n") and json.loads(res.stdout.split(b"\n", 2)[2])["id"] == "u"
    for argv in ([b"status", b"u\xff"], [b"signal", b"u", b"TERM\xff"], [b"output", b"u", b"--stream", b"std\xff"],
                 [b"follow", b"u", b"--stdout-offset", b"1\xff"], [b"--root", b"/tmp/\xff/x", b"list"],
                 [b"clean", b"\xff"], [b"\xff"], [b"--marker\xff"], [b"signal", b"u", b"TERM", b"--grace", b"\xff"]):
        res = subprocess.run(base + argv, capture_output=True, timeout=30)
        assert res.returncode in (0, 2, 4), (argv, res)
        if res.returncode:
            one_line_error(res.stderr)
