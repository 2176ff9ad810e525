"""The library's logic over an in-memory host (chaperone.transports.memory),
in virtual time: reconnects, offsets, records and their states, in
milliseconds, through the real :class:`Chaperone` API.  The real-sshd
tests stay; these add what is hard to make happen on a real host (a
connection that drops after exactly N bytes, at any byte, many times).

The first test holds the memory host to the real agent: the same command
lines, the same answers."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone import Chaperone
from chaperone.errors import AgentFailed, ConnectFailed, ConnectionLost, NoSuchRun, StartFailed, UsageError
from chaperone.models import RunState
from chaperone.protocol import FRAME, End, OutputChunk, RunError, StateUpdate, StreamDecoder, Written
from chaperone.transports.local import LocalTransport
from chaperone.transports.memory import MemoryHost, MemoryTransport, run_virtual
from support.helpers import REPO


def go(main):
    """Run ``main`` in virtual time (a day of it at most)."""
    return run_virtual(main, timeout=86400)


@contextlib.asynccontextmanager
async def chaperone(home, *hosts):
    async with Chaperone(home, transports={h.name: MemoryTransport(h) for h in hosts}) as ch:
        yield ch


def sleeper(host, name="sleep", seconds=100.0, code=0):
    """Register a program that sleeps, then exits ``code``; returns the
    list of the run ids it was started for."""
    started = []

    async def program(p):
        started.append(p.id)
        await p.sleep(seconds)
        return code

    host.program(name, program)
    return started


async def drops_every(host, seconds, times):
    """Drop every connection to ``host`` every ``seconds``, ``times`` times."""
    for _ in range(times):
        await asyncio.sleep(seconds)
        host.disconnect()


def typed(state):
    return RunState.model_validate(state)


# The memory host answers as the agent does -----------------------------------------------

#: Fields that differ between two hosts by nature (pids, times, names).
VOLATILE = ("agent_pid", "agent_start", "boot_id", "host_id", "pid", "pgid", "pid_start", "host", "start_time",
            "end_time", "end_ticks")


def _normal(obj):
    """A reply with what differs by nature replaced by its type."""
    if isinstance(obj, list):
        return [_normal(o) for o in obj]
    if isinstance(obj, dict) and "spool" in obj:
        typed(obj)
        obj = dict(obj)
        for key in VOLATILE:
            obj[key] = type(obj[key]).__name__
        if obj.get("rusage"):
            obj["rusage"] = {k: type(v).__name__ for k, v in obj["rusage"].items()}
    elif isinstance(obj, dict):
        obj = {k: _normal(v) for k, v in obj.items()}
    return obj


def _reply(code, out, err, args=()):
    """(exit status, stderr, stdout), stdout decoded and normalized: after a
    marker, its events (states, the bytes of each stream, the other
    events' kinds), or for ``stdin`` its answer lines; else a JSON line,
    or the bytes."""
    if b"\nM\n" in out and "stdin" in args:
        out = [json.loads(line) for line in out.split(b"\nM\n", 1)[1].splitlines()]
    elif b"\nM\n" in out and "output" not in args:  # (output's replies are bytes, compared as they are)
        json_line = out.split(b"\nM\n", 1)[1][:1] in (b"{", b"[")
        events = StreamDecoder("M", json_line=json_line, framed=True).feed(out)
        data = {}
        for e in events:
            if isinstance(e, OutputChunk):
                data[e.stream] = data.get(e.stream, b"") + e.data
        # (a follow's states while running depend on timing: the line, and the final ones)
        states = [e.state for i, e in enumerate(events) if isinstance(e, StateUpdate)
                  and (i == 0 and json_line or e.final)]
        kinds = [(e.run_id, e.error, e.code) if isinstance(e, RunError) else
                 ("Written", type(e.time).__name__) if isinstance(e, Written) else type(e).__name__ for e in events
                 if not isinstance(e, OutputChunk) and not (isinstance(e, StateUpdate) and e.state not in states)]
        # (how many times a log's writes are stamped with depends on timing:
        # two writes a moment apart are one timeline record or two, as the
        # supervisor's polls fall; that there are stamps, and where, does not)
        kinds = [k for i, k in enumerate(kinds) if not (i and k == kinds[i - 1] and k[0] == "Written")]
        out = ([_normal(s) for s in states], data, kinds)
    elif out[:1] in (b"{", b"["):
        out = _normal(json.loads(out))
    return code, err.decode(), out


def test_memory_host_answers_as_the_agent_does(tmp_path):
    """The same command lines to the real agent (a process) and to a
    memory host give the same exit statuses, the same stderr, and the same
    stdout but for pids and times: usage errors, bad program.json, a batch
    with a rejected document, a program that cannot start, follow, output
    ranges, signals, control, list, clean."""
    root = str(tmp_path / "spool")
    script = "sleep 0.2; printf 'out\\377'; printf err >&2; exit 3"
    sh = {"id": "d1", "program": {"argv": ["/bin/sh", "-c", script]}}
    missing = {"id": "d3", "program": {"argv": ["/nonexistent/prog"]}}
    no_stdin = {"id": "d4", "program": {"argv": ["/bin/sh"], "stdin": {"path": "/nonexistent/in"}}}
    stream = {"id": "d5", "program": {"argv": ["cat"], "stdin": {"stream": True}}}
    frame = lambda kind, offset, data=b"": FRAME.pack(kind, offset, len(data)) + data  # noqa: E731
    calls = [
        (["start"], sh), (["--marker", "M", "follow", "d1"], None), (["--marker", "M", "status", "d1"], None),
        (["--marker", "M", "start", "--follow"], dict(sh, program={"argv": ["other"]})),
        (["output", "d1", "--stream", "stdout", "--offset", "1", "--length", "2"], None),
        (["output", "d1", "--stream", "stderr", "--offset", "10"], None),
        (["output", "d1", "--stream", "stdout", "--offset", "-1"], None),
        (["output", "d1"], None), (["output", "d1", "--stream", "stdin"], None),
        (["signal", "d1", "TERM"], None), (["signal", "d1", "BOGUS"], None),
        (["signal", "d1", "TERM", "--grace", "-1"], None), (["status", "nope"], None),
        (["status", "../x"], None), (["follow", "nope"], None), (["frobnicate"], None), ([], None),
        (["start"], b""), (["start"], b"{"), (["start"], b"\xff"), (["start"], {"id": "d2"}),
        (["start"], b"[]"), (["start", "--follow"], b"[" + json.dumps(missing).encode() + b"]"),
        (["--marker", "M", "start"], [missing, {"id": "bad id", "program": {"argv": ["x"]}}, 5, no_stdin]),
        (["control", "d1"], b"nope"), (["control", "d1"], {"op": "x"}),
        (["--marker", "M", "control", "d1"], {"op": "release"}), (["--marker", "M", "list"], None),
        (["--marker", "M", "follow", "d3", "--stdout-offset", "5"], None),
        (["--marker", "M", "logs", "d1"], None), (["--marker", "M", "logs", "d1", "--follow", "--stdout-offset", "2"],
                                                  None),
        (["--marker", "M", "logs", "d1", "--since", "1e10"], None), (["logs", "d1", "--since", "-1"], None),
        (["logs", "d1", "--stderr-offset", "-1"], None), (["logs", "nope"], None),
        (["--marker", "M", "output", "d1", "--stream", "both"], None),
        (["output", "d1", "--stream", "both", "--offset", "1"], None),
        (["--marker", "M", "watch"], b"d1 nope\nd3 d1"), (["watch"], b" \n"), (["watch"], b"d1 ../x"),
        (["watch", "d1"], b"d1"),
        (["--marker", "M", "clean", "d1"], None), (["status", "d1"], None), (["-h"], None),
        # a stdin stream: appended by offset (again: harmless; a gap: refused), its end once
        (["start"], stream), (["--marker", "M", "stdin", "d5"], frame(b"D", 0, b"abc") + frame(b"D", 1, b"bcd")
                              + frame(b"D", 2, b"cd") + frame(b"D", 4, b"")),
        (["--marker", "M", "stdin", "d5"], frame(b"D", 9, b"x")), (["--marker", "M", "stdin", "d5"], frame(b"Z", 0)),
        (["--marker", "M", "stdin", "d5"], frame(b"W", 0, b'{"rows": 2, "cols": 3}')),
        (["--marker", "M", "stdin", "d5"], frame(b"D", 0, b"abcd") + frame(b"E", 4) + frame(b"E", 4)),
        (["--marker", "M", "stdin", "d5"], frame(b"E", 3)), (["--marker", "M", "stdin", "nope"], b""),
        (["stdin", "d3"], b""), (["control", "d5"], {"op": "winsize", "rows": 5, "cols": 7}),
    ]

    def encode(stdin):
        return stdin if isinstance(stdin, (bytes, type(None))) else json.dumps(stdin).encode()

    async def replies(transport):
        out = []
        for args, stdin in calls:
            proc = await transport.open(["--root", root] + args, encode(stdin) or b"")
            data = b""
            while True:
                chunk = await proc.read()
                if not chunk:
                    break
                data += chunk
            out.append(_reply(await proc.wait(), data, await proc.stderr(), args))
            proc.close()
            if args == ["--marker", "M", "stdin", "d5"] and stdin.endswith(frame(b"E", 4)):
                for _ in range(500):  # (until cat has read its end and ended)
                    if json.loads((await _call(transport, root, ["status", "d5"]))[1])["state"] != "running":
                        break
                    await asyncio.sleep(0.01)
        await transport.close()
        return out

    real = asyncio.run(replies(LocalTransport()))
    host = MemoryHost("fake")

    @host.program("cat")
    async def cat(p):
        while True:
            data = await p.read()
            if not data:
                return 0
            p.write("stdout", data)

    @host.program("/bin/sh")
    async def sh_program(p):
        assert p.argv == ["/bin/sh", "-c", script]
        await p.sleep(0.2)
        p.write("stdout", b"out\xff")
        p.write("stderr", b"err")
        return 3

    memory = go(replies(MemoryTransport(host)))
    for (args, _), want, got in zip(calls, real, memory):
        assert got == want, args
    assert [code for code, _, _ in real] == [0, 0, 0, 0, 0, 0, 2, 2, 2, 1, 2, 2, 4, 2, 4, 2, 2, 2, 2, 2, 2, 2, 2,
                                             0, 2, 2, 0, 0, 0, 0, 0, 0, 2, 2, 4, 0, 2, 0, 2, 2, 2, 0, 4, 0,
                                             0, 0, 1, 2, 2, 0, 0, 4, 5, 2]
    assert real[45][2] == [{"closed": False, "end": False, "held": n, "tty": False} for n in (0, 3, 4, 4, 4)]
    assert real[49][2][-2:] == [{"closed": False, "end": True, "held": 4, "tty": False}] * 2
    assert real[50][2] == [{"closed": True, "end": True, "held": 4, "tty": False}]


async def _call(transport, root, args, stdin=b""):
    proc = await transport.open(["--root", root] + args, stdin)
    data = b""
    while True:
        chunk = await proc.read()
        if not chunk:
            break
        data += chunk
    code = await proc.wait()
    proc.close()
    return code, data


def test_runs_on_a_memory_host_have_the_agents_states(tmp_path):
    """Each state a run goes through is a valid state.json (RunState):
    running, done (exit status, or a signal), error (not found, ENOENT,
    exit status 127), lost; a program gets its argv, env, cwd and stdin
    (data, or a file on the host)."""
    host = MemoryHost("fake", files={"/data/in": b"from a file"})
    seen = {}

    @host.program("env")
    async def env(p):
        seen.update(argv=p.argv, env=p.env, cwd=p.cwd, stdin=p.stdin)
        p.write("stdout", b"\x00\xff no newline")
        await p.sleep(1)
        p.kill("SIGSEGV")

    sleeper(host)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["env", "a b"], env={"X": "1", "LANG": None}, stdin=b"in\n", cwd="/w")
            assert run.state.state == "running" and run.state.pid is not None
            typed(host.runs[run.id].state)
            state = await run.wait()
            assert (state.state, state.signal, state.exit_code) == ("done", "SIGSEGV", 139)
            assert host.runs[run.id].stdout == b"\x00\xff no newline" and state.stdout_bytes == 13
            assert seen == {"argv": ["env", "a b"], "cwd": "/w", "stdin": b"in\n",
                            "env": {"HOME": "/home/user", "PATH": "/usr/local/bin:/usr/bin:/bin", "X": "1"}}
            await (await ch.start("fake", ["env"], stdin_path="/data/in")).wait()
            assert seen["stdin"] == b"from a file"
            nothing = await (await ch.start("fake", ["env"], stdin_path="/data/none")).wait()
            assert (nothing.state, nothing.error) == ("error", "stdin /data/none: No such file or directory")
            missing = await (await ch.start("fake", ["/opt/missing", "x"])).wait()
            assert (missing.state, missing.errno, missing.exit_code) == ("error", 2, 127)
            assert missing.error == "/opt/missing: No such file or directory" and missing.pid is None
            run = await ch.start("fake", ["sleep"])
            host.lose(run.id)
            lost = await run.wait()
            assert lost.state == "lost" and lost.exit_code == 255 and "is gone without a result" in lost.error
            for r in host.runs.values():
                typed(r.state)

    go(main())


# Exactly once, by offset, across broken connections ---------------------------------------

writes = st.lists(st.one_of(
    st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(min_size=1, max_size=40)),
    st.floats(min_value=0.001, max_value=5.0)), max_size=25)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=writes, breaks=st.lists(st.integers(0, 400), max_size=8),
       drops=st.lists(st.floats(0.01, 60.0), max_size=3), chunk=st.integers(1, 16),
       mode=st.sampled_from(["events", "run"]))
def test_output_exactly_once_across_broken_follows(steps, breaks, drops, chunk, mode):
    """Whatever a program writes, wherever connections break (after any
    byte of the agent's stdout: in the marker, a frame header, a payload)
    and whenever every connection drops at once, the events deliver each
    stream exactly once: each chunk starts where the last one ended, the
    whole equals what was written, then the final state, then the end.
    ``events``: start, then follow; ``run``: start --follow (broken too)."""
    host = MemoryHost("fake", chunk=chunk)
    expected = {"stdout": b"", "stderr": b""}
    for step in steps:
        if isinstance(step, tuple):
            expected[step[0]] += step[1]

    async def program(p):
        for step in steps:
            if isinstance(step, tuple):
                p.write(*step)
            else:
                await p.sleep(step)
        return 7

    host.program("prog", program)

    async def dropper():
        loop = asyncio.get_running_loop()
        for t in sorted(drops):
            await asyncio.sleep(max(0.0, t - loop.time()))
            host.disconnect()

    async def main(home):
        got = {"stdout": bytearray(), "stderr": bytearray()}
        events = []
        reconnects = []
        async with chaperone(home, host) as ch:
            host.break_after(*breaks, command="follow" if mode == "events" else None)
            task = asyncio.ensure_future(dropper())
            if mode == "events":
                run = await ch.start("fake", ["prog"], id="r1")
                stream = ch.events(run.id, on_reconnect=lambda e, d: reconnects.append(e))
            else:
                stream = ch.run("fake", ["prog"], id="r1", on_reconnect=lambda e, d: reconnects.append(e))
            async for event in stream:
                events.append(event)
                if isinstance(event, OutputChunk):
                    assert event.offset == len(got[event.stream]), "a gap or a byte twice"
                    got[event.stream] += event.data
            task.cancel()
            assert {s: bytes(b) for s, b in got.items()} == expected
            assert isinstance(events[-1], End) and isinstance(events[-2], StateUpdate)
            final = typed(events[-2].state)
            assert (final.state, final.return_code) == ("done", 7)
            assert (final.stdout_bytes, final.stderr_bytes) == (len(expected["stdout"]), len(expected["stderr"]))
            assert ch.records.get("r1").state == "done"
            assert len(reconnects) <= len(breaks) + len(drops)

    with tempfile.TemporaryDirectory() as home:
        go(main(home))


def test_output_and_read_by_offset_across_breaks(tmp_path):
    """``output(follow=True)`` of one stream, from an offset, across broken
    follows: exactly its bytes from there; ``read`` gives a range, never
    past what the run wrote.  (The host prints a login banner before each
    agent call: the marker skips it.)"""
    host = MemoryHost("fake", chunk=5, banner=b"Welcome!\n\n\x00\xff" * 10)

    @host.program("talk")
    async def talk(p):
        for i in range(50):
            p.write("stdout", b"%03d," % i)
            p.write("stderr", b"e")
            await p.sleep(0.5)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["talk"])
            host.break_after(40, 50, 60, 70, 80, command="follow")
            out = b"".join([data async for data in ch.output(run.id, "stdout", 7, follow=True)])
            want = b"".join(b"%03d," % i for i in range(50))
            assert out == want[7:]
            assert await ch.read(run.id, "stdout", 4, 8) == want[4:12]
            assert await ch.read(run.id, "stderr", 45) == b"eeeee"
            assert await ch.read(run.id, "stderr", 60) == b""
            assert b"".join([d async for d in ch.output(run.id, "stdout", 190)]) == want[190:]

    go(main())


# wait(), reconnects and their backoff -----------------------------------------------------


def test_wait_across_breaks_and_dropped_connections(tmp_path):
    """``wait`` of an hour-long run whose connections break after a few
    bytes, then all drop every 500 s, returns its final state the moment it
    ends; ``timeout`` bounds it."""
    host = MemoryHost("fake")
    sleeper(host, seconds=3600, code=4)

    async def main():
        loop = asyncio.get_running_loop()
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"])
            # (wait() watches: its calls break within the marker, before any answer)
            host.break_after(3, 10, 20, command="watch")
            told = []

            task = asyncio.ensure_future(drops_every(host, 500, 7))
            state = await ch.wait(run.id, on_reconnect=lambda e, d: told.append((type(e), d)))
            task.cancel()
            assert (state.state, state.return_code, state.exit_code) == ("done", 4, 4)
            assert loop.time() == 3600
            # (no answer between the first three breaks: the delay doubles;
            # after each drop of a call that was up, it starts again)
            assert told == [(ConnectionLost, d) for d in (0.25, 0.5, 1.0)] + [(ConnectionLost, 0.25)] * 7
            assert ch.records.get(run.id).state == "done"
            with pytest.raises(asyncio.TimeoutError):
                await ch.wait((await ch.start("fake", ["sleep"])).id, timeout=10)
            assert 3610 <= loop.time() < 3611

    go(main())


@pytest.mark.parametrize("kind, transient", [("refused", True), ("timeout", True), ("dropped", True),
                                             ("lost", True), ("host_key", False), ("auth", False)])
def test_refused_connections_are_retried_when_worth_it(tmp_path, kind, transient):
    """A follow that cannot reconnect (refused, timed out, dropped before
    login, lost) tries again with backoff (0.25 s, doubling) and gets
    there; a wrong host key or a refused login is final at once."""
    host = MemoryHost("fake")
    sleeper(host, seconds=1)

    async def main():
        loop = asyncio.get_running_loop()
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"])
            host.refuse(3, kind)
            told = []
            if not transient:
                with pytest.raises(ConnectFailed) as e:
                    await ch.wait(run.id, on_reconnect=lambda e, d: told.append(d))
                assert not e.value.transient and told == [] and loop.time() == 0
                return
            state = await ch.wait(run.id, on_reconnect=lambda e, d: told.append(d))
            assert state.state == "done" and told == [0.25, 0.5, 1.0] and loop.time() == 1.75

    go(main())


def test_reconnect_gives_up_after_reconnect_for(tmp_path):
    """A host that stays unreachable: the backoff doubles up to 10 s and
    gives up once the next try would pass ``reconnect_for`` seconds since
    the last event; the error is the last refusal.  A run that goes on
    longer than that, with events between the breaks, is followed to its end."""
    host = MemoryHost("fake")
    sleeper(host, seconds=10000)

    @host.program("ticks")
    async def ticks(p):
        for i in range(10):
            await p.sleep(10)
            p.write("stdout", b"%d" % i)

    async def main():
        loop = asyncio.get_running_loop()
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["ticks"])
            task = asyncio.ensure_future(drops_every(host, 15, 6))
            out = [e.data async for e in ch.events(run.id, reconnect_for=20) if isinstance(e, OutputChunk)]
            assert b"".join(out) == b"0123456789" and loop.time() == 100
            task.cancel()

            began = loop.time()
            run = await ch.start("fake", ["sleep"])
            host.refuse(100, "refused")
            told = []
            with pytest.raises(ConnectFailed, match="connection to fake refused"):
                async for _ in ch.events(run.id, on_reconnect=lambda e, d: told.append(d), reconnect_for=30):
                    pass
            assert told == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
            assert loop.time() - began == sum(told)
            assert len(host._refusals) == 100 - 8

    real = time.monotonic()
    go(main())
    assert time.monotonic() - real < 5  # (virtual time)


# Starts ------------------------------------------------------------------------------------


def test_start_is_idempotent_by_id(tmp_path):
    """Starting an id again starts nothing new: the same run; another
    command under a used id is refused; concurrent starts on one host go
    in one agent call."""
    host = MemoryHost("fake")
    started = sleeper(host)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            first = await ch.start("fake", ["sleep", "1"], id="job-1")
            again = await ch.start("fake", ["sleep", "1"], id="job-1")
            await asyncio.sleep(1)
            assert started == ["job-1"] and list(host.runs) == ["job-1"]
            assert again.id == first.id and again.state.pid == first.state.pid
            with pytest.raises(UsageError, match="already used by another run"):
                await ch.start("fake", ["sleep", "2"], id="job-1")
            calls = len(host.calls)
            runs = await asyncio.gather(*(ch.start("fake", ["sleep"], id="b%d" % i) for i in range(5)))
            assert [r.state.state for r in runs] == ["running"] * 5
            assert len(host.calls) == calls + 1 and host.calls[-1][-1] == "start"
            assert sorted(host.runs) == ["b0", "b1", "b2", "b3", "b4", "job-1"]

    go(main())


def test_a_command_line_runs_in_the_hosts_login_shell(tmp_path):
    """A string is a shell command line: program.json carries it as one
    string with ``shell``, the host runs its login shell with ``-c LINE``;
    the record shows it as typed (no argv).  A list stays an exact argv."""
    host = MemoryHost("fake", shell="/bin/zsh")
    seen = []

    @host.program("/bin/zsh")
    async def zsh(p):
        seen.append(p.argv)
        return 0

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", "echo $HOME | wc -c", id="line")
            assert (await run.wait()).exit_code == 0
            assert seen == [["zsh", "-c", "echo $HOME | wc -c"]]
            prog = host.runs["line"].spec["program"]
            assert (prog["argv"], prog["shell"]) == (["echo $HOME | wc -c"], True)
            assert (run.info().command, run.info().argv) == ("echo $HOME | wc -c", None)
            exact = await ch.start("fake", ["/bin/zsh", "-c", "x"], id="exact")
            assert (await exact.wait()).exit_code == 0 and seen[-1] == ["/bin/zsh", "-c", "x"]
            assert host.runs["exact"].spec["program"]["shell"] is False
            assert exact.info().argv == ["/bin/zsh", "-c", "x"]

    go(main())


def test_a_start_that_never_reached_the_host_is_failed(tmp_path):
    """Refused before anything ran: the start raises, the record says
    ``failed`` (never ``running``), and the host has nothing.  Dropped
    after login, before the answer: ``unknown`` until the next look at the
    host decides: ``failed`` if the host does not know it, else its state."""
    host = MemoryHost("fake")
    sleeper(host, seconds=5)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            host.refuse(1, "dropped")
            with pytest.raises(ConnectFailed, match="dropped the connection before login"):
                await ch.start("fake", ["sleep"], id="never")
            assert ch.records.get("never").state == "failed" and host.runs == {}
            for verb in (ch.wait, ch.status):
                with pytest.raises(StartFailed, match="never started"):
                    await verb("never")
            host.refuse(1, "refused")
            with pytest.raises(ConnectFailed):
                async for _ in ch.run("fake", ["sleep"], id="never2"):
                    pass
            assert ch.records.get("never2").state == "failed" and host.runs == {}

            host.refuse(1, "lost")
            with pytest.raises(ConnectionLost):
                await ch.start("fake", ["sleep"], id="unsure")
            assert ch.records.get("unsure").state == "unknown"
            with pytest.raises(StartFailed, match="its start never reached fake"):
                await ch.wait("unsure")
            assert ch.records.get("unsure").state == "failed"

            # (run: a start --follow whose answer never came is sent again: start is idempotent by id)
            host.refuse(1, "lost")
            seen = []
            events = [e async for e in ch.run("fake", ["sleep"], id="retold", on_reconnect=lambda e, d: seen.append(
                (type(e), d, ch.records.get("retold").state)))]
            assert seen == [(ConnectionLost, 0.0, "unknown")]
            assert events[-2].state["state"] == "done" and host.runs["retold"].state["state"] == "done"
            assert ch.records.get("retold").state == "done"

            host.break_after(0, command="start")
            with pytest.raises(ConnectionLost):
                await ch.start("fake", ["sleep"], id="ran")
            assert ch.records.get("ran").state == "unknown" and host.runs["ran"].running
            assert (await ch.wait("ran")).state == "done" and ch.records.get("ran").state == "done"

    go(main())


def test_a_look_while_a_start_is_on_its_way_does_not_fail_it(tmp_path):
    """Another process (here: another Chaperone on the same home) looks at
    the runs while a start is on its way (the host does not have the run
    yet): the run stays ``starting``, its status says so (StartPending),
    and once the start lands it is ``running``, then ``done`` (before: the
    look recorded it ``failed`` for good, though it ran)."""
    from chaperone.errors import StartPending

    host = MemoryHost("fake", latency=5.0)
    sleeper(host, seconds=20)

    async def main():
        async with chaperone(tmp_path, host) as ch, chaperone(tmp_path, host) as other:
            starting = asyncio.ensure_future(ch.start("fake", ["sleep"], id="inflight"))
            await asyncio.sleep(1.0)
            host.latency = 0.0  # (the start's call takes 5 s to connect; the looks none)
            assert other.records.get("inflight").state == "starting"
            await other.refresh()
            assert other.records.get("inflight").state == "starting"
            with pytest.raises(StartPending):
                await other.status("inflight")
            run = await starting
            assert ch.records.get("inflight").state == "running"
            assert (await run.wait()).state == "done"

    go(main())


def test_a_cancelled_start_goes_on_and_its_answer_is_recorded(tmp_path):
    """start() cancelled while its start is on its way: the start goes on
    (it was sent: a program may run), the record stays ``starting``, and
    the answer, when it comes, is recorded: the run is ``running``, then
    ``done`` (before: ``unknown``, then ``failed`` at the next look, though
    the program ran)."""
    host = MemoryHost("fake", latency=5.0)
    started = sleeper(host, seconds=20)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            task = asyncio.ensure_future(ch.start("fake", ["sleep"], id="cancelled"))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert ch.records.get("cancelled").state == "starting"
            await asyncio.sleep(5.0)
            assert started == ["cancelled"] and ch.records.get("cancelled").state == "running"
            assert (await ch.wait("cancelled")).state == "done"

    go(main())


def test_a_start_cut_short_is_never_left_starting(tmp_path, monkeypatch):
    """A start cut short by something other than a connection error (a
    bug, an exception of the transport, a cancel): the record says
    ``unknown`` with what cut it short, never ``starting`` for ever; the
    next look at the host decides (here: it never got it: ``failed``)."""
    import chaperone.api as api

    host = MemoryHost("fake")
    sleeper(host, seconds=5)

    def boom(*a, **k):
        answer = asyncio.get_running_loop().create_future()
        answer.set_exception(RecursionError("maximum recursion depth exceeded"))
        return answer

    def boom_follow(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")

    async def main():
        async with chaperone(tmp_path, host) as ch:
            with monkeypatch.context() as m:
                m.setattr(api._StartBatcher, "enqueue", boom)
                with pytest.raises(RecursionError):
                    await ch.start("fake", ["sleep"], id="cut")
                m.setattr(api.AgentClient, "start_follow", boom_follow)
                with pytest.raises(RecursionError):
                    async for _ in ch.run("fake", ["sleep"], id="cut2"):
                        pass
            for run_id in ("cut", "cut2"):
                rec = ch.records.get(run_id)
                assert rec.state == "unknown" and "RecursionError" in rec.error, (rec.state, rec.error)
                with pytest.raises(StartFailed, match="never reached fake"):
                    await ch.wait(run_id)
                assert ch.records.get(run_id).state == "failed"

    go(main())


def test_a_failed_start_started_again_is_recorded_running(tmp_path):
    host = MemoryHost("fake")
    sleeper(host, seconds=5, code=3)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            host.refuse(1)
            with pytest.raises(ConnectFailed):
                await ch.start("fake", ["sleep"], id="again")
            run = await ch.start("fake", ["sleep"], id="again")
            assert host.runs["again"].running
            assert ch.records.get("again").state == "running"
            assert (await run.wait()).return_code == 3

    go(main())


# The host's side: a spool gone, several hosts, signals, clean ----------------------------


def test_a_spool_gone_from_the_host(tmp_path):
    """A run whose spool was removed on its host: status, wait and read say
    so in one error and the record becomes ``lost`` with the reason; clean
    still forgets it."""
    host = MemoryHost("fake")
    sleeper(host, seconds=5)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            for verb in (ch.wait, ch.status):
                run = await ch.start("fake", ["sleep"])
                host.remove(run.id)
                with pytest.raises(NoSuchRun, match="its spool on fake was removed"):
                    await verb(run.id)
                rec = ch.records.get(run.id)
                assert rec.state == "lost" and rec.error == "its spool on fake was removed"
                with pytest.raises(NoSuchRun):
                    await ch.read(run.id)
                await ch.clean(run.id)
                assert ch.records.get(run.id) is None

    go(main())


def test_wait_of_a_run_found_lost_does_not_answer_running(tmp_path):
    host = MemoryHost("fake")
    sleeper(host, seconds=5)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"])
            host.remove(run.id)
            with pytest.raises(NoSuchRun):
                await ch.status(run.id)
            assert ch.records.get(run.id).state == "lost"
            try:
                state = await ch.wait(run.id)
            except NoSuchRun:
                return
            assert state.final, "wait() answered %s" % state.state

    go(main())


def test_refresh_of_several_hosts_with_one_unreachable(tmp_path):
    """``refresh`` asks each host once, all at once: one that cannot be
    reached is reported and its runs stay as they were; the others' runs
    are brought up to date (ended, or lost with their spool)."""
    hosts = [MemoryHost(name, latency=2.0) for name in ("a", "b", "c")]
    for host in hosts:
        sleeper(host, seconds=100)
    a, b, c = hosts

    async def main():
        loop = asyncio.get_running_loop()
        async with chaperone(tmp_path, *hosts) as ch:
            runs = {h.name: [(await ch.start(h.name, ["sleep"])).id for _ in range(2)] for h in hosts}
            await asyncio.sleep(200)
            b.remove(runs["b"][0])
            c.refuse(1, "timeout")
            calls = {h.name: len(h.calls) for h in hosts}
            began = loop.time()
            assert await ch.refresh() == {"a": None, "b": None, "c": "connection to c timed out"}
            assert loop.time() - began == 2.0  # (all at once: one latency, not three)
            assert {h.name: len(h.calls) - calls[h.name] for h in hosts} == {"a": 1, "b": 1, "c": 0}
            assert a.calls[-1][-1] == "list" and b.calls[-1][-1] == "list"
            state = {rid: ch.records.get(rid).state for rids in runs.values() for rid in rids}
            assert [state[r] for r in runs["a"] + runs["b"] + runs["c"]] == [
                "done", "done", "lost", "done", "running", "running"]
            assert ch.records.get(runs["b"][0]).error == "its spool on b was removed"

    go(main())


def test_signals_reach_the_program(tmp_path):
    """A signal not handled ends the program (128+N); a handled one is
    the program's to act on; one it ignores is followed by SIGKILL after
    the grace (SIGTERM: ``kill_grace`` by default); ``config.timeout``
    sends SIGTERM; a finished run is not signalled."""
    host = MemoryHost("fake")
    sleeper(host, seconds=1000)

    @host.program("polite")
    async def polite(p):
        p.trap("SIGTERM", "SIGINT")
        sig = await p.received()
        p.write("stdout", b"got %s\n" % sig.encode())
        return 0

    @host.program("stubborn")
    async def stubborn(p):
        p.trap("SIGTERM")
        while True:
            await p.received()

    async def main():
        loop = asyncio.get_running_loop()
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"])
            assert (await run.signal("TERM")).state == "running"  # (asked; acted on a moment later)
            state = await run.wait()
            assert (state.signal, state.exit_code, host.runs[run.id].signals) == ("SIGTERM", 143, ["SIGTERM"])

            run = await ch.start("fake", ["polite"])
            await run.signal(2)
            state = await run.wait()
            assert (state.return_code, host.runs[run.id].stdout) == (0, b"got SIGINT\n")

            run = await ch.start("fake", ["stubborn"], config={"kill_grace": 7})
            began = loop.time()
            await run.signal("SIGTERM", grace=3)
            assert (await run.wait()).signal == "SIGKILL" and loop.time() - began == 3
            run = await ch.start("fake", ["stubborn"], config={"kill_grace": 7})
            began = loop.time()
            await run.signal("SIGTERM")
            assert (await run.wait()).signal == "SIGKILL" and loop.time() - began == 7
            assert host.runs[run.id].signals == ["SIGTERM", "SIGKILL"]

            run = await ch.start("fake", ["polite"], timeout=60)
            state = await run.wait()
            assert (state.timed_out, state.return_code, host.runs[run.id].stdout) == (True, 0, b"got SIGTERM\n")

            with pytest.raises(AgentFailed, match="is not running") as e:
                await run.signal("TERM")
            assert e.value.agent_code == 1
            with pytest.raises(UsageError, match="unknown signal"):
                await run.signal("NOPE")

    go(main())


def test_clean(tmp_path):
    """clean removes the spool on the host and the record here; a running
    run only with ``force`` (killed first); a run that never started has
    only its record."""
    host = MemoryHost("fake")
    sleeper(host, seconds=100)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"])
            with pytest.raises(AgentFailed, match="is running: kill it first"):
                await run.clean()
            assert run.id in host.runs and ch.records.get(run.id) is not None
            program = host.runs[run.id]
            await run.clean(force=True)
            assert run.id not in host.runs and ch.records.get(run.id) is None
            assert program.state["signal"] == "SIGKILL"

            done = await ch.start("fake", ["sleep"])
            await done.wait()
            await done.clean()
            assert done.id not in host.runs and ch.records.get(done.id) is None

            host.refuse(1)
            with pytest.raises(ConnectFailed):
                await ch.start("fake", ["sleep"], id="never")
            calls = len(host.calls)
            await ch.clean("never")
            assert ch.records.get("never") is None and len(host.calls) == calls

    go(main())


def test_memory_transport_needs_no_ssh_stack():
    """chaperone.transports.memory imports with the standard library and
    chaperone only: with no site-packages at all, it answers an agent call."""
    code = (
        "import sys, asyncio\n"
        "from chaperone.transports.memory import MemoryHost, MemoryTransport, run_virtual\n"
        "from chaperone.client import AgentClient\n"
        "h = MemoryHost('h')\n"
        "async def main():\n"
        "    return await AgentClient(MemoryTransport(h)).list()\n"
        "assert run_virtual(main()) == []\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncssh', 'aiohttp', 'pydantic', 'cryptography', 'click'))\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(REPO), capture_output=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr.decode()


def test_the_documented_example_runs(tmp_path):
    """docs/protocol.md's example of a user's own test runs as written."""
    text = (REPO / "docs" / "protocol.md").read_text().split("## Testing without SSH")[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "docs/protocol.md", "exec"), scope)
    tests = [f for name, f in scope.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0](tmp_path)


# stdin as it comes ----------------------------------------------------------------------


def _cat(host):
    """``cat``: copies its stdin to stdout, then writes how many ends of file it read."""
    @host.program("cat")
    async def cat(p):
        while True:
            data = await p.read()
            if not data:
                break
            p.write("stdout", data)
        p.write("stdout", b"|EOF")
        return 0


@pytest.mark.parametrize("fault", ["break", "disconnect"])
def test_a_stdin_stream_arrives_once_across_dropped_connections(tmp_path, fault):
    """Input given as an async iterable is sent as it comes (the program
    runs meanwhile), every byte once and the end once, while the stdin
    calls' connections drop: after N bytes of their answers, or all at
    once every 0.3 s; each reconnect resumes at what the host holds."""
    host = MemoryHost("fake")
    _cat(host)
    data = bytes(range(256)) * 3000

    async def source():
        for at in range(0, len(data), 7000):
            await asyncio.sleep(0.05)
            yield data[at:at + 7000]

    async def main():
        async with chaperone(tmp_path, host) as ch:
            if fault == "break":
                host.break_after(70, 500, 1, 2000, command="stdin")
            run = await ch.start("fake", ["cat"], stdin=source(), id="in")
            dropper = asyncio.ensure_future(drops_every(host, 0.3, 6)) if fault == "disconnect" else None
            assert host.runs["in"].spec["program"]["stdin"] == {"stream": True}
            assert await run.stdin_sent() == len(data)
            state = await run.wait()
            if dropper is not None:
                dropper.cancel()
            assert state.exit_code == 0
            assert host.runs["in"].stdout == data + b"|EOF"
            assert host.runs["in"].stdin == data and host.runs["in"].stdin_end == len(data)
            assert sum(1 for c in host.calls if "stdin" in c) > 1  # (it did reconnect)

    go(main())


def test_stdin_as_bytes_goes_with_the_start_or_streams_when_large(tmp_path):
    """Bytes up to 1 MiB go in program.json (one call); larger ones, a
    StreamReader, and run() (the foreground) stream; a run that ends
    before reading all of it stops the sending; a bad source is a usage
    error before anything starts."""
    host = MemoryHost("fake")
    _cat(host)

    @host.program("head")
    async def head(p):
        p.write("stdout", (await p.read())[:10])
        return 0

    async def main():
        async with chaperone(tmp_path, host) as ch:
            small = await ch.start("fake", ["cat"], stdin=b"hi\n", id="small")
            assert host.runs["small"].spec["program"]["stdin"] == {"data": "aGkK"}
            assert await small.stdin_sent() is None and (await small.wait()).exit_code == 0
            assert host.runs["small"].stdout == b"hi\n|EOF"
            big = b"x" * ((1 << 20) + 1)
            large = await ch.start("fake", ["cat"], stdin=big, id="large")
            assert await large.stdin_sent() == len(big)
            await large.wait()
            assert host.runs["large"].stdout == big + b"|EOF"
            reader = asyncio.StreamReader()
            reader.feed_data(b"from a reader")
            reader.feed_eof()
            events = [e async for e in ch.run("fake", ["cat"], stdin=reader, id="fg")]
            assert b"".join(e.data for e in events if isinstance(e, OutputChunk)) == b"from a reader|EOF"

            async def endless():
                while True:
                    yield b"y" * 1000
                    await asyncio.sleep(0.01)

            short = await ch.start("fake", ["head"], stdin=endless(), id="short")
            held = await short.stdin_sent()  # (ends: the run is over)
            assert (await short.wait()).exit_code == 0 and held >= 1000
            assert host.runs["short"].stdout == b"y" * 10
            with pytest.raises(UsageError, match="stdin must be bytes"):
                await ch.start("fake", ["cat"], stdin="a str", id="bad")
            assert "bad" not in host.runs

    go(main())


def test_a_negative_offset_is_a_usage_error_in_every_mode(tmp_path):
    """output() with a negative offset: UsageError before any call, as
    read() says it (before: the agent's AgentFailed after a round trip)."""
    host = MemoryHost("fake")
    sleeper(host, seconds=1)

    async def main():
        async with chaperone(tmp_path, host) as ch:
            run = await ch.start("fake", ["sleep"], id="neg")
            for follow in (False, True):
                with pytest.raises(UsageError, match="offset"):
                    async for _ in run.output(offset=-3, follow=follow):
                        pass
            with pytest.raises(UsageError, match="offset"):
                await run.read(offset=-1)

    go(main())


def test_on_update_without_push_is_refused(tmp_path):
    """on_update is called by the callbacks: without push it would never
    be called, in silence (before); now a UsageError says so."""
    with pytest.raises(UsageError, match="on_update needs push=True"):
        Chaperone(tmp_path, on_update=lambda run_id, state: None)
