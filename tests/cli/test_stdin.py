"""`chaperone run` forwards its stdin as ssh does (issue 10 item 3): piped
input reaches the program as it comes, exact bytes of any size with
bounded memory, across a cut connection (each byte once, one end of file);
a detached run gets /dev/null unless told otherwise."""

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest

from support.helpers import cli_env, read_state, read_terminal, spool_root, wait_for

#: Reads its stdin to its end, copies it to stdout, then says it saw the end.
CAT_EOF = "cat; printf '|EOF'"


def argv(sshd, host, spool, *args):
    base = [sys.executable, "-m", "chaperone.cli"]
    if host == "testhost":
        base += ["-F", str(sshd.config_file)]
    return base + ["run", "--spool", str(spool), host] + list(args)


def popen(home, cmd, env=None, **kw):
    return subprocess.Popen(cmd, env=cli_env(home, **(env or {})), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(home), **kw)


def read_some(stream, want: bytes, timeout=30.0) -> bytes:
    """Read ``stream`` (a pipe) until it holds ``want``."""
    got = b""
    end = time.monotonic() + timeout
    while want not in got:
        assert time.monotonic() < end, got
        chunk = os.read(stream.fileno(), 65536)
        assert chunk, got
        got += chunk
    return got


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["local", "testhost"])
def test_piped_stdin_reaches_the_program_as_it_comes(sshd, home, tmp_path, host):
    """`producer | chaperone run HOST [--stdin -] -- sh -c 'cat; ...'`: the program gets
    the first line while the producer is still writing (the program's
    answer comes back before the rest is written), then binary, invalid
    UTF-8 bytes without a trailing newline, exactly, and end of file once."""
    given = ["--stdin", "-"] if host == "testhost" else []  # (the same: this process's stdin)
    p = popen(home, argv(sshd, host, tmp_path / "spool", "--id", "live", *given, "--", "sh", "-c", CAT_EOF))
    try:
        p.stdin.write(b"hi\n")
        p.stdin.flush()
        assert read_some(p.stdout, b"hi\n") == b"hi\n"
        rest = bytes(range(256)) * 64 + b"\xff\xfe\xc3(\x00no newline"
        p.stdin.write(rest)
        p.stdin.close()
        out = p.stdout.read()
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        p.kill()
        p.wait()
    assert out == rest + b"|EOF"
    assert (tmp_path / "spool" / "live" / "stdin").read_bytes() == b"hi\n" + rest


#: Writes N MiB of bytes that are not text, deterministic.
PRODUCER = ("import hashlib,sys\n"
            "for i in range(int(sys.argv[1])):\n"
            "    sys.stdout.buffer.write(hashlib.sha256(b'%d' % i).digest() * 32768)\n")
MEASURED = ("import resource,subprocess,sys\n"
            "code = subprocess.call(sys.argv[1:])\n"
            "sys.stderr.write('\\nmaxrss=%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(code)\n")


@pytest.mark.timeout(120)
def test_stdin_larger_than_12_mib_streams_with_bounded_memory(sshd, home, tmp_path):
    """64 MiB piped in over SSH arrive exact (a hash on the host); the
    client's largest resident size (about 40-50 MiB for Python, asyncssh
    and all) stays below the input's size (one that holds it all is over
    100 MiB)."""
    mib = 64
    expected = hashlib.sha256(b"".join(hashlib.sha256(b"%d" % i).digest() * 32768 for i in range(mib))).hexdigest()
    cmd = [sys.executable, "-c", MEASURED] + argv(sshd, "testhost", tmp_path / "spool", "--id", "big", "--",
                                                   "sha256sum")
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(mib)], stdout=subprocess.PIPE)
    try:
        res = subprocess.run(cmd, stdin=producer.stdout, env=cli_env(home), capture_output=True, timeout=110,
                             cwd=str(home))
    finally:
        producer.stdout.close()
        producer.wait()
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].decode() == expected
    maxrss_kib = int(res.stderr.rsplit(b"maxrss=", 1)[1])
    assert maxrss_kib < mib << 10, "the client held %d KiB for %d MiB of input" % (maxrss_kib, mib)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_a_cut_connection_mid_input_loses_and_repeats_nothing(sshd, home, tmp_path, client):
    """Half of the input is on the host when every SSH session to it is
    killed; the rest is written after: the program gets every byte once, in
    order, and end of file once (OpenSSH's ssh and asyncssh)."""
    spool = tmp_path / "spool"
    p = popen(home, argv(sshd, "testhost", spool, "--id", "cut", "--", "sh", "-c", CAT_EOF),
              env={"CHAPERONE_SSH_CLIENT": client})
    first = hashlib.sha256(b"first").digest() * 40000  # 1.28 MB
    second = hashlib.sha256(b"second").digest() * 40000
    outs = {}
    readers = [threading.Thread(target=lambda name: outs.__setitem__(name, getattr(p, name).read()), args=(name,))
               for name in ("stdout", "stderr")]  # (cat's output flows while the input is written)
    for r in readers:
        r.start()
    try:
        p.stdin.write(first)
        p.stdin.flush()
        held = spool / "cut" / "stdin"
        end = time.monotonic() + 30
        while not (held.exists() and held.stat().st_size == len(first)):
            assert time.monotonic() < end and p.poll() is None, (held.exists() and held.stat().st_size, p.poll())
            time.sleep(0.05)
        assert sshd.kill_sessions(), "no SSH session to kill"
        p.stdin.write(second)
        p.stdin.close()
        code = p.wait(60)
    finally:
        p.kill()
        p.wait()
        for r in readers:
            r.join()
    out, err = outs["stdout"], outs["stderr"]
    assert code == 0, err
    assert b"reconnecting" in err, err
    assert out == first + second + b"|EOF"
    assert held.read_bytes() == first + second
    assert (spool / "cut" / "stdin.end").read_text().strip() == str(len(first + second))


@pytest.mark.timeout(60)
def test_detached_gets_dev_null_unless_told(home, tmp_path):
    """`echo hi | run -d`: the program reads /dev/null; `run -d --stdin FILE`
    of more than 12 MiB: all of it (streamed; run -d returns once it is on
    the host)."""
    env = cli_env(home)
    base = [sys.executable, "-m", "chaperone.cli"]
    piped = subprocess.run(base + ["run", "-d", "--id", "null", "local", "--", "sh", "-c",
                                   "readlink /proc/self/fd/0; cat"],
                           input=b"hi\n", env=env, capture_output=True, timeout=30, cwd=str(home))
    assert piped.returncode == 0, piped.stderr
    big = tmp_path / "big.bin"
    data = os.urandom(13 << 20)
    big.write_bytes(data)
    told = subprocess.run(base + ["run", "-d", "--id", "file", "--stdin", str(big), "local", "--", "sha256sum"],
                          stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=30, cwd=str(home))
    assert told.returncode == 0, told.stderr
    root = spool_root(home)
    for run_id in ("null", "file"):
        wait_for(lambda: read_state(root, run_id)["state"] == "done", 20, what="run %s to end" % run_id)
    assert (root / "null" / "stdout").read_bytes() == b"/dev/null\n"
    assert (root / "file" / "stdout").read_bytes().split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(60)
def test_on_a_terminal_a_hint_and_t_without_one_warns(home):
    """From a terminal without -t, a program that reads its stdin (cat)
    meets /dev/null: one line on stderr says so rather than silence.  `-t`
    without a terminal on stdin is ssh's warning, and the program runs
    without one (tests/cli/test_tty.py has -t itself; it was a usage error
    before it existed)."""
    import pty

    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "chaperone.cli", "run", "--id", "typed", "local", "--",
                              "sh", "-c", "cat; echo done"],
                             stdin=slave, stdout=slave, stderr=slave, env=cli_env(home), cwd=str(home))
        os.close(slave)
        slave = None
        got = read_terminal(master)
        assert p.wait(30) == 0, got
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    lines = got.decode().splitlines()
    assert lines == ["chaperone: run typed on local (no terminal there: stdin is /dev/null; -t gives it this "
                     "terminal, --stdin - what you type)", "done"], got
    res = subprocess.run([sys.executable, "-m", "chaperone.cli", "run", "-t", "local", "--", "sh", "-c",
                          "test -t 0 || echo no terminal"],
                         env=cli_env(home), capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stdout == b"no terminal\n"
    assert res.stderr.decode() == ("chaperone: Pseudo-terminal will not be allocated because stdin is not a "
                                   "terminal (-tt forces one).\n")


@pytest.mark.timeout(30)
def test_reading_a_pipe_never_blocks_the_event_loop():
    """chaperone.feed.read_fd on a blocking pipe (the CLI's stdin, whose
    mode is left alone) that another thread fills: all of it, exact, and
    once it is empty the event loop goes on (a stale readiness followed by
    a read would stop it until more comes: seen as a stalled input)."""
    import asyncio

    from chaperone.feed import read_fd

    data = os.urandom(1280000)
    for _ in range(3):
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: [os.write(w, data[at:at + 100000])
                                                  for at in range(0, len(data), 100000)])
        unblock = threading.Timer(3.0, os.write, (w, b"!"))  # (ends a read that blocks the loop)

        async def main():
            got = bytearray()
            it = read_fd(r, 65536).__aiter__()
            writer.start()
            while len(got) < len(data):
                got += await it.__anext__()
            assert bytes(got) == data
            unblock.start()
            nxt = asyncio.ensure_future(it.__anext__())
            t0 = time.monotonic()
            await asyncio.sleep(0.3)
            waited = time.monotonic() - t0
            unblock.cancel()
            os.close(w)
            try:
                extra = await nxt
            except StopAsyncIteration:  # (the end of the pipe)
                extra = b""
            await it.aclose()
            return waited, extra

        try:
            waited, extra = asyncio.run(main())
            assert waited < 2.0 and extra == b"", "the event loop was blocked in a read"
        finally:
            writer.join()
            unblock.cancel()
            os.close(r)


def test_shared_input_each_reader_at_its_own_pace():
    """feed.SharedInput: the source read once; each reader gets every byte
    from the first, in order, as it comes: a fast one, a slow one, and one
    that starts after the source ended; a source that fails says so to
    every reader."""
    import asyncio

    from chaperone.errors import ChaperoneError
    from chaperone.feed import SharedInput

    parts = [bytes([i]) * 100_000 for i in range(30)]
    whole = b"".join(parts)

    async def source():
        for part in parts:
            yield part
            await asyncio.sleep(0)

    async def read(it, pause=0.0):
        got = []
        async for data in it:
            got.append(data)
            if pause:
                await asyncio.sleep(pause)
        return b"".join(got)

    async def main():
        shared = SharedInput(source())
        fast, slow = await asyncio.gather(read(shared.reader()), read(shared.reader(), 0.001))
        late = await read(shared.reader())
        shared.close()

        async def broken():
            yield b"abc"
            raise OSError(5, "Input/output error")

        bad = SharedInput(broken())
        try:
            await read(bad.reader())
        except ChaperoneError as e:
            failed = str(e)
        else:
            failed = None
        bad.close()
        return fast, slow, late, failed

    fast, slow, late, failed = asyncio.run(main())
    assert fast == slow == late == whole
    assert failed is not None and "after 3 bytes" in failed and "Input/output error" in failed
