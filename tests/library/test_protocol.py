"""The wire format: the agent (plain dicts) and chaperone/models.py (pydantic) agree.

* What the real agent writes (printed state lines, state.json, list entries,
  follow frames) validates against :class:`RunState`.
* ``validate_spec`` (agent) and :class:`ProgramSpec` accept the same
  documents and fill in the same defaults.
* The agent is stdlib-only and runs on Python 3.8.
* :class:`StreamDecoder` copes with any split of the byte stream and with
  noise before the marker.
* The JSON Schemas in docs/protocol.md are the generated ones.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chaperone.models import (
    AGENT_FINAL_STATES,
    AGENT_STATES,
    FINAL_STATES,
    RECORD_STATES,
    STATES,
    PROTOCOL_VERSION,
    RUN_ID_PATTERN,
    RUSAGE_FIELDS,
    STREAMS,
    Config,
    OutputAck,
    ProgramSpec,
    RunState,
    Rusage,
    json_schemas,
)
from chaperone.protocol import (
    FRAME,
    AfterMarker,
    End,
    OutputChunk,
    ProtocolError,
    StateUpdate,
    StreamDecoder,
    payload_after_marker,
)

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "remote" / "agent.py"
DOC = REPO / "docs" / "protocol.md"
from support.helpers import load_agent, require_python  # noqa: E402
MARKER = "CHAPERONE-test-marker-7f3a9c"


agent = load_agent()


# --- running the real agent ---------------------------------------------------


def run_agent(root, *args, stdin=b"", python=sys.executable, marker=None, timeout=60):
    cmd = [str(python), str(AGENT), "--root", str(root)]
    if marker is not None:
        cmd += ["--marker", marker]
    cmd += [str(a) for a in args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def state_line(proc) -> RunState:
    """The single JSON line a command printed, validated."""
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, proc.stdout
    return RunState.model_validate(json.loads(lines[0]))


def start(root, doc, **kw) -> RunState:
    return state_line(run_agent(root, "start", stdin=json.dumps(doc).encode(), **kw))


def status(root, run_id, **kw) -> RunState:
    return state_line(run_agent(root, "status", run_id, **kw))


def wait_final(root, run_id, seconds=30.0, **kw) -> RunState:
    end = time.monotonic() + seconds
    while True:
        st_ = status(root, run_id, **kw)
        if st_.final:
            return st_
        assert time.monotonic() < end, "run %s still %s" % (run_id, st_.state)
        time.sleep(0.05)


def stored_state(root, run_id) -> RunState:
    return RunState.model_validate(json.loads((Path(root) / run_id / "state.json").read_text()))


def wait_supervisor_gone(state: RunState, seconds=15.0) -> None:
    """The supervisor lingers (pipes, callbacks) after state.json is final."""
    end = time.monotonic() + seconds
    while agent.Run.supervisor_alive(None, state.model_dump()) and time.monotonic() < end:
        time.sleep(0.05)


def spec(run_id, argv):
    return {"id": run_id, "program": {"argv": argv}}


def mode(path) -> int:
    return os.lstat(path).st_mode & 0o777


def test_normal_program(tmp_path):
    root = tmp_path / "spool"
    token = "t" * 40
    doc = {
        "id": "normal-1",
        "program": {
            "argv": ["sh", "-c", "cat; printf 'out\\n'; printf 'err!' >&2; exit 3"],
            "env": {"FOO": "bar"},
            "env_inherit": ["PATH"],
            "stdin": {"data": base64.b64encode(b"from stdin\n").decode()},
            "umask": 0o022,
        },
        # Unreachable on purpose: the token must still be redacted, and a
        # short callback_timeout lets the supervisor give up quickly.
        "callback": {"url": "https://127.0.0.1:9/api/v1/agent/", "token": token, "cert": "x"},
        "config": {"callback_timeout": 0.5, "retry_frequency": 0.1},
    }
    first = start(root, doc, marker=None)
    assert first.id == "normal-1" and first.state in ("running", "done")
    assert first.spool == str(root / "normal-1")
    final = wait_final(root, "normal-1")
    assert final.state == "done"
    assert final.return_code == 3 and final.signal is None and not final.timed_out
    assert final.rusage is not None and final.end_time is not None
    assert final.pid == final.pgid and final.pid is not None
    run = root / "normal-1"
    assert (run / "stdout").read_bytes() == b"from stdin\nout\n"
    assert (run / "stderr").read_bytes() == b"err!"
    assert (final.stdout_bytes, final.stderr_bytes) == (15, 4)
    assert stored_state(root, "normal-1") == final

    # The spool layout and its modes.
    assert mode(root) == 0o700 and mode(run) == 0o700
    for name in ("program.json", "state.json", "stdout", "stderr", "stdin", "control"):
        assert mode(run / name) == 0o600, name
    assert os.path.stat.S_ISFIFO(os.lstat(run / "control").st_mode)
    assert (run / "stdin").read_bytes() == b"from stdin\n"
    assert not list(run.glob("*.tmp"))

    # program.json in the spool: the model's filled-in document, token and
    # stdin data redacted.
    stored = json.loads((run / "program.json").read_text())
    assert token not in (run / "program.json").read_text()
    expected = ProgramSpec.model_validate(doc).model_dump()
    expected["callback"]["token"] = "<redacted>"
    expected["program"]["stdin"] = {"data": "<in the stdin file>"}
    assert stored == expected
    wait_supervisor_gone(final)


def test_start_with_marker_and_noise_free_decoding(tmp_path):
    root = tmp_path / "spool"
    proc = run_agent(root, "start", stdin=json.dumps(spec("m1", ["true"])).encode(), marker=MARKER)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"\n" + MARKER.encode() + b"\n")
    events = StreamDecoder(MARKER).feed(b"Welcome to host\n" + proc.stdout)
    assert len(events) == 1 and isinstance(events[0], StateUpdate)
    RunState.model_validate(events[0].state)
    payload = payload_after_marker(proc.stdout, MARKER)
    RunState.model_validate(json.loads(payload))
    wait_supervisor_gone(wait_final(root, "m1"))


def test_exec_failure_is_error_state(tmp_path):
    root = tmp_path / "spool"
    st_ = start(root, spec("bad-exec", ["/nonexistent/program", "arg"]))
    assert st_.state == "error"  # known at once: start waits for the exec
    assert st_.errno == 2 and st_.pid is None and st_.return_code is None
    assert st_.error.startswith("/nonexistent/program:")
    assert st_.end_time is not None
    assert stored_state(root, "bad-exec") == status(root, "bad-exec")

    st_ = start(root, {"id": "bad-cwd", "program": {"argv": ["true"], "cwd": "/nonexistent/dir"}})
    assert st_.state == "error" and st_.error.startswith("cwd /nonexistent/dir:")
    st_ = start(root, {"id": "bad-stdin", "program": {"argv": ["cat"], "stdin": {"path": "/nonexistent/in"}}})
    assert st_.state == "error" and st_.error.startswith("stdin /nonexistent/in:")
    for run_id in ("bad-exec", "bad-cwd", "bad-stdin"):
        wait_supervisor_gone(stored_state(root, run_id))


def test_killed_program(tmp_path):
    root = tmp_path / "spool"
    st_ = start(root, spec("killed", ["sleep", "60"]))
    assert st_.state == "running" and st_.pid is not None
    sig = state_line(run_agent(root, "signal", "killed", "KILL"))
    assert sig.id == "killed"
    final = wait_final(root, "killed")
    assert final.state == "done" and final.signal == "SIGKILL"
    assert final.return_code is None and not final.timed_out
    assert stored_state(root, "killed") == final
    # A signal to a finished run is refused (1); unknown signal is bad input (2).
    refused = run_agent(root, "signal", "killed", "TERM")
    assert refused.returncode == 1 and refused.stdout == b""
    assert run_agent(root, "signal", "killed", "NOPE").returncode == 2
    wait_supervisor_gone(final)


def test_timed_out_program(tmp_path):
    root = tmp_path / "spool"
    start(root, {"id": "slow", "program": {"argv": ["sleep", "60"]},
                 "config": {"timeout": 0.3, "kill_grace": 0.5}})
    final = wait_final(root, "slow")
    assert final.state == "done" and final.timed_out
    assert final.signal == "SIGTERM" and final.return_code is None
    assert stored_state(root, "slow") == final
    wait_supervisor_gone(final)


def test_timeout_escalates_to_sigkill(tmp_path):
    root = tmp_path / "spool"
    start(root, {"id": "stubborn",
                 "program": {"argv": ["sh", "-c", "trap '' TERM; sleep 60 & wait; sleep 60"]},
                 "config": {"timeout": 0.2, "kill_grace": 0.2}})
    final = wait_final(root, "stubborn")
    assert final.state == "done" and final.timed_out and final.signal == "SIGKILL"
    wait_supervisor_gone(final)


def test_lost_when_supervisor_killed(tmp_path):
    root = tmp_path / "spool"
    st_ = start(root, spec("orphan", ["sleep", "60"]))
    os.kill(st_.agent_pid, signal.SIGKILL)
    end = time.monotonic() + 15
    while True:
        now = status(root, "orphan")
        if now.state != "running":
            break
        assert time.monotonic() < end, "a killed supervisor still counts as alive"
        time.sleep(0.05)
    assert now.state == "lost" and "is gone without a result" in now.error
    assert now.end_time is not None
    assert stored_state(root, "orphan") == now
    assert status(root, "orphan") == now  # final, stays


def _fake_running(root, run_id, **changes):
    """A ``running`` state.json with no supervisor behind it."""
    base = agent.Supervisor(agent.Run(str(root), run_id), {"config": {}}, None).base_state()
    base.update(changes)
    run = Path(root) / run_id
    run.mkdir(parents=True, mode=0o700)
    for name in ("stdout", "stderr"):
        (run / name).write_bytes(b"xyz")
    agent.write_json_atomic(str(run / "state.json"), base)
    RunState.model_validate(base)


@pytest.mark.parametrize(
    "changes, reason",
    [
        # The pid is alive (pytest itself) but its start time is not the recorded one.
        ({"agent_pid": os.getpid(), "agent_start": 1}, "is gone without a result"),
        # The pid and start time match, but they are from another boot.
        ({"agent_pid": os.getpid(), "boot_id": "00000000-0000-0000-0000-000000000000"},
         "the host rebooted"),
    ],
    ids=["recycled-pid", "rebooted"],
)
def test_lost_detection_checks_pid_start_time_and_boot_id(tmp_path, changes, reason):
    if agent.boot_id() is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id")
    root = tmp_path / "spool"
    _fake_running(root, "fake", **changes)
    # Sanity: with the real values the run counts as alive.
    alive = dict(agent.Run(str(root), "fake").read_state())
    alive.update(agent_pid=os.getpid(), agent_start=agent.proc_start_ticks(os.getpid()),
                 boot_id=agent.boot_id())
    assert agent.Run(str(root), "fake").supervisor_alive(alive)
    st_ = status(root, "fake")
    assert st_.state == "lost" and reason in st_.error
    assert (st_.stdout_bytes, st_.stderr_bytes) == (3, 3)
    assert stored_state(root, "fake") == st_


def test_exit_codes(tmp_path):
    root = tmp_path / "spool"
    assert run_agent(root, "status", "nope").returncode == 4
    assert run_agent(root, "follow", "nope").returncode == 4
    assert run_agent(root, "status", "../etc").returncode == 2
    assert run_agent(root, "start", stdin=b"").returncode == 2
    assert run_agent(root, "start", stdin=b"{not json").returncode == 2
    assert run_agent(root, "start", stdin=b'{"id": "x"}').returncode == 2
    assert run_agent(root, "bogus").returncode == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_agent(blocker / "sub", "start", stdin=json.dumps(spec("x", ["true"])).encode())
    assert proc.returncode == 3 and proc.stderr.startswith(b"chaperone-agent: ")


def test_list_entries_validate(tmp_path):
    root = tmp_path / "spool"
    start(root, spec("a1", ["true"]))
    start(root, spec("a2", ["/nonexistent"]))
    start(root, spec("a3", ["sleep", "60"]))
    (root / ".new-ignored").mkdir()
    proc = run_agent(root, "list", marker=MARKER)
    events = StreamDecoder(MARKER).feed(proc.stdout)
    assert proc.returncode == 0 and len(events) == 1
    entries = [RunState.model_validate(e) for e in events[0].state["list"]]
    assert [e.id for e in entries] == ["a1", "a2", "a3"]
    assert {e.id: e.state for e in entries}["a2"] == "error"
    assert {e.id: e.state for e in entries}["a3"] == "running"
    run_agent(root, "signal", "a3", "KILL")
    for run_id in ("a1", "a3"):
        wait_supervisor_gone(wait_final(root, run_id))


def _decode_follow(raw: bytes, json_line: bool, pieces: int = 7, noise: int = 0):
    """Feed ``raw`` in uneven pieces; return the events."""
    dec = StreamDecoder(MARKER, json_line=json_line, framed=True)
    events = []
    step = max(1, len(raw) // pieces)
    for i in range(0, len(raw), step):
        events += dec.feed(raw[i:i + step])
    assert dec.ended and dec.noise == noise
    return events


def _check_follow(events, root, run_id, offsets=(0, 0)):
    """States validate; output chunks are contiguous and rebuild the spool files."""
    got = {"stdout": bytearray(), "stderr": bytearray()}
    start_at = dict(zip(("stdout", "stderr"), offsets))
    states = []
    assert isinstance(events[-1], End)
    assert isinstance(events[-2], StateUpdate)
    for ev in events[:-1]:
        if isinstance(ev, OutputChunk):
            assert ev.offset == start_at[ev.stream] + len(got[ev.stream])
            got[ev.stream] += ev.data
        else:
            assert isinstance(ev, StateUpdate)
            states.append(RunState.model_validate(ev.state))
    final = states[-1]
    assert final.final and all(not s.final for s in states[:-1])
    run = Path(root) / run_id
    for name in ("stdout", "stderr"):
        assert bytes(got[name]) == (run / name).read_bytes()[start_at[name]:]
    assert (final.stdout_bytes, final.stderr_bytes) == (
        len((run / "stdout").read_bytes()), len((run / "stderr").read_bytes()))
    return states


def test_start_follow_reassembles_output(tmp_path):
    root = tmp_path / "spool"
    script = (
        "import os, sys, time\n"
        "for i in range(40):\n"
        "    os.write(1, bytes([i]) * 65536 + b'\\n')\n"
        "    os.write(2, ('err %d\\n' % i).encode())\n"
        "    if i % 10 == 0: time.sleep(0.02)\n"
        "os.write(1, os.urandom(3000000))\n"
    )
    doc = spec("follow-1", [sys.executable, "-c", script])
    proc = run_agent(root, "start", "--follow", stdin=json.dumps(doc).encode(), marker=MARKER)
    assert proc.returncode == 0, proc.stderr
    banner = b"motd: " + MARKER.encode()[:-3] + b"\n"
    events = _decode_follow(banner + proc.stdout, json_line=True, noise=len(banner))
    first = events[0]
    assert isinstance(first, StateUpdate)
    RunState.model_validate(first.state)
    states = _check_follow(events[1:], root, "follow-1")
    assert states[-1].state == "done" and states[-1].return_code == 0
    assert states[-1].stdout_bytes == 40 * 65537 + 3000000

    # ``follow`` of the finished run from offsets: only the rest, then S and E.
    proc = run_agent(root, "follow", "follow-1", "--stdout-offset", "100000",
                     "--stderr-offset", "7", marker=MARKER)
    assert proc.returncode == 0, proc.stderr
    events = _decode_follow(proc.stdout, json_line=False, pieces=3)
    _check_follow(events, root, "follow-1", offsets=(100000, 7))
    wait_supervisor_gone(states[-1])


def test_follow_of_running_run_sends_running_state(tmp_path):
    root = tmp_path / "spool"
    start(root, spec("f2", ["sh", "-c", "echo a; sleep 2; echo b >&2"]))  # (2 s: the follow starts first, even on a loaded machine)
    proc = run_agent(root, "follow", "f2", marker=MARKER)
    events = _decode_follow(proc.stdout, json_line=False)
    states = _check_follow(events, root, "f2")
    # The first poll sends what output there is, then the running state.
    assert [s.state for s in states] == ["running", "done"]
    assert states[-1].state == "done"
    wait_supervisor_gone(states[-1])


# --- Python 3.8 and stdlib-only ----------------------------------------------------


def test_agent_runs_on_python38(tmp_path):
    PY38 = require_python("3.8")
    root = tmp_path / "spool"
    first = start(root, spec("py38", ["sh", "-c", "echo hi"]), python=PY38)
    assert first.state in ("running", "done")
    final = wait_final(root, "py38", python=PY38)
    assert final.state == "done" and final.return_code == 0 and final.stdout_bytes == 3
    proc = run_agent(root, "follow", "py38", python=PY38, marker=MARKER)
    _check_follow(_decode_follow(proc.stdout, json_line=False), root, "py38")
    wait_supervisor_gone(final)


def test_agent_is_stdlib_only():
    tree = ast.parse(AGENT.read_text(), str(AGENT))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the agent"
            names.add(node.module.split(".")[0])
    assert names  # the walk found the imports
    outside = sorted(n for n in names if n not in sys.stdlib_module_names and n != "__future__")
    assert not outside, "the agent imports non-stdlib modules: %s" % outside


# --- the two validators ----------------------------------------------------------

TOKEN = "k" * 32
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
BASE = {"id": "run-1", "program": {"argv": ["echo", "hi"]}}


def with_(path, value, base=BASE):
    """``base`` with ``value`` at the dotted ``path`` (``...=DELETE`` removes it)."""
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


DELETE = object()
FULL = {
    "version": 1,
    "id": "Full_run.2-x",
    "program": {
        "argv": ["/bin/sh", "-c", "exit 0", ""],
        "cwd": "/tmp",
        "env": {"A": "1", "B": None, "LANG": "C.UTF-8"},
        "env_inherit": False,
        "stdin": {"path": "/etc/hostname"},
        "umask": 0o077,
    },
    "callback": {"url": "https://sched.example:8443/api/v1/agent/", "token": TOKEN,
                 "cert": CERT, "heartbeat": 0.5},
    "config": {"timeout": 12.5, "output_buffer": 4096, "output_latency": 0,
               "retry_frequency": 1, "kill_grace": 0.0, "callback_timeout": 60, "capture": "pipe"},
}

VALID = {
    "minimal": BASE,
    "every-field": FULL,
    "version-explicit": with_("version", 1),
    "id-128": with_("id", "a" * 128),
    "id-single": with_("id", "7"),
    "id-dots": with_("id", "a.b.c"),
    "stdin-path": with_("program.stdin", {"path": "/dev/null"}),
    "stdin-data": with_("program.stdin", {"data": base64.b64encode(b"\x00\xffhello").decode()}),
    "stdin-data-empty": with_("program.stdin", {"data": ""}),
    "stdin-null": with_("program.stdin", None),
    "env-inherit-list": with_("program.env_inherit", ["PATH", "HOME"]),
    "env-inherit-empty-list": with_("program.env_inherit", []),
    "env-inherit-true": with_("program.env_inherit", True),
    "env-null-value": with_("program.env", {"X": None}),
    "cwd-null": with_("program.cwd", None),
    "umask-0": with_("program.umask", 0),
    "umask-511": with_("program.umask", 511),
    "umask-null": with_("program.umask", None),
    "callback-null": with_("callback", None),
    "callback-minimal": with_("callback", {"url": "https://127.0.0.1:1/", "token": TOKEN, "cert": CERT}),
    "callback-int-heartbeat": with_("callback", {"url": "https://h/", "token": "x" * 100, "cert": "", "heartbeat": 5}),
    "config-empty": with_("config", {}),
    "timeout-null": with_("config.timeout", None),
    "timeout-int": with_("config.timeout", 5),
    "timeout-tiny": with_("config.timeout", 1e-9),
    "latency-zero": with_("config.output_latency", 0),
    "kill-grace-zero": with_("config.kill_grace", 0),
    "output-buffer-1": with_("config.output_buffer", 1),
    "capture-file": with_("config.capture", "file"),
    "capture-pipe": with_("config.capture", "pipe"),
    "shell-line": with_("program", {"argv": ["echo $HOME | tr a-z A-Z"], "shell": True}),
    "shell-false": with_("program.shell", False),
}

INVALID = {
    # unknown fields at each level
    "unknown-top": with_("extra", 1),
    "unknown-program": with_("program.login", True),
    "unknown-stdin": with_("program.stdin", {"path": "/x", "mode": "r"}),
    "stdin-both": with_("program.stdin", {"path": "/x", "data": "YQ=="}),
    "stdin-empty-object": with_("program.stdin", {}),
    "unknown-callback": with_("callback", {"url": "https://h/", "token": TOKEN, "cert": CERT, "insecure": True}),
    "unknown-config": with_("config.timeout_s", 3),
    # wrong types
    "not-an-object": ["id", "run-1"],
    "version-2": with_("version", 2),
    "version-string": with_("version", "1"),
    "id-int": with_("id", 5),
    "program-null": with_("program", None),
    "program-list": with_("program", ["echo"]),
    "argv-string": with_("program.argv", "echo hi"),
    "argv-int-item": with_("program.argv", ["echo", 1]),
    "argv-null-item": with_("program.argv", ["echo", None]),
    "cwd-int": with_("program.cwd", 1),
    "env-list": with_("program.env", ["A=1"]),
    "env-null": with_("program.env", None),
    "env-int-value": with_("program.env", {"A": 1}),
    "env-inherit-string": with_("program.env_inherit", "PATH"),
    "env-inherit-int-item": with_("program.env_inherit", ["PATH", 1]),
    "env-inherit-null": with_("program.env_inherit", None),
    "stdin-string": with_("program.stdin", "/dev/null"),
    "stdin-path-int": with_("program.stdin", {"path": 3}),
    "stdin-data-int": with_("program.stdin", {"data": 3}),
    "callback-string": with_("callback", "https://h/"),
    "callback-no-cert": with_("callback", {"url": "https://h/", "token": TOKEN}),
    "callback-no-token": with_("callback", {"url": "https://h/", "cert": CERT}),
    "callback-url-int": with_("callback", {"url": 1, "token": TOKEN, "cert": CERT}),
    "callback-cert-null": with_("callback", {"url": "https://h/", "token": TOKEN, "cert": None}),
    "config-null": with_("config", None),
    "config-list": with_("config", []),
    # bool where int / number, string where number
    "umask-bool": with_("program.umask", True),
    "umask-float": with_("program.umask", 18.0),
    "umask-string": with_("program.umask", "022"),
    "output-buffer-bool": with_("config.output_buffer", True),
    "output-buffer-float": with_("config.output_buffer", 1024.0),
    "timeout-bool": with_("config.timeout", True),
    "kill-grace-bool": with_("config.kill_grace", False),
    "timeout-string": with_("config.timeout", "10"),
    "heartbeat-string": with_("callback", {"url": "https://h/", "token": TOKEN, "cert": CERT, "heartbeat": "30"}),
    "latency-string": with_("config.output_latency", "0.2"),
    # capture: exactly "file" or "pipe"
    "capture-unknown": with_("config.capture", "pty"),
    "capture-uppercase": with_("config.capture", "FILE"),
    "capture-null": with_("config.capture", None),
    "capture-bool": with_("config.capture", True),
    "capture-int": with_("config.capture", 1),
    "capture-list": with_("config.capture", ["file"]),
    # a shell command is one string
    "shell-two-words": with_("program", {"argv": ["echo", "hi"], "shell": True}),
    "shell-string": with_("program.shell", "yes"),
    "shell-int": with_("program.shell", 1),
    "shell-null": with_("program.shell", None),
    # out of range
    "timeout-negative": with_("config.timeout", -1),
    "timeout-zero": with_("config.timeout", 0),
    "umask-negative": with_("program.umask", -1),
    "umask-too-big": with_("program.umask", 512),
    "output-buffer-zero": with_("config.output_buffer", 0),
    "latency-negative": with_("config.output_latency", -0.1),
    "kill-grace-negative": with_("config.kill_grace", -1),
    "retry-zero": with_("config.retry_frequency", 0),
    "callback-timeout-negative": with_("config.callback_timeout", -5),
    "heartbeat-zero": with_("callback", {"url": "https://h/", "token": TOKEN, "cert": CERT, "heartbeat": 0}),
    # required fields
    "missing-id": with_("id", DELETE),
    "missing-program": with_("program", DELETE),
    "missing-argv": with_("program.argv", DELETE),
    "empty-argv": with_("program.argv", []),
    # ids
    "id-slash": with_("id", "a/b"),
    "id-dotdot": with_("id", "a..b"),
    "id-dotdot-alone": with_("id", ".."),
    "id-dot": with_("id", "."),
    "id-leading-dot": with_("id", ".hidden"),
    "id-leading-dash": with_("id", "-x"),
    "id-too-long": with_("id", "a" * 129),
    "id-empty": with_("id", ""),
    "id-space": with_("id", "a b"),
    "id-unicode": with_("id", "caf\u00e9"),
    # tokens
    "token-short": with_("callback", {"url": "https://h/", "token": "k" * 31, "cert": CERT}),
    "token-int": with_("callback", {"url": "https://h/", "token": 12345, "cert": CERT}),
}

# Documents both refuse that once only the agent refused (models.py now has the same rules).
DISAGREE = {
    "argv0-empty": with_("program.argv", [""]),
    "env-name-empty": with_("program.env", {"": "x"}),
    "env-name-equals": with_("program.env", {"A=B": "x"}),
    "env-name-nul": with_("program.env", {"A\u0000": "x"}),
    "stdin-bad-base64": with_("program.stdin", {"data": "not base64!"}),
    "stdin-base64-no-padding": with_("program.stdin", {"data": "YQ"}),
    "callback-http": with_("callback", {"url": "http://h/", "token": TOKEN, "cert": CERT}),
    "callback-no-scheme": with_("callback", {"url": "127.0.0.1:8443/", "token": TOKEN, "cert": CERT}),
}


def model_verdict(doc):
    try:
        return True, ProgramSpec.model_validate(copy.deepcopy(doc)).model_dump()
    except ValidationError as e:
        return False, str(e)


def agent_verdict(doc):
    try:
        return True, agent.validate_spec(copy.deepcopy(doc))
    except agent.AgentError as e:
        assert e.code == 2
        return False, str(e)


def _cases():
    for name, doc in VALID.items():
        yield pytest.param(doc, True, id="valid-" + name)
    for name, doc in INVALID.items():
        yield pytest.param(doc, False, id="invalid-" + name)
    for name, doc in DISAGREE.items():
        yield pytest.param(doc, False, id="invalid-" + name)


@pytest.mark.parametrize("doc, valid", list(_cases()))
def test_validators_agree(doc, valid):
    agent_ok, agent_doc = agent_verdict(doc)
    assert agent_ok is valid, agent_doc
    model_ok, model_doc = model_verdict(doc)
    assert model_ok is valid, model_doc
    if valid:
        assert agent_doc == model_doc
        # and the JSON each side would store is the same
        assert json.loads(json.dumps(agent_doc)) == json.loads(ProgramSpec.model_validate(doc).model_dump_json())


def test_agent_validator_does_not_mutate_the_models_view():
    doc = copy.deepcopy(FULL)
    filled = agent.validate_spec(copy.deepcopy(doc))
    assert ProgramSpec.model_validate(filled).model_dump() == filled


# hypothesis: small documents mixing valid and invalid values per field

_any_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 600), st.floats(-2, 2, allow_nan=False),
    st.sampled_from(["", "x", "1", "https://h/", "YQ==", "k" * 32]),
)
_OMIT = object()


def _field(*valid):
    return st.one_of(st.just(_OMIT), st.sampled_from(valid), _any_scalar)


_program = st.fixed_dictionaries({
    "argv": st.one_of(
        st.lists(st.sampled_from(["echo", "", "-n", "x y"]), max_size=3),
        _any_scalar, st.lists(_any_scalar, max_size=2), st.just(_OMIT)),
    "cwd": _field("/tmp", None),
    "env": st.one_of(st.just(_OMIT), st.dictionaries(
        st.sampled_from(["A", "B_2", "", "C=D"]), st.one_of(st.none(), st.text(max_size=3), st.integers()),
        max_size=3), _any_scalar),
    "env_inherit": st.one_of(_field(True, False), st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3)),
    "stdin": st.one_of(_field(None), st.fixed_dictionaries({}, optional={
        "path": st.one_of(st.just("/dev/null"), _any_scalar),
        "data": st.one_of(st.sampled_from(["", "YQ==", "YWJj", "YQ", "!!", "aGk=\n"]), _any_scalar),
        "mode": st.just("r"),
    })),
    "umask": _field(0, 18, 511, 512, -1, 18.0),
    "shell": st.just(_OMIT) | st.just(_OMIT) | st.just(True),
})
_callback = st.one_of(st.just(_OMIT), st.none(), _any_scalar, st.fixed_dictionaries({}, optional={
    "url": st.one_of(st.sampled_from(["https://h:1/", "http://h/", "ftp://x"]), _any_scalar),
    "token": st.one_of(st.sampled_from(["k" * 32, "k" * 31, "k" * 64]), _any_scalar),
    "cert": st.one_of(st.just(CERT), _any_scalar),
    "heartbeat": _field(30.0, 1, 0, -1),
    "extra": st.just(1),
}))
_config = st.one_of(st.just(_OMIT), _any_scalar, st.fixed_dictionaries({}, optional={
    "timeout": _field(None, 1, 0.5, 0, -1),
    "output_buffer": _field(1, 1024, 0, 1.5),
    "output_latency": _field(0, 0.2, -1),
    "retry_frequency": _field(10.0, 0, 3),
    "kill_grace": _field(0, 10.0, -0.5),
    "callback_timeout": _field(1, 0, 1e9),
    "capture": _field("file", "pipe", "FILE", "pty"),
    "bogus": st.just(1),
}))
_spec_doc = st.fixed_dictionaries({
    "version": _field(1, 2, "1", 1.0, True),
    "id": st.one_of(st.sampled_from(["r", "run-1", "a..b", "a/b", ".x", "a" * 128, "a" * 129, "A.b_c-9"]),
                    _any_scalar, st.just(_OMIT)),
    "program": st.one_of(_program, _any_scalar, st.just(_OMIT)),
    "callback": _callback,
    "config": _config,
    "extra": st.just(_OMIT) | st.just(_OMIT) | st.just(_OMIT) | st.just(1),
})


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not _OMIT}
    return value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spec_doc.map(_strip))
def test_validators_agree_hypothesis(doc):
    agent_ok, agent_doc = agent_verdict(doc)
    model_ok, model_doc = model_verdict(doc)
    assert agent_ok == model_ok, (doc, agent_doc, model_doc)
    if agent_ok:
        assert agent_doc == model_doc


# --- StreamDecoder ---------------------------------------------------------------


def _frame(kind, offset, data):
    return FRAME.pack(kind, offset, len(data)) + data


def _stream_and_events():
    state = {"id": "x", "state": "running"}
    final = {"id": "x", "state": "done"}
    body = [
        (_frame(b"1", 0, b"hello "), OutputChunk("stdout", 0, b"hello ")),
        (_frame(b"2", 0, b""), OutputChunk("stderr", 0, b"")),
        (_frame(b"S", 0, json.dumps(state).encode()), StateUpdate(state)),
        (_frame(b"1", 6, b"world\n" * 50), OutputChunk("stdout", 6, b"world\n" * 50)),
        (_frame(b"2", 0, bytes(range(256))), OutputChunk("stderr", 0, bytes(range(256)))),
        (_frame(b"S", 0, json.dumps(final).encode()), StateUpdate(final)),
        (_frame(b"E", 0, b""), End()),
    ]
    first = json.dumps(state, sort_keys=True).encode() + b"\n"
    stream = first + b"".join(b for b, _ in body)
    return stream, [StateUpdate(state)] + [e for _, e in body]


_noise = st.lists(st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"\n", MARKER.encode()[:5], b"\n" + MARKER.encode()[:-1], MARKER.encode() + b" ",
                     b"\n" + MARKER.encode()[1:] + b"\n", b"Last login: Mon\n", b"\r\n"]),
), max_size=6).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(noise=_noise, cuts=st.lists(st.integers(0, 1000), max_size=12))
def test_stream_decoder_any_split(noise, cuts):
    needle = b"\n" + MARKER.encode() + b"\n"
    assume((noise + needle).find(needle) == len(noise))  # the noise does not form the marker
    stream, expected = _stream_and_events()
    raw = noise + needle + stream
    dec = StreamDecoder(MARKER, json_line=True, framed=True)
    events = []
    points = sorted({c % (len(raw) + 1) for c in cuts})
    for a, b in zip([0] + points, points + [len(raw)]):
        events += dec.feed(raw[a:b])
    assert events == expected
    assert dec.ended and dec.noise == len(noise)
    assert dec.feed(b"") == []


def test_bytes_that_are_not_the_agents_are_caught_among_its_frames():
    """A line written into the agent's reply by something else (a job the
    login scripts left running), at each place after the marker's JSON
    line, between two frames or in the middle of one: caught
    (:class:`ForeignBytes`) at the next frame header at the latest, and a
    stream's data is given out only once the header after it checked out:
    every event given out is one of the agent's, as sent, in order."""
    from chaperone.errors import ForeignBytes

    needle = b"\n" + MARKER.encode() + b"\n"
    stream, expected = _stream_and_events()
    first = stream.index(b"\n") + 1
    for noise in (b"late noise\n", b"S", b"\x00" * 13, b"\r\n", b"pyenv: cannot rehash: /root/.pyenv/shims isn't writable\n"):
        for at in range(first, len(stream)):
            raw = needle + stream[:at] + noise + stream[at:]
            for step in (1, 7, len(raw)):
                dec = StreamDecoder(MARKER, json_line=True, framed=True)
                events = []
                try:
                    for i in range(0, len(raw), step):
                        events += dec.feed(raw[i:i + step])
                except ForeignBytes:
                    caught = True
                else:
                    caught = False
                assert events == expected[:len(events)], (noise, at, step)
                # (zeros in the end frame's header of zeros: the same bytes, the same events)
                assert caught or not dec.ended or events == expected, (noise, at, step)


def test_a_streams_data_is_given_out_when_the_next_header_or_the_seal_comes():
    """The agent seals its output frames before it goes idle (a ``.``
    frame): a live run's output is given out at once, not held until
    more comes."""
    needle = b"\n" + MARKER.encode() + b"\n"
    dec = StreamDecoder(MARKER, json_line=False, framed=True)
    assert dec.feed(needle + _frame(b"1", 0, b"first line\n")) == []  # (held: the header after it is not there)
    assert dec.feed(_frame(b".", 0, b"")) == [OutputChunk("stdout", 0, b"first line\n")]
    assert dec.feed(_frame(b"2", 0, b"e") + _frame(b"1", 11, b"x")) == [OutputChunk("stderr", 0, b"e")]
    assert dec.feed(_frame(b"E", 0, b"")) == [OutputChunk("stdout", 11, b"x"), End()]


@settings(max_examples=200, deadline=None)
@given(noise=_noise, payload=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_after_marker_any_split(noise, payload, cuts):
    """The one place the clients skip a login script's output (output,
    output --stream both, stdin, the decoder): the payload exactly, and
    the noise counted, however the bytes arrive."""
    needle = b"\n" + MARKER.encode() + b"\n"
    assume((noise + needle).find(needle) == len(noise))
    raw = noise + needle + payload
    after = AfterMarker(MARKER)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    got = b"".join(after.feed(raw[a:b]) for a, b in zip([0] + points, points + [len(raw)]))
    assert after.found and got == payload and after.noise == len(noise)
    assert AfterMarker(MARKER).feed(noise) == b"" and not AfterMarker(MARKER).found


def test_stream_decoder_byte_at_a_time_with_banner():
    stream, expected = _stream_and_events()
    banner = b"Welcome!\n" + MARKER.encode()[:10] + b"\n\n" + MARKER.encode() + b"x\n"
    raw = banner + b"\n" + MARKER.encode() + b"\n" + stream
    dec = StreamDecoder(MARKER, json_line=True, framed=True)
    events = [e for i in range(len(raw)) for e in dec.feed(raw[i:i + 1])]
    assert events == expected and dec.noise == len(banner)


def test_stream_decoder_errors():
    dec = StreamDecoder("M", json_line=False, framed=True)
    with pytest.raises(ProtocolError):
        dec.feed(b"\nM\n" + _frame(b"Z", 0, b""))
    with pytest.raises(ProtocolError):
        StreamDecoder("M").feed(b"\nM\n{oops\n")
    with pytest.raises(ProtocolError):
        payload_after_marker(b"no marker here", "M")
    assert FRAME.size == 13 and FRAME.format in ("!cQI", b"!cQI")
    assert struct.calcsize("!cQI") == 13


# --- the doc ---------------------------------------------------------------------

_SCHEMA_BLOCK = re.compile(r"<!-- schema: (\S+) -->\s*```json\n(.*?)\n```", re.DOTALL)


def test_doc_schemas_are_generated_ones():
    text = DOC.read_text()
    found = {name: json.loads(body) for name, body in _SCHEMA_BLOCK.findall(text)}
    assert len(_SCHEMA_BLOCK.findall(text)) == len(found), "a schema appears twice"
    generated = json_schemas()
    assert set(found) == set(generated)
    for name, schema in generated.items():
        assert found[name] == schema, (
            "docs/protocol.md: the %s schema is stale; regenerate it from "
            "`python -m chaperone.models`" % name)


def test_doc_mentions_every_field():
    text = DOC.read_text()
    schemas = json_schemas()
    prose = text.split("## JSON Schemas")[0]
    fields = set()
    for schema in schemas.values():
        for model in [schema] + list(schema.get("$defs", {}).values()):
            fields.update(model.get("properties", {}))
    missing = sorted(f for f in fields if "`%s`" % f not in prose and not f.startswith("ru_"))
    assert not missing, "docs/protocol.md does not describe: %s" % missing


def test_output_ack_and_constants():
    assert OutputAck.model_validate({"offset": 5}).offset == 5
    with pytest.raises(ValidationError):
        OutputAck.model_validate({"offset": -1})
    assert tuple(agent.FINAL_STATES) == tuple(AGENT_FINAL_STATES)
    assert set(AGENT_FINAL_STATES) <= set(FINAL_STATES) and set(STATES) == set(AGENT_STATES) | set(RECORD_STATES)
    assert tuple(agent.STREAMS) == tuple(STREAMS)
    assert agent.PROTOCOL_VERSION == PROTOCOL_VERSION
    # (the agent checks ids without `re`; tests/agent/test_agent_lean.py proves
    # its check_id is this pattern in full, without '..')
    assert agent.RUN_ID_PATTERN == RUN_ID_PATTERN
    assert tuple(agent.RUSAGE_FIELDS) == tuple(RUSAGE_FIELDS) == tuple(Rusage.model_fields)
    assert agent.CONFIG_DEFAULTS == Config().model_dump()
    base = agent.Supervisor(agent.Run("/nonexistent", "x"), {"config": {}}, None).base_state()
    assert set(base) == set(RunState.model_fields)
    RunState.model_validate(base)


# --- bugs found while writing these tests, now fixed ---


def test_id_with_trailing_newline_is_refused():
    doc = with_("id", "run-1\n")
    assert not agent_verdict(doc)[0]
    assert not model_verdict(doc)[0]


def test_nul_in_argv_is_refused_or_an_error_state(tmp_path):
    doc = spec("nul", ["echo", "a\u0000b"])
    if not agent_verdict(doc)[0]:
        return  # refused up front (exit 2): fine
    st_ = start(tmp_path / "spool", doc)
    assert st_.state == "error"
