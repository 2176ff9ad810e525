"""300 runs at once through `chaperone serve` (local runs, real agents,
real HTTPS callbacks): every byte of every run exact, once."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from support.servehelpers import Server, kill_runs

COUNT = 300
# ~20 KB of stdout per run (its tag in every line), a line of stderr.
PROGRAM = ("import sys\n"
           "tag = sys.argv[1].encode()\n"
           "for i in range(400): sys.stdout.buffer.write(b'%d %s \\xff ' % (i, tag) + b'x' * 32 + b'\\n')\n"
           "sys.stdout.flush(); sys.stderr.write('end ' + sys.argv[1])\n")


def expected(tag):
    t = tag.encode()
    return b"".join(b"%d %s \xff " % (i, t) + b"x" * 32 + b"\n" for i in range(400)), b"end " + t


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_300_runs_at_once_every_byte_exact(tmp_path):
    server = Server(tmp_path / "home", heartbeat=5.0).start()
    try:
        c = server.client
        tags = ["load%03d" % i for i in range(COUNT)]
        with ThreadPoolExecutor(32) as pool:
            views = list(pool.map(lambda t: c.start("local", ["python3", "-c", PROGRAM, t], run_id=t), tags))
        assert [v["id"] for v in views] == tags
        with ThreadPoolExecutor(32) as pool:
            ends = list(pool.map(lambda t: c.wait(t, timeout=240), tags))
        bad = [e for e in ends if e["state"] != "done" or e["exit_code"] != 0]
        assert not bad, bad[:3]

        def check(tag):
            out, err = expected(tag)
            got = c.output(tag)
            return got == (out, True) and c.output(tag, "stderr") == (err, True)

        with ThreadPoolExecutor(16) as pool:
            ok = list(pool.map(check, tags))
        assert all(ok), [t for t, good in zip(tags, ok) if not good][:5]
        listed = c.runs(state=["done"])
        assert len(listed) == COUNT
        total = sum(v["stdout_bytes"] for v in listed)
        assert total == sum(len(expected(t)[0]) for t in tags)
    finally:
        server.kill()
        kill_runs(tmp_path)
