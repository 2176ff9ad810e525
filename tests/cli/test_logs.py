"""`chaperone logs`: both streams in the order they were written (the
spool's timeline), --timestamps, --since; exact bytes (issue 10, item 8)."""

import asyncio
import datetime
import json
import os
import re
import struct
import subprocess
import sys
import time

import pytest

from chaperone import Chaperone
from chaperone.protocol import End, OutputChunk, StreamDecoder, Written
from chaperone.transports.memory import MemoryHost, MemoryTransport, run_virtual
from support.helpers import (CLI, agent, agent_cmd, agent_start, cli, cli_env, kill_marked, program, spool_dir, unique,
                     wait_state)

RECORD = struct.Struct("!QcQ")
#: A program that writes both streams in turn (bytes that are not UTF-8, no
#: newline at the end of stderr), with pauses: the order it wrote them in.
TURNS = ("import sys, time\n"
         "o, e = sys.stdout.buffer, sys.stderr.buffer\n"
         "for i in range(4):\n"
         "    o.write(b'out %d \\xff\\n' % i); o.flush(); time.sleep(0.08)\n"
         "    e.write(b'err %d\\n' % i); e.flush(); time.sleep(0.08)\n"
         "e.write(b'last, no newline'); e.flush()\n")
IN_ORDER = b"".join(b"out %d \xff\nerr %d\n" % (i, i) for i in range(4)) + b"last, no newline"
OUT = b"".join(b"out %d \xff\n" % i for i in range(4))
ERR = b"".join(b"err %d\n" % i for i in range(4)) + b"last, no newline"
PY = "/usr/bin/python3"


def records(path):
    data = path.read_bytes()
    assert len(data) % RECORD.size == 0
    return [(us, kind.decode(), end) for us, kind, end in RECORD.iter_unpack(data)]


def merged(home, *args):
    """``chaperone ARGS 2>&1``: both streams in the one pipe, in the order written to it."""
    return subprocess.run(CLI + [str(a) for a in args], env=cli_env(home), cwd=str(home),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)


# The spool's timeline ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("capture", ["file", "pipe"])
def test_the_timeline_records_when_each_stream_grew(tmp_path, capture):
    """start makes an empty timeline; the supervisor appends a record
    (time, stream, size reached) as it sees a stream grow: at each pump
    (pipe capture), at its looks at the sizes (file capture); times never
    go back, sizes only grow, the last ones are the final counts; and
    `logs` serves both streams in the order they were written."""
    root = tmp_path / "spool"
    run_id = unique("tl")
    began = time.time()
    agent_start(root, program(run_id, [PY, "-c", TURNS], config={"capture": capture}))
    assert (root / run_id / "timeline").exists()
    st = wait_state(root, run_id)
    assert (st["stdout_bytes"], st["stderr_bytes"]) == (len(OUT), len(ERR))
    recs = records(root / run_id / "timeline")
    times = [us for us, _, _ in recs]
    assert times == sorted(times) and began * 1e6 - 1e6 < times[0] and times[-1] <= time.time() * 1e6
    for name, kind in (("stdout", "1"), ("stderr", "2")):
        ends = [end for _, k, end in recs if k == kind]
        assert ends == sorted(set(ends)) and ends[-1] == st[name + "_bytes"]
    kinds = [k for i, (_, k, _) in enumerate(recs) if i == 0 or recs[i - 1][1] != k]
    assert kinds == ["1", "2"] * 4  # (a record per turn, 80 ms apart: the last two may be one)
    res = agent(root, "--marker", "M", "logs", run_id)
    assert res.returncode == 0, res.stderr
    events = StreamDecoder("M", json_line=False, framed=True).feed(res.stdout)
    assert b"".join(e.data for e in events if isinstance(e, OutputChunk)) == IN_ORDER
    whens = [e.time for e in events if isinstance(e, Written)]
    assert len(whens) >= 8 and whens == sorted(whens)
    assert isinstance(events[-1], End)


def test_output_written_before_a_state_gets_its_own_record(tmp_path):
    """File capture: a state written by the supervisor takes the spool
    files' sizes; growth it finds there gets its timeline record then, at
    the time it was written (the file's mtime).  (A program that wrote at
    once, before the first state, got none: its first line was stamped
    with the time of the next growth, so `logs -t` and `--since` were
    wrong for it.)"""
    from support.helpers import load_agent

    ag = load_agent()
    root = tmp_path / ("spool-" + unique("s"))
    run_id = unique("te")
    d = root / run_id
    d.mkdir(parents=True)
    for name in ("stdout", "stderr", "timeline"):
        (d / name).write_bytes(b"")
    sup = ag.Supervisor(ag.Run(str(root), run_id), {"id": run_id, "config": {"capture": "file"}}, None)
    sup.state = sup.base_state()
    sup.files = {name: os.open(str(d / name), os.O_RDONLY) for name in ("stdout", "stderr")}
    try:
        (d / "stdout").write_bytes(b"early\n")
        written = os.stat(str(d / "stdout")).st_mtime_ns // 1000
        time.sleep(0.05)
        sup.set_state(pid=1)
        assert sup.state["stdout_bytes"] == 6
        assert sup.timeline is not None, "no timeline record for what was written before the state"
        sup.timeline.flush()
        assert records(d / "timeline") == [(written, "1", 6)]
    finally:
        for fd in sup.files.values():
            os.close(fd)


@pytest.mark.timeout(60)
def test_a_chatty_program_gets_a_record_per_10_ms_not_per_write(tmp_path):
    """Growth of one stream within 10 ms of its last record is held back
    and written as one record: 20,000 lines in a burst (pipe capture, a
    pump each) are a few dozen records, and the last says where it ended."""
    root = tmp_path / "spool"
    run_id = unique("tc")
    code = "import sys\nfor i in range(20000): sys.stdout.write('line %d\\n' % i); sys.stdout.flush()"
    agent_start(root, program(run_id, [PY, "-c", code], config={"capture": "pipe"}))
    st = wait_state(root, run_id)
    recs = records(root / run_id / "timeline")
    assert recs[-1][1:] == ("1", st["stdout_bytes"])
    duration = (recs[-1][0] - recs[0][0]) / 1e6
    assert len(recs) <= duration / 0.01 + 3, (len(recs), duration)


#: ``agent.py --root ROOT start`` with module constants or functions of the
#: agent replaced first (argv[1]: Python code run with the module as ``ag``);
#: the supervisor forks from this process, so it runs with them.
PATCHED_START = ("import importlib.util, sys\n"
                 "spec = importlib.util.spec_from_file_location('agent', sys.argv[2])\n"
                 "ag = importlib.util.module_from_spec(spec)\n"
                 "spec.loader.exec_module(ag)\n"
                 "exec(sys.argv[1], {'ag': ag})\n"
                 "sys.exit(ag.main(sys.argv[3:]))\n")


def main_thread_wakeups(pid):
    """Voluntary context switches of the supervisor's main thread."""
    with open("/proc/%d/task/%d/status" % (pid, pid)) as f:
        return int(next(line for line in f if line.startswith("voluntary_ctxt_switches:")).split()[1])


def patched_start(root, spec, patch):
    from support.helpers import AGENT

    res = subprocess.run([sys.executable, "-c", PATCHED_START, patch, str(AGENT), "--root", str(root), "start"],
                         input=json.dumps(spec).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=60)
    assert res.returncode == 0, res.stderr.decode()


#: 20 turns of each stream, 20 ms apart (5 bytes a write).
QUICK_TURNS = ("import os, time\n"
               "for i in range(20):\n"
               "    os.write(1, b'o%03d\\n' % i); time.sleep(0.02)\n"
               "    os.write(2, b'e%03d\\n' % i); time.sleep(0.02)\n")


@pytest.mark.timeout(60)
def test_file_capture_timeline_is_each_write_in_order_however_late_the_size_looks_come(tmp_path):
    """File capture: an inotify watch of the spool files wakes the
    supervisor at each write, so the timeline has a record per turn, in
    order, with the exact size each stream reached, even when its looks
    at the sizes come late (here: made slow on purpose; on a busy machine
    they came late and the files' mtimes guessed the order)."""
    root = tmp_path / "spool"
    run_id = unique("tq")
    patched_start(root, program(run_id, [PY, "-c", QUICK_TURNS]), "ag.SIZE_POLL_MIN = ag.SIZE_POLL_MAX = 0.5")
    st = wait_state(root, run_id)
    assert (st["stdout_bytes"], st["stderr_bytes"]) == (100, 100)
    recs = records(root / run_id / "timeline")
    assert [(kind, end) for _, kind, end in recs] == [(k, 5 * (i + 1)) for i in range(20) for k in "12"]


@pytest.mark.timeout(60)
def test_file_capture_without_inotify_looks_at_the_sizes_as_before(tmp_path):
    """Where there is no inotify watch of the spool files (no libc,
    inotify_init failing, no watch left), the supervisor looks at the
    files' sizes on its timer: 10 ms after they grew, then twice as late
    each time (while nothing is written: about once a second); the
    timeline still follows the program's turns, 80 ms apart, and `logs`
    serves them in order."""
    root = tmp_path / "spool"
    run_id = unique("tn")
    code = TURNS + "time.sleep(3)\n"
    patched_start(root, program(run_id, [PY, "-c", code]), "ag.spool_watch = lambda paths, libc: (None, None)")
    pid = json.loads((root / run_id / "state.json").read_bytes())["agent_pid"]
    time.sleep(2.0)
    before = main_thread_wakeups(pid)
    time.sleep(1.5)
    assert 1 <= main_thread_wakeups(pid) - before <= 4  # (once a second, not every 10 ms)
    st = wait_state(root, run_id)
    assert (st["stdout_bytes"], st["stderr_bytes"]) == (len(OUT), len(ERR))
    recs = records(root / run_id / "timeline")
    kinds = [k for i, (_, k, _) in enumerate(recs) if i == 0 or recs[i - 1][1] != k]
    assert kinds == ["1", "2"] * 4
    res = agent(root, "--marker", "M", "logs", run_id)
    events = StreamDecoder("M", json_line=False, framed=True).feed(res.stdout)
    assert b"".join(e.data for e in events if isinstance(e, OutputChunk)) == IN_ORDER


@pytest.mark.timeout(60)
def test_logs_since_and_follow_at_the_agent(tmp_path):
    """`logs --since T` starts with the first record at or after T (each
    stream from where its last earlier record ended); `logs --follow`
    streams a running run in order until its end."""
    root = tmp_path / "spool"
    run_id = unique("ls")
    code = ("import sys, time\n"
            "sys.stdout.write('early out\\n'); sys.stdout.flush(); time.sleep(0.05)\n"
            "sys.stderr.write('early err\\n'); sys.stderr.flush()\n"
            "time.sleep(1.0)\n"
            "sys.stderr.write('late err\\n'); sys.stderr.flush(); time.sleep(0.05)\n"
            "sys.stdout.write('late out\\n'); sys.stdout.flush()\n"
            "time.sleep(0.5)\n")
    agent_start(root, program(run_id, [PY, "-c", code]))
    follower = subprocess.Popen(agent_cmd(root, "--marker", "M", "logs", run_id, "--follow"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.6)
    middle = time.time()
    wait_state(root, run_id)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    events = StreamDecoder("M", json_line=False, framed=True).feed(out)
    assert b"".join(e.data for e in events if isinstance(e, OutputChunk)) == \
        b"early out\nearly err\nlate err\nlate out\n"
    assert isinstance(events[-1], End)
    res = agent(root, "--marker", "M", "logs", run_id, "--since", repr(middle))
    events = StreamDecoder("M", json_line=False, framed=True).feed(res.stdout)
    chunks = [e for e in events if isinstance(e, OutputChunk)]
    assert [(c.stream, c.offset, c.data) for c in chunks] == [("stderr", 10, b"late err\n"),
                                                             ("stdout", 10, b"late out\n")]
    assert all(e.time >= middle for e in events if isinstance(e, Written))


# The command line ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("capture", ["file", "pipe"])
def test_logs_interleaves_both_streams_as_written(home, capture):
    """`chaperone logs ID 2>&1` shows both streams in the order the program
    wrote them (it showed stdout, then stderr), each still on its own
    descriptor: the exact bytes of each."""
    run_id = unique("li")

    async def start():  # (through the library: the CLI has no --capture)
        async with Chaperone(home) as ch:
            await ch.start("local", [PY, "-c", TURNS], id=run_id, config={"capture": capture})

    asyncio.run(start())
    assert cli(home, "wait", run_id).returncode == 0
    res = merged(home, "logs", run_id)
    assert (res.returncode, res.stdout) == (0, IN_ORDER)
    res = cli(home, "logs", run_id)
    assert (res.returncode, res.stdout, res.stderr) == (0, OUT, ERR)
    res = cli(home, "logs", "--stderr", run_id)
    assert (res.returncode, res.stdout) == (0, ERR)
    # --tail N: the last N lines of each stream (a last line without a
    # newline counts), still in the order written; --tail all: everything.
    res = merged(home, "logs", "--tail", "2", run_id)
    assert (res.returncode, res.stdout) == (0, b"out 2 \xff\nout 3 \xff\nerr 3\nlast, no newline"), res.stdout
    res = cli(home, "logs", "--stdout", "--tail", "1", run_id)
    assert (res.returncode, res.stdout) == (0, b"out 3 \xff\n")
    res = cli(home, "logs", "--tail", "0", run_id)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    res = merged(home, "logs", "--tail", "all", run_id)
    assert (res.returncode, res.stdout) == (0, IN_ORDER)
    res = cli(home, "logs", "--tail", "x", run_id)
    assert res.returncode == 2 and b"invalid --tail 'x'" in res.stderr


@pytest.mark.timeout(60)
def test_logs_timestamps_and_since(home):
    """--timestamps starts each line with when it was written (RFC 3339,
    UTC, as docker: only the prefixes are added); --since keeps what was
    written from then on (a duration back from now, or a time)."""
    run_id = unique("lt")
    code = ("import sys, time\n"
            "sys.stdout.buffer.write(b'a\\xff\\nb'); sys.stdout.flush(); time.sleep(0.3)\n"
            "sys.stdout.buffer.write(b'c\\n\\n'); sys.stdout.flush(); sys.stderr.write('e\\n'); sys.stderr.flush()\n"
            "time.sleep(1.2)\n"
            "sys.stdout.write('late\\n'); sys.stdout.flush()\n")
    began = time.time()
    assert cli(home, "run", "--id", run_id, "local", "--", PY, "-c", code).returncode == 0
    ended = time.time()
    res = merged(home, "logs", "--timestamps", run_id)
    assert res.returncode == 0, res.stdout
    stamp = rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9})Z "
    lines = res.stdout.split(b"\n")
    assert [re.sub(b"^" + stamp, b"", line) for line in lines] == [b"a\xff", b"bc", b"", b"e", b"late", b""]
    whens = [datetime.datetime.strptime(re.match(stamp, line).group(1).decode()[:26], "%Y-%m-%dT%H:%M:%S.%f")
             .replace(tzinfo=datetime.timezone.utc).timestamp() for line in lines[:5]]
    assert began - 1 < whens[0] <= whens[1] <= whens[2] <= whens[3] < whens[4] <= ended + 1
    assert 0.2 < whens[2] - whens[1] < 1.0 and whens[4] - whens[3] > 1.0
    # (b and c are one line: its time is when it began, with b)
    mid = datetime.datetime.fromtimestamp(whens[3] + 0.6, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert merged(home, "logs", "--since", mid, run_id).stdout == b"late\n"
    assert merged(home, "logs", "--since", "1h", run_id).stdout == b"a\xff\nbc\n\ne\nlate\n"
    assert merged(home, "logs", "--since", "%.6f" % (time.time() + 10), run_id).stdout == b""
    res = cli(home, "logs", "--since", "yesterday", run_id)
    assert res.returncode == 2 and b"invalid --since" in res.stderr and b"Traceback" not in res.stderr


@pytest.mark.timeout(60)
def test_a_run_without_a_timeline_is_each_stream_in_turn(home):
    """A run an older agent started has no timeline: stdout, then stderr;
    --timestamps says in one line that it cannot."""
    run_id = unique("lo")
    assert cli(home, "run", "-d", "--id", run_id, "local", "--", PY, "-c", TURNS).returncode == 0
    assert cli(home, "wait", run_id).returncode == 0
    os.unlink(str(spool_dir(home, run_id) / "timeline"))
    assert merged(home, "logs", run_id).stdout == OUT + ERR
    res = cli(home, "logs", "-t", run_id)
    assert res.returncode == 0 and res.stdout == OUT
    assert res.stderr.startswith(b"chaperone: run %s has no timeline" % run_id.encode()) and res.stderr.endswith(ERR)


@pytest.mark.timeout(60)
def test_logs_follow_prints_in_order_until_the_end(home):
    """`logs -f` of a running run: both streams as written, until its end."""
    run_id = unique("lf")
    tag = unique("lfm")
    code = TURNS + "time.sleep(0.2)  # %s\n" % tag
    assert cli(home, "run", "-d", "--id", run_id, "local", "--", PY, "-c", code).returncode == 0
    try:
        res = merged(home, "logs", "-f", run_id)
        assert (res.returncode, res.stdout) == (0, IN_ORDER)
    finally:
        kill_marked(tag)


# The library, over a memory host ----------------------------------------------------------------


def test_logs_in_order_exactly_once_across_broken_connections(tmp_path):
    """Chaperone.logs(follow=True) of a run whose connections break after
    a few bytes, again and again: each byte once, in the order written,
    each chunk after the Written of its time."""
    host = MemoryHost("fake", chunk=7)

    @host.program("talk")
    async def talk(p):
        for i in range(30):
            p.write("stdout" if i % 3 else "stderr", b"line %d\n" % i)
            await p.sleep(1)
        return 0

    async def main():
        async with Chaperone(tmp_path, transports={"fake": MemoryTransport(host)}) as ch:
            run = await ch.start("fake", ["talk"])
            host.break_after(*range(40, 400, 23), command="logs")
            got, times = [], []
            async for event in ch.logs(run.id, follow=True, on_reconnect=lambda e, d: None):
                if isinstance(event, Written):
                    times.append(event.time)
                elif isinstance(event, OutputChunk):
                    got.append((event.stream, event.data))
            return got, times

    got, times = run_virtual(main(), timeout=3600)
    by = {"stdout": b"", "stderr": b""}
    order = b""
    for stream, data in got:
        by[stream] += data
        order += data
    assert order == b"".join(b"line %d\n" % i for i in range(30))
    assert by["stderr"] == b"".join(b"line %d\n" % i for i in range(0, 30, 3))
    assert times == sorted(times) and len(times) >= 30


# Over SSH (a real sshd) --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_logs_over_ssh_in_order_and_each_stream_exact(sshd, tmp_path):
    """Over OpenSSH: `logs ID 2>&1` is both streams in the order written;
    to two files (the plain path: each stream from the ssh pipe as it is)
    each holds its stream's exact bytes; `logs -f` of the finished run
    prints it and exits."""
    env = dict(cli_env(tmp_path), CHAPERONE_SSH_CLIENT="openssh")
    ssh = CLI + ["-F", str(sshd.config_file)]
    res = subprocess.run(ssh + ["run", "-d", "testhost", "--spool", str(tmp_path / "spool"), "--",
                                "python3", "-c", TURNS], env=env, stdout=subprocess.PIPE, timeout=60)
    run_id = res.stdout.decode().strip()
    assert subprocess.run(ssh + ["wait", run_id], env=env, timeout=60).returncode == 0
    for args in (["logs", run_id], ["logs", "-f", run_id]):
        res = subprocess.run(ssh + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert (res.returncode, res.stdout) == (0, IN_ORDER), args
    with open(str(tmp_path / "out"), "wb") as out, open(str(tmp_path / "err"), "wb") as err:
        res = subprocess.run(ssh + ["logs", run_id], env=env, stdout=out, stderr=err, timeout=60)
    assert res.returncode == 0, (tmp_path / "err").read_bytes()
    assert ((tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()) == (OUT, ERR)
