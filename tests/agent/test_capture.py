"""Output capture (``config.capture``): the program's stdout and stderr are
the spool files themselves (``"file"``, the default) or pipes the supervisor
splices into them (``"pipe"``).

Real processes; each test has its own spool root.  The exactly-once rules:
``stdout_bytes``/``stderr_bytes`` are the spool files' sizes when the
program ended, and nothing (``follow``, ``output``, the HTTPS callbacks)
ever delivers past them, even when children left behind go on writing.
"""

import asyncio
import hashlib
import json
import os
import select
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from chaperone.protocol import End, OutputChunk, StateUpdate, StreamDecoder
from support.helpers import (
    agent, agent_cmd, agent_start, kill_marked, main_thread_wakeups, marker_number, pid_alive, procs_with, program,
    read_state, run_async, unique, wait_for, wait_no_procs, wait_state,
)

PY = sys.executable
MARKER = "CHAPERONE-capture-test"
CAPTURES = ("file", "pipe")


@pytest.fixture
def root(tmp_path):
    # (a name of its own: pytest removes a passed test's tmp_path at once and
    # may give the next test the same path, while a supervisor of the last
    # run may still be writing its end there)
    return tmp_path / ("spool-" + uuid.uuid4().hex[:8])


def run_seconds(st):
    import datetime

    start = datetime.datetime.fromisoformat(st["start_time"])
    return (datetime.datetime.fromisoformat(st["end_time"]) - start).total_seconds()


def decode_follow(raw):
    """A follow stream (with --marker MARKER): (stdout, stderr, states)."""
    events = StreamDecoder(MARKER, json_line=False, framed=True).feed(raw)
    got = {"stdout": bytearray(), "stderr": bytearray()}
    states = []
    assert events and isinstance(events[-1], End), events[-3:]
    for ev in events[:-1]:
        if isinstance(ev, OutputChunk):
            assert ev.offset == len(got[ev.stream]), "a gap or an overlap in %s" % ev.stream
            got[ev.stream] += ev.data
        else:
            assert isinstance(ev, StateUpdate)
            states.append(ev.state)
    return bytes(got["stdout"]), bytes(got["stderr"]), states


def follow_popen(root, run_id):
    return subprocess.Popen(agent_cmd(root, "--marker", MARKER, "follow", run_id),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_supervisor_gone(st, timeout=15):
    wait_for(lambda: not pid_alive(st["agent_pid"]), timeout, what="the supervisor to exit")


def assert_writes_the_spool_itself(root, run_id, pid):
    """The running program's fds 1 and 2 are the run's spool files."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        held = os.stat("/proc/%d/fd/%d" % (pid, fd))
        spool = os.stat(str(root / run_id / name))
        assert (held.st_dev, held.st_ino) == (spool.st_dev, spool.st_ino), name


# --- what the program is given ------------------------------------------------------

#: Writes, to the file named by argv[1], what fds 1 and 2 are; then 3 + 4 bytes.
DESCRIBE_FDS = (
    "import fcntl, json, os, stat, sys\n"
    "out = {}\n"
    "for fd in (1, 2):\n"
    "    st = os.fstat(fd)\n"
    "    out[fd] = [stat.S_ISREG(st.st_mode), stat.S_ISFIFO(st.st_mode), st.st_dev, st.st_ino,\n"
    "               bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)]\n"
    "open(sys.argv[1], 'w').write(json.dumps(out))\n"
    "os.write(1, b'out'); os.write(2, b'errr')\n"
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("capture", CAPTURES)
def test_stdout_and_stderr_are_the_spool_files_or_pipes(root, tmp_path, capture):
    report = tmp_path / "fds.json"
    config = {} if capture == "file" else {"capture": "pipe"}  # file: the default
    agent_start(root, program("fds", [PY, "-c", DESCRIBE_FDS, str(report)], config=config))
    st = wait_state(root, "fds")
    assert st["state"] == "done" and st["return_code"] == 0
    fds = json.loads(report.read_text())
    for fd, name in (("1", "stdout"), ("2", "stderr")):
        is_reg, is_fifo, dev, ino, append = fds[fd]
        spool = os.stat(str(root / "fds" / name))
        if capture == "file":
            # the spool file itself, as after `cmd > file` (O_WRONLY, no
            # O_APPEND): the supervisor moves no bytes
            assert is_reg and not is_fifo and not append, fds
            assert (dev, ino) == (spool.st_dev, spool.st_ino), name
        else:
            assert is_fifo and not is_reg, fds
    assert (root / "fds" / "stdout").read_bytes() == b"out"
    assert (root / "fds" / "stderr").read_bytes() == b"errr"
    assert (st["stdout_bytes"], st["stderr_bytes"]) == (3, 4)
    stored = json.loads((root / "fds" / "program.json").read_text())
    assert stored["config"]["capture"] == capture


@pytest.mark.timeout(30)
@pytest.mark.parametrize("capture", CAPTURES)
def test_reopening_dev_stdout_truncates_the_spool_file_only_with_file_capture(root, capture):
    """`echo x > /dev/stdout` opens the program's stdout again, with O_TRUNC:
    with file capture that truncates the spool file, as it would truncate
    `file` after `sh script > file` (the shell's own fd keeps its offset,
    so its next write leaves zeros in between); with a pipe nothing is
    lost.  Either way the counts are the file's size and a follow ends."""
    script = "printf 0123456789; echo x > /dev/stdout; echo y"
    agent_start(root, program("trunc", ["sh", "-c", script], config={"capture": capture}))
    st = wait_state(root, "trunc")
    want = b"x\n" + b"\0" * 8 + b"y\n" if capture == "file" else b"0123456789x\ny\n"
    assert (root / "trunc" / "stdout").read_bytes() == want
    assert st["stdout_bytes"] == len(want)
    res = agent(root, "--marker", MARKER, "follow", "trunc", timeout=20)
    assert res.returncode == 0 and decode_follow(res.stdout)[0] == want


@pytest.mark.timeout(30)
def test_file_capture_counts_are_the_file_sizes_while_running_and_at_the_end(root):
    script = ("import os, time\n"
              "os.write(1, b'a' * 1000); os.write(2, b'b' * 10)\n"
              "time.sleep(1.5)\n"
              "os.write(1, b'c' * 234)\n")
    first = agent_start(root, program("sizes", [PY, "-c", script]))
    assert first["state"] == "running"
    assert_writes_the_spool_itself(root, "sizes", first["pid"])
    # status: the current sizes, by fstat; the supervisor copies nothing
    st = wait_for(lambda: (lambda s: s if s["stdout_bytes"] == 1000 else None)(
        json.loads(agent(root, "status", "sizes").stdout.decode())), 5, what="1000 bytes")
    assert st["state"] == "running" and st["stderr_bytes"] == 10
    final = wait_state(root, "sizes")
    assert (final["stdout_bytes"], final["stderr_bytes"]) == (1234, 10)
    assert os.path.getsize(str(root / "sizes" / "stdout")) == 1234
    assert read_state(root, "sizes") == final


@pytest.mark.timeout(30)
@pytest.mark.parametrize("capture", CAPTURES)
def test_output_of_children_left_behind_counts_until_they_let_go(root, capture):
    """Both modes alike: a child still writing shortly after the program
    exited is part of the run (the supervisor waits for it, up to 1 s);
    with nothing left behind the end is recorded at once."""
    config = {"capture": capture}
    agent_start(root, program("late", ["sh", "-c", "(sleep 0.4; printf late; printf LATE >&2) & printf early"],
                              config=config))
    agent_start(root, program("alone", ["sh", "-c", "printf alone"], config=config))
    st = wait_state(root, "late")
    assert (root / "late" / "stdout").read_bytes() == b"earlylate"
    assert (root / "late" / "stderr").read_bytes() == b"LATE"
    assert (st["stdout_bytes"], st["stderr_bytes"]) == (9, 4)
    assert 0.35 <= run_seconds(st) < 1.0, run_seconds(st)  # it let go at 0.4 s: no wait for the full 1 s
    st = wait_state(root, "alone")
    assert st["stdout_bytes"] == 5
    assert run_seconds(st) < 0.5, run_seconds(st)


@pytest.mark.timeout(60)
def test_file_capture_writes_after_the_end_are_never_delivered(root):
    """A child left behind writes all the time, before and after the end.
    The final counts are the sizes when the supervisor recorded the end;
    the file grows past them; yet every follower that watched the run live,
    a follow after the end and `output` give exactly the recorded bytes,
    and no follower ever saw a running size beyond the final count."""
    m = unique("cap")
    # ("early" first: a writer started before it could come first in the file.)
    script = "printf early; (while :; do printf x; done) &"
    try:
        agent_start(root, program("grow", ["sh", "-c", script, m]))
        followers = [follow_popen(root, "grow") for _ in range(6)]
        st = wait_state(root, "grow")
        assert st["state"] == "done" and st["return_code"] == 0
        n = st["stdout_bytes"]
        assert n > 5
        assert 0.9 <= run_seconds(st) < 3, run_seconds(st)  # waited LINGER for the writer
        spool = root / "grow" / "stdout"
        wait_for(lambda: os.path.getsize(str(spool)) > n + 1000, 10, what="writes after the end")
        assert procs_with(m), "the leftover writer is not killed"
        want = spool.read_bytes()[:n]
        assert want.startswith(b"early") and want[5:] == b"x" * (n - 5)
        for f in followers:
            out, err = f.communicate(timeout=30)
            assert f.returncode == 0, err
            stdout, stderr, states = decode_follow(out)
            assert stdout == want and stderr == b""
            assert states[-1]["state"] == "done" and states[-1]["stdout_bytes"] == n
            for s in states[:-1]:
                assert s["state"] == "running" and s["stdout_bytes"] <= n
        res = agent(root, "output", "grow", "--stream", "stdout")
        assert res.returncode == 0 and res.stdout == want
        res = agent(root, "output", "grow", "--stream", "stdout", "--offset", str(n - 3), "--length", "100")
        assert res.stdout == want[-3:]
        res = agent(root, "output", "grow", "--stream", "stdout", "--offset", str(n + 10))
        assert res.returncode == 0 and res.stdout == b""
        res = agent(root, "--marker", MARKER, "follow", "grow")
        assert res.returncode == 0
        assert decode_follow(res.stdout)[0] == want
        res = agent(root, "--marker", MARKER, "follow", "grow", "--stdout-offset", str(n))
        stdout, _, states = decode_follow(res.stdout)
        assert stdout == b"" and states[-1]["stdout_bytes"] == n
        assert json.loads(agent(root, "status", "grow").stdout.decode())["stdout_bytes"] == n
    finally:
        kill_marked(m)


def run_lock(root, run_id, kind):
    import fcntl

    fd = os.open(str(root / run_id), os.O_RDONLY)
    fcntl.flock(fd, kind)
    return fd


@pytest.mark.timeout(30)
def test_the_end_is_recorded_under_the_runs_lock(root):
    """The supervisor writes the final state (and takes the final sizes)
    only under the run's exclusive lock: while a reader holds it shared
    (between its look at the sizes and at state.json), the end waits."""
    import fcntl

    first = agent_start(root, program("locked", ["sh", "-c", "printf abc; sleep 0.3"]))
    fd = run_lock(root, "locked", fcntl.LOCK_SH)
    try:
        wait_for(lambda: not pid_alive(first["pid"]), 5, what="the program to exit")
        time.sleep(1.0)
        assert read_state(root, "locked")["state"] == "running"
    finally:
        os.close(fd)
    st = wait_state(root, "locked", timeout=5)
    assert st["state"] == "done" and st["stdout_bytes"] == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["status", "follow", "output"])
def test_readers_look_at_a_running_runs_sizes_under_its_lock(root, command):
    """status, follow and output take the run's lock (shared) around their
    look at a running run's sizes: while the end is being recorded
    (exclusive) they wait, so they never see a size the final state does
    not cover."""
    import fcntl

    m = marker_number()
    try:
        agent_start(root, program("held", ["sh", "-c", "printf abc; sleep %s" % m]))
        args = {"status": ["status", "held"], "follow": ["follow", "held"],
                "output": ["output", "held", "--stream", "stdout"]}[command]
        fd = run_lock(root, "held", fcntl.LOCK_EX)
        try:
            proc = subprocess.Popen(agent_cmd(root, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(1.0)
            # waiting for the lock: not a byte out yet (a follow would have
            # sent "abc" and the state at once)
            assert proc.poll() is None, "ended at once: %r; state.json: %s" % (
                proc.communicate(), (root / "held" / "state.json").read_text())
            assert not select.select([proc.stdout], [], [], 0)[0]
        finally:
            os.close(fd)
        if command == "follow":
            assert agent(root, "signal", "held", "KILL").returncode == 0
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        if command == "status":
            assert json.loads(out.decode())["stdout_bytes"] == 3
        elif command == "output":
            assert out == b"abc"
    finally:
        kill_marked(m)


@pytest.mark.timeout(30)
def test_a_spool_file_truncated_after_the_end_does_not_hang_follow(root):
    """A child left behind that reopens /dev/stdout after the end truncates
    the spool file below the final count (file capture): those bytes are
    gone; follow and output give what is left and end."""
    m = unique("tr")
    try:
        agent_start(root, program("shrunk", ["sh", "-c", "(sleep 1.5; echo x > /dev/stdout) & printf abcdefgh", m]))
        st = wait_state(root, "shrunk")
        assert st["stdout_bytes"] == 8
        wait_no_procs(m, timeout=10)
        assert (root / "shrunk" / "stdout").read_bytes() == b"x\n"
        res = agent(root, "--marker", MARKER, "follow", "shrunk", timeout=20)
        assert res.returncode == 0
        stdout, _, states = decode_follow(res.stdout)
        assert stdout == b"x\n" and states[-1]["stdout_bytes"] == 8
        assert agent(root, "output", "shrunk", "--stream", "stdout").stdout == b"x\n"
    finally:
        kill_marked(m)


@pytest.mark.timeout(30)
def test_pipe_capture_cuts_off_children_left_behind(root):
    """Pipe capture, as before: after the program exited the supervisor
    reads the pipes for 1 s, then closes them; a child that writes later
    gets SIGPIPE and its bytes go nowhere."""
    m = unique("cut")
    try:
        agent_start(root, program("cut", ["sh", "-c", "(sleep 1.6; printf late) & printf early", m],
                                  config={"capture": "pipe"}))
        st = wait_state(root, "cut")
        assert st["stdout_bytes"] == 5
        assert 0.9 <= run_seconds(st) < 1.6, run_seconds(st)
        wait_no_procs(m, timeout=10)  # it wrote, and SIGPIPE ended it
        assert (root / "cut" / "stdout").read_bytes() == b"early"
    finally:
        kill_marked(m)


@pytest.mark.timeout(90)
def test_pipe_capture_200mb_exact_and_supervisor_memory_flat(root):
    """The supervisor splices through a fixed buffer: its memory stays flat
    whatever the program writes."""
    gen = ("import hashlib, os\n"
           "h = hashlib.sha256(); block = os.urandom(1 << 20)\n"
           "for i in range(200):\n"
           "    b = block[i:] + block[:i]; h.update(b); os.write(1, b)\n"
           "os.write(2, h.hexdigest().encode())\n")
    agent_start(root, program("bigpipe", [PY, "-c", gen], config={"capture": "pipe"}))
    sup = psutil.Process(read_state(root, "bigpipe")["agent_pid"])
    peak = 0
    while read_state(root, "bigpipe")["state"] == "running":
        try:
            peak = max(peak, sup.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    st = wait_state(root, "bigpipe")
    assert st["state"] == "done" and st["return_code"] == 0
    assert st["stdout_bytes"] == 200 << 20
    h = hashlib.sha256()
    with open(str(root / "bigpipe" / "stdout"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == (root / "bigpipe" / "stderr").read_text()
    assert 0 < peak < 40 << 20, peak


# --- the supervisor's cost -----------------------------------------------------------


@pytest.mark.timeout(30)
def test_file_capture_without_callback_the_supervisor_sleeps(root):
    """While the program writes nothing, the supervisor sleeps: an inotify
    watch of the spool files wakes it at a write (without one it looks at
    their sizes once a second, 10 ms after the output grew, then twice as
    late each time: tests/cli/test_logs.py's test_file_capture_without_inotify...),
    at no measurable CPU cost."""
    m = marker_number()
    try:
        st = agent_start(root, program("idle", ["sh", "-c", "printf x; sleep %s" % m]))
        pid = st["agent_pid"]
        assert_writes_the_spool_itself(root, "idle", st["pid"])
        time.sleep(1.5)
        before, cpu = main_thread_wakeups(pid), sum(psutil.Process(pid).cpu_times()[:2])
        time.sleep(3)
        assert main_thread_wakeups(pid) - before <= 4  # (one a second)
        assert sum(psutil.Process(pid).cpu_times()[:2]) - cpu <= 0.02
        assert agent(root, "signal", "idle", "KILL").returncode == 0
        assert wait_state(root, "idle")["stdout_bytes"] == 1
    finally:
        kill_marked(m)


# --- callbacks ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_file_capture_callbacks_notice_growth_back_off_and_stop_at_the_final_counts(tmp_path):
    """With a callback, the supervisor watches the files' sizes itself:
    output reaches the scheduler while the program runs; while nothing
    changes it does not wake (an inotify watch of the spool files wakes it
    at a write; without one it looks about once a second, see
    tests/cli/test_logs.py's test_file_capture_without_inotify...); and a child left behind that
    writes after the end never gets a byte past the final counts to the
    scheduler."""
    from chaperone.api import Chaperone
    from chaperone.push.endpoint import CallbackServer
    from chaperone.push.mirror import OutputMirror

    m = unique("cb")
    root = tmp_path / "home" / "spool"
    # early output; 3.5 s of silence; then a writer left behind, writing
    # before and after the end
    script = ("printf early; printf E >&2; sleep 3.5; "
              "printf late; (while :; do printf x; done) &")
    seen = {}

    async def main():
        server = CallbackServer()
        await server.start(cert_dir=tmp_path / "tls")
        states = []
        try:
            mirror = OutputMirror(tmp_path / "mirror")
            token = server.register("cb-1", mirror, on_state=lambda rid, st, final: states.append((st, final)))
            async with Chaperone(tmp_path / "home") as ch:
                run = await ch.start(
                    "local", ["sh", "-c", script, m], run_id="cb-1",
                    callback={"url": server.url, "token": token, "cert": server.cert_pem},
                    config={"output_latency": 0.05, "retry_frequency": 0.2})
                pid = run.state.agent_pid
                t0 = time.monotonic()
                while mirror.held("stdout") < 5 or mirror.held("stderr") < 1:
                    assert time.monotonic() - t0 < 2, "output did not arrive while the program ran"
                    await asyncio.sleep(0.02)
                seen["live"] = read_state(root, "cb-1")["state"]
                await asyncio.sleep(1.3)  # (without inotify: the interval backs off to 1 s)
                before = main_thread_wakeups(pid)
                await asyncio.sleep(1.5)
                seen["wakeups"] = main_thread_wakeups(pid) - before
                await ch.wait(run.id)
            for _ in range(200):
                if states and states[-1][1]:
                    break
                await asyncio.sleep(0.05)
            return mirror
        finally:
            await server.stop()

    try:
        mirror = run_async(main())
        assert seen["live"] == "running"
        assert seen["wakeups"] <= 2, seen  # not every 10 ms, nor once a second: no timer for the sizes
        st = read_state(root, "cb-1")
        assert st["state"] == "done"
        n = st["stdout_bytes"]
        spool = root / "cb-1" / "stdout"
        wait_for(lambda: os.path.getsize(str(spool)) > n + 1000, 10, what="writes after the end")
        wait_supervisor_gone(st)
        assert mirror.held("stdout") == n and mirror.held("stderr") == st["stderr_bytes"] == 1
        assert mirror.read("stdout", 0, n + 100000) == spool.read_bytes()[:n]
        assert mirror.read("stdout", 0, 100).startswith(b"earlylate")
    finally:
        kill_marked(m)
