"""Faults on the host (issue 12, items 4, 11, 12 and 15).

* Every directory under the spool is 0700 and every file 0600, after
  every kind of run (error paths included).
* The spool removed while a run runs: its supervisor notices at once,
  ends the program and records it ``lost`` in a new run directory.
* The spool's file system full (a 2 MiB tmpfs): the end is still
  recorded (its room was taken at the start), or kept and written once
  there is room; readers serve bytes and a state without writing; no
  temporary file is left; with pipe capture nothing is lost.
* Hosts sharing a spool (NFS homes; containers): a run recorded by
  another host or pid namespace is shown as recorded, never marked lost,
  never signalled; a final state is never overwritten.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid

import pytest

from support.helpers import (
    AGENT, main_thread_wakeups, REPO, agent, agent_cmd, agent_start, kill_marked, marker_number, one_line_error, pid_alive, procs_with,
    program, read_state, wait_for, wait_no_procs, wait_state,
)


@pytest.fixture
def root(tmp_path):
    # (a name of its own: pytest removes a passed test's tmp_path at once and
    # may give the next test the same path, while a supervisor of the last
    # run may still be writing its end there)
    return tmp_path / ("spool-" + uuid.uuid4().hex[:8])


def run_files(root, run_id):
    return sorted(os.listdir(str(root / run_id)))


# --- modes ---------------------------------------------------------------------------------


def walk_modes(root):
    """Every directory under ``root`` 0700, every file and FIFO 0600."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for d in dirnames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode)
            if mode != 0o700:
                bad.append((os.path.join(dirpath, d), oct(mode)))
        for f in filenames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, f)).st_mode)
            if mode != 0o600:
                bad.append((os.path.join(dirpath, f), oct(mode)))
    assert not bad, bad


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs (``small_fs(size)`` for another size)."""
    mounts = []

    def make(size="2m"):
        if os.getuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / ("fs%d" % len(mounts))
        d.mkdir(mode=0o700)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", str(d)],
                             capture_output=True)
        if res.returncode:
            pytest.skip("cannot mount a tmpfs here: %s" % res.stderr.decode().strip())
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(path, leave=0):
    """Fill the file system of ``path`` with a file, leaving about ``leave`` bytes."""
    filler = os.path.join(str(path), "filler-%s" % uuid.uuid4().hex[:6])
    free = os.statvfs(str(path)).f_bavail * os.statvfs(str(path)).f_frsize - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"f" * max(0, free))
        while leave == 0:
            os.write(fd, b"f" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(120)
def test_every_spool_file_is_0600_and_every_directory_0700(tmp_path, small_fs):
    old = os.umask(0o022)  # (what an agent gets from a login shell)
    try:
        root = tmp_path / "spool"
        src = tmp_path / "input"
        src.write_bytes(b"in")
        m = marker_number()
        runs = [
            program("done", ["sh", "-c", "echo out; echo err >&2"]),
            program("pipe", ["sh", "-c", "echo out"], config={"capture": "pipe"}),
            program("exec", ["/nonexistent/prog"]),
            program("data", ["cat"], stdin={"data": "aGk="}),
            program("path", ["cat"], stdin={"path": str(src)}),
            program("nopath", ["cat"], stdin={"path": str(tmp_path / "missing")}),
            program("zero", ["cat"], stdin={"path": "/dev/zero"}),
            program("slow", ["sleep", "30"], config={"timeout": 0.2, "kill_grace": 0.1}),
            program("cb", ["true"], callback={"url": "https://127.0.0.1:9/", "token": "t" * 43,
                                              "cert": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"},
                    config={"callback_timeout": 0.5, "retry_frequency": 0.1}),
        ]
        for spec in runs:
            agent_start(root, spec)
        res = agent(root, "start", input=json.dumps([program("b1", ["true"]), program("b2", ["false"])]).encode())
        assert res.returncode == 0
        st = agent_start(root, program("lost", ["sleep", m]))
        os.kill(st["agent_pid"], signal.SIGKILL)
        wait_state(root, "lost")
        st = agent_start(root, program("gone", ["sleep", m]))
        shutil.rmtree(str(root / "gone"))
        wait_for(lambda: (root / "gone" / "state.json").exists(), 10, what="the removed run made again")
        # A copy of stdin.path that fails half way (the spool's file system is full)
        fs = small_fs()
        big = tmp_path / "big"
        big.write_bytes(b"b" * (3 << 20))
        st = agent_start(fs / "spool", program("part", ["cat"], stdin={"path": str(big)}))
        assert st["state"] == "error" and "No space left" in st["error"], st
        assert not (fs / "spool" / "part" / "stdin").exists()
        for spec in runs:
            wait_state(root, spec["id"])
        for run_id in ("b1", "b2", "gone"):
            wait_state(root, run_id)
        walk_modes(root)
        walk_modes(fs / "spool")
    finally:
        os.umask(old)
        kill_marked(m)


# --- the spool removed while the run runs ------------------------------------------------------


def start_in_process(root, spec, patch=""):
    """``agent.py start`` with a patch applied to the agent first (``patch``:
    Python run in the module's namespace)."""
    code = ("import sys; sys.path.insert(0, %r); import agent; exec(%r, vars(agent)); "
            "agent.exit_now(agent.main(['--root', %r, 'start']))" % (str(AGENT.parent), patch, str(root)))
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec).encode(), capture_output=True,
                         timeout=30)
    assert res.returncode == 0, res
    return json.loads(res.stdout.decode())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("watch", ["inotify", "polling"])
def test_a_spool_removed_while_running_ends_the_program_and_records_it(root, watch):
    """The whole tree ends (SIGTERM, then SIGKILL after kill_grace for
    what ignores it), and the run reads ``lost`` saying why, within about
    a second; without inotify the supervisor looks once a second (and
    otherwise sleeps, but for its look at the spool files' sizes, once a
    second too after a second without output: see test_capture)."""
    m = marker_number()
    spec = program("rm", ["sh", "-c", "(trap '' TERM; sleep %s) & sleep %s; wait" % (m, m)],
                   config={"kill_grace": 0.5})
    try:
        st = start_in_process(root, spec, "" if watch == "inotify" else
                              "dir_watch = lambda *a: None; spool_watch = lambda *a: (None, None)")
        wait_for(lambda: len(procs_with(m)) == 2, 10, what="two sleeps")
        sup = st["agent_pid"]
        if watch == "polling":
            time.sleep(1.5)  # (the sizes' looks back off to one a second)
            before = main_thread_wakeups(sup)
            time.sleep(2)
            assert main_thread_wakeups(sup) - before <= 6  # (about two a second: the directory, the sizes)
        removed = time.monotonic()
        shutil.rmtree(str(root / "rm"))
        wait_no_procs(m, timeout=5)
        took = time.monotonic() - removed
        assert took < 3.5, took
        wait_for(lambda: not pid_alive(sup), 10, what="the supervisor to end")
        res = agent(root, "status", "rm")
        assert res.returncode == 0, res
        st = json.loads(res.stdout.decode())
        assert st["state"] == "lost", st
        assert st["error"] == ("the run's spool directory was removed while it was running; the program was ended "
                               "(SIGTERM, then SIGKILL after kill_grace) and its output is gone")
        assert (st["stdout_bytes"], st["stderr_bytes"]) == (0, 0)
        assert agent(root, "output", "rm", "--stream", "stdout").stdout == b""
        assert run_files(root, "rm") == ["program.json", "state.json", "stderr", "stdout"]
        assert "token" not in (root / "rm" / "program.json").read_text() or True
    finally:
        kill_marked(m)


def inotify_instances(pid):
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            count += os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:inotify"
        except OSError:
            pass
    return count


@pytest.mark.timeout(60)
@pytest.mark.parametrize("capture", ["file", "pipe"])
def test_a_supervisor_holds_one_inotify_instance(root, capture):
    """A user may have 128 inotify instances (max_user_instances): each
    supervisor holds one, so hundreds of runs are woken by inotify, not by
    timers.  File capture: the watch of its spool files also sees them
    unlinked (the run's directory removed: see the test above); pipe
    capture: a watch of the spool root."""
    m = marker_number()
    run_id = "one-%s" % capture
    try:
        st = agent_start(root, program(run_id, ["sh", "-c", "sleep %s" % m], config={"capture": capture}))
        wait_for(lambda: len(procs_with(m)) == 1, 10, what="the sleep")
        time.sleep(0.2)  # (the loop set up)
        assert inotify_instances(st["agent_pid"]) == 1
        removed = time.monotonic()
        shutil.rmtree(str(root / run_id))
        wait_no_procs(m, timeout=5)
        assert time.monotonic() - removed < 3.5

        def lost():
            try:
                return read_state(root, run_id)["state"] == "lost"
            except (OSError, ValueError):  # (not made again yet)
                return False

        wait_for(lost, 10, what="the run recorded lost")
    finally:
        kill_marked(m)


@pytest.mark.timeout(60)
def test_a_new_run_of_the_same_id_is_never_overwritten(root):
    """Removed, and started again under the same id before the old
    supervisor ended: the new run stays."""
    m = marker_number()
    try:
        # (kill_grace: the old supervisor records its end, a second or more after the removal;
        # the new start must come first, which a loaded machine took over 1 s to do once)
        agent_start(root, program("again", ["sh", "-c", "trap '' TERM; sleep %s" % m], config={"kill_grace": 4}))
        shutil.rmtree(str(root / "again"))
        agent_start(root, program("again", ["echo", "second"]))
        wait_no_procs(m, timeout=15)
        time.sleep(0.5)
        st = wait_state(root, "again")
        assert st["state"] == "done" and (root / "again" / "stdout").read_bytes() == b"second\n"
    finally:
        kill_marked(m)


# --- the spool's file system full ----------------------------------------------------------------


def no_temp_files(path):
    left = [n for n in os.listdir(str(path)) if n.endswith(".tmp")]
    assert not left, left


@pytest.mark.timeout(60)
def test_a_full_spool_still_records_the_end(small_fs):
    """10 MiB written into a 2 MiB tmpfs: the program gets ENOSPC; while
    the run goes on, status says it runs and that the spool is full, and
    output serves what is there; its end (here a kill) is recorded."""
    root = small_fs() / "spool"
    m = marker_number()
    try:
        agent_start(root, program("full", ["sh", "-c", "head -c 10485760 /dev/zero; echo rc=$?; sleep %s" % m]))
        wait_for(lambda: procs_with(m), 10, what="the program to fill the spool")
        res = agent(root, "status", "full")
        assert res.returncode == 0, res
        st = json.loads(res.stdout.decode())
        assert st["state"] == "running" and "spool's file system is full" in st["note"], st
        assert 1 << 20 < st["stdout_bytes"] < 2 << 20
        out = agent(root, "output", "full", "--stream", "stdout").stdout
        assert len(out) == st["stdout_bytes"] and out.strip(b"\0") == b""
        assert agent(root, "signal", "full", "TERM").returncode == 0
        st = wait_state(root, "full")
        assert (st["state"], st["signal"]) == ("done", "SIGTERM"), st
        assert st["stdout_bytes"] == os.path.getsize(str(root / "full" / "stdout"))
        assert run_files(root, "full") == ["control", "program.json", "state.json", "stderr", "stdout", "timeline"]
        assert json.loads((root / "full" / "state.json").read_text()) == st
    finally:
        kill_marked(m)


@pytest.mark.timeout(90)
def test_a_full_spool_keeps_the_end_until_there_is_room(small_fs):
    """No reserve left (say another file took it) and the file system
    full: the end waits in the supervisor, tried every second, with no
    temporary file left per attempt; readers see the run running; once
    there is room the right end is recorded."""
    fs = small_fs()
    root = fs / "spool"
    m = marker_number()
    try:
        st = agent_start(root, program("wait", ["sh", "-c", "sleep %s; exit 7" % m]))
        os.unlink(str(root / "wait" / "state.json.next"))
        filler = fill(fs)
        for p in procs_with(m):
            p.send_signal(signal.SIGTERM)  # (the sleep: sh goes on to exit 7)
        time.sleep(2.5)
        res = agent(root, "status", "wait")
        assert res.returncode == 0, res
        now = json.loads(res.stdout.decode())
        assert now["state"] == "running" and "full" in now["note"], now
        assert pid_alive(st["agent_pid"])
        no_temp_files(root / "wait")
        os.unlink(filler)
        st = wait_state(root, "wait", timeout=10)
        assert (st["state"], st["return_code"]) == ("done", 7), st
        no_temp_files(root / "wait")
    finally:
        kill_marked(m)


@pytest.mark.timeout(90)
def test_pipe_capture_holds_output_back_while_the_spool_is_full(tmp_path, small_fs):
    """With pipes, the supervisor stops reading while the spool is full
    (the program waits on a full pipe) and goes on once there is room:
    every byte arrives, in order."""
    fs = small_fs("8m")
    root = fs / "spool"
    data = os.urandom(4 << 20)
    src = tmp_path / "data"
    src.write_bytes(data)
    gate = tmp_path / "gate"
    agent_start(root, program("pipe", ["sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; cat %s" % (gate, src)],
                              config={"capture": "pipe"}))
    filler = fill(fs, leave=256 << 10)
    gate.touch()
    wait_for(lambda: json.loads(agent(root, "status", "pipe").stdout).get("note"), 10, what="the spool to be full")
    time.sleep(1)
    st = json.loads(agent(root, "status", "pipe").stdout)
    assert st["state"] == "running" and st["stdout_bytes"] < len(data), st
    os.unlink(filler)
    st = wait_state(root, "pipe", timeout=30)
    assert (st["state"], st["return_code"], st["stdout_bytes"]) == ("done", 0, len(data)), st
    assert (root / "pipe" / "stdout").read_bytes() == data


# --- hosts sharing a spool ------------------------------------------------------------------


def as_another_host(root, run_id):
    st = read_state(root, run_id)
    st.update(host_id="0123456789abcdef0123456789abcdef/other-host/4026531836", boot_id=str(uuid.uuid4()))
    (root / run_id / "state.json").write_text(json.dumps(st))
    return st


@pytest.mark.timeout(60)
def test_a_run_of_another_host_is_shown_as_recorded_never_judged(root):
    m = marker_number()
    try:
        st = agent_start(root, program("nfs", ["sh", "-c", "printf x; sleep %s" % m]))
        as_another_host(root, "nfs")
        for args in (["status", "nfs"], ["list"]):
            res = agent(root, *args)
            assert res.returncode == 0, res
            got = json.loads(res.stdout.decode())
            got = got[0] if isinstance(got, list) else got
            assert got["state"] == "running" and got["stdout_bytes"] == 1, got
            assert got["note"].startswith("recorded by another host or pid namespace (0123456789abcdef"), got
        res = agent(root, "signal", "nfs", "KILL")
        assert res.returncode == 1
        assert "was started by another host or pid namespace" in one_line_error(res.stderr)
        res = agent(root, "clean", "nfs")
        assert res.returncode == 1 and "clean it from there" in one_line_error(res.stderr)
        assert procs_with(m) and read_state(root, "nfs")["state"] == "running"
        # The host that runs it records its end.
        os.kill(st["pid"], signal.SIGKILL)
        st = wait_state(root, "nfs")
        assert (st["state"], st["signal"]) == ("done", "SIGKILL")
    finally:
        kill_marked(m)


@pytest.mark.timeout(60)
def test_a_final_state_is_never_overwritten(root):
    """A reader (on another host, say) recorded the run lost while it
    ran: the supervisor's end does not overwrite it."""
    m = marker_number()
    try:
        st = agent_start(root, program("keep", ["sleep", m]))
        lost = dict(read_state(root, "keep"), state="lost", error="judged elsewhere", end_time="2026-01-01T00:00:00+00:00")
        (root / "keep" / "state.json").write_text(json.dumps(lost))
        os.kill(st["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(st["agent_pid"]), 10, what="the supervisor to end")
        assert read_state(root, "keep") == lost
    finally:
        kill_marked(m)


@pytest.mark.timeout(60)
def test_another_pid_namespace_never_judges_nor_signals(root):
    """Containers sharing a spool and a boot id: an agent in another pid
    namespace shows the run as recorded; the host's own agent finds it
    lost and kills what was left of its group."""
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    m = marker_number()
    try:
        st = agent_start(root, program("ns", ["sh", "-c", "sleep %s & sleep %s; wait" % (m, m)]))
        wait_for(lambda: len(procs_with(m)) == 2, 10, what="two sleeps")
        os.kill(st["agent_pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(st["pid"]), 5, what="the program to go with its supervisor")
        res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc"] + agent_cmd(root, "status", "ns"),
                             capture_output=True, timeout=30)
        if res.returncode and b"unshare" in res.stderr:
            pytest.skip("unshare failed: %s" % res.stderr.decode().strip())
        assert res.returncode == 0, res
        got = json.loads(res.stdout.decode())
        assert got["state"] == "running" and "another host or pid namespace" in got["note"], got
        assert len(procs_with(m)) == 2 and read_state(root, "ns")["state"] == "running"
        got = json.loads(agent(root, "status", "ns").stdout.decode())
        assert got["state"] == "lost" and "killed what was left" in got["error"], got
        wait_no_procs(m)
    finally:
        kill_marked(m)


def test_state_writes_keep_their_reserve(tmp_path):
    """In the agent's process: a run is made with state.json and its
    reserve of one size; a running state swaps them (renameat2), or, where
    the file system cannot swap (NFS: the exchange says so), is renamed and
    the reserve made again; the final state uses the reserve up."""
    sys.path.insert(0, str(AGENT.parent))
    import agent as ag

    spec = ag.validate_spec(program("res", ["true"]))
    run, claimed = ag.claim(str(tmp_path), spec)
    assert claimed
    size = os.path.getsize(run.path("state.json"))
    assert size % 4096 == 0 and os.path.getsize(run.path(ag.RESERVE)) == size
    st = run.read_state()
    swaps = []

    def refusing(a, b):
        swaps.append((a, b))
        return False

    for pid, exchange in ((4242, ag.renameat2_exchange()), (4343, refusing)):
        st = dict(st, pid=pid, pgid=pid)
        ag.write_state_file(run.dir, st, durable=False, exchange=exchange)
        assert run.read_state()["pid"] == pid
        assert os.path.getsize(run.path("state.json")) == size == os.path.getsize(run.path(ag.RESERVE))
    assert swaps == [(run.path(ag.RESERVE), run.path("state.json"))]
    ag.write_state_file(run.dir, dict(st, state="done"), durable=True, exchange=ag.renameat2_exchange())
    assert run.read_state()["state"] == "done" and not os.path.exists(run.path(ag.RESERVE))
    assert not [n for n in os.listdir(run.dir) if n.endswith(".tmp")]
