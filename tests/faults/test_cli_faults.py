"""Faults and hostile input at the command line (issue 12): a burst of
detached runs at a stock sshd, `wait` while the host is unreachable,
private files under CHAPERONE_HOME after every kind of run, and the CLI's
arguments fuzzed (never a traceback, never a program started from invalid
input)."""

import asyncio
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from support.helpers import CLI, cli_env, unique


def run_cli(home, *args, env=None, timeout=90, **kw):
    e = cli_env(home)
    e.update(env or {})
    return subprocess.run(CLI + [str(a) for a in args], env=e, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=str(home), **kw)


@pytest.fixture(scope="module")
def strict_sshd():
    """An sshd stricter than a stock one (MaxStartups 2:50:6 instead of
    10:30:100), so that this machine's bursts surely cross it."""
    from support.sshd import SSHD, require_sshd

    require_sshd()
    server = SSHD(max_startups="2:50:6", log_level="ERROR").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_a_burst_of_detached_runs_past_maxstartups(strict_sshd, tmp_path):
    """50 `chaperone run -d` at once at one host whose sshd drops connections
    past its MaxStartups: each is retried (nothing ran), every run starts,
    and none says its connection was lost."""
    home = tmp_path / "home"
    home.mkdir()
    n = 50
    argv = [sys.executable, "-m", "chaperone", "-F", strict_sshd.config_file]
    procs = [subprocess.Popen(argv + ["run", "-d", "--id", "burst-%d" % i, "--spool", str(tmp_path / "spool"),
                                      "testhost", "--", "true"],
                              env=cli_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=str(home)) for i in range(n)]
    results = [(p.wait(170), p.stdout.read(), p.stderr.read()) for p in procs]
    failed = [(i, r) for i, r in enumerate(results) if r[0] != 0]
    assert not failed, failed[:3]
    assert [r[1] for r in results] == [b"burst-%d\n" % i for i in range(n)]
    assert not any(b"lost" in r[2] or b"Traceback" in r[2] for r in results)
    ps = run_cli(home, "ps", "-a", "--json", "--cached")
    assert sorted(i["id"] for i in json.loads(ps.stdout)) == sorted("burst-%d" % i for i in range(n))


@pytest.mark.timeout(120)
def test_wait_says_when_the_host_is_unreachable_and_goes_on(tmp_path):
    """`wait` while the host's sshd is down: one line that it reconnects,
    then the run's exit status once sshd is back (same port, same key)."""
    from support.sshd import SSHD, require_sshd

    require_sshd()
    home = tmp_path / "home"
    home.mkdir()
    server = SSHD(log_level="ERROR").start()
    try:
        gate = tmp_path / "gate"
        env = {"CHAPERONE_SSH_CLIENT": "openssh"}
        argv = ["-F", server.config_file, "run", "-d", "--id", "w1", "--spool", str(tmp_path / "spool"),
                "testhost", "--", "sh", "-c", "while [ ! -e %s ]; do sleep 0.1; done; exit 7" % gate]
        res = run_cli(home, *argv, env=env)
        assert res.returncode == 0, res.stderr
        waiter = subprocess.Popen(CLI + ["-F", server.config_file, "wait", "w1"], env=dict(cli_env(home), **env),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=str(home))
        time.sleep(2.0)
        server.stop(remove=False)  # the listener and every session gone
        time.sleep(4.0)
        gate.touch()  # the program ends while its host cannot be reached
        assert waiter.poll() is None
        server.restart()  # the same port and host key
        out, err = waiter.communicate(timeout=90)
        assert waiter.returncode == 7, err
        assert b"reconnecting" in err and b"Traceback" not in err
    finally:
        gate.touch()
        server.stop()


def _walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        yield dirpath
        for name in filenames:
            yield os.path.join(dirpath, name)


@pytest.mark.timeout(120)
def test_everything_under_chaperone_home_is_private(tmp_path):
    """After a foreground run, a detached run, a failed start, a push-mode
    run (mirror, certificate) and the server (its token and files): every
    directory under CHAPERONE_HOME is 0700 and every file 0600, also the
    database's journal files while it is open."""
    from support.servehelpers import Server

    from chaperone import Chaperone

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    assert run_cli(home, "run", "local", "--", "echo", "hi").returncode == 0
    assert run_cli(home, "run", "-d", "local", "--", "true").returncode == 0
    assert run_cli(home, "run", "-p", "9", "127.0.0.1", "--", "true").returncode == 255

    async def pushed():
        async with Chaperone(home, push=True) as ch:
            run = await ch.start("local", ["echo", "pushed"])
            await run.wait()
            journal = [p for p in _walk(home) if p.endswith(("-wal", "-shm"))]
            return journal, [(p, os.stat(p).st_mode) for p in _walk(home)]

    journal, while_open = asyncio.run(pushed())
    server = Server(home).start()
    try:
        assert server.client.runs()
    finally:
        server.stop()
    seen = [(p, os.lstat(p).st_mode) for p in _walk(home)] + while_open
    # (the test harness's own log of the server, not chaperone's)
    seen = [(p, m) for p, m in seen if not (os.path.basename(p).startswith("serve-") and p.endswith(".log"))]
    bad = [(p, oct(stat.S_IMODE(m))) for p, m in seen
           if stat.S_IMODE(m) != (0o700 if stat.S_ISDIR(m) else 0o600) and not stat.S_ISSOCK(m)]
    assert not bad, bad
    assert any("mirror" in p for p, _ in seen) and any("tls" in p for p, _ in seen)
    assert any(os.sep + "serve" + os.sep in p for p, _ in seen)


def test_the_cli_s_arguments_fuzzed(tmp_path, monkeypatch):
    """Random command lines through the real CLI, in this process, with the
    library's start/run replaced by a recorder: never a traceback, an exit
    status always, a usage error always one line, and a program would be
    started only from a command line that names a host and a command."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    from chaperone import cli as cli_pkg
    from chaperone.api import Chaperone

    started = []

    class Started(BaseException):  # (not an Exception: no handler of the CLI's may take it)
        pass

    async def fake_start(self, host, command, **kw):
        started.append((host, command))
        raise Started()

    async def fake_run(self, host, command, **kw):
        started.append((host, command))
        raise Started()
        yield  # (an async generator)

    monkeypatch.setattr(Chaperone, "start", fake_start)
    monkeypatch.setattr(Chaperone, "run", fake_run)
    monkeypatch.setenv("CHAPERONE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHAPERONE_SERVER", "off")
    app = cli_pkg.application()
    words = st.sampled_from([
        "run", "ps", "status", "logs", "wait", "kill", "clean", "prune", "local", "gpu1", "-d", "-t", "-T", "-n",
        "--", "-p", "-l", "-i", "-o", "-J", "-F", "-e", "--id", "--timeout", "--kill-grace", "--json", "-q",
        "-s", "--grace", "-a", "-f", "--tail", "--state", "--host", "-H", "x=y", "=", "5s", "-1", "inf", "nan",
        "1e308", "ssh://u@h:22", "h:99999", "a b", "\x00", "\udcff", "é", "--no-host-key-check", "-h",
        "--version", "", "-", "--stdin", "/dev/null", "/nonexistent", "echo", "$HOME", "KILL", "0"])
    commands = st.sampled_from(["run", "ps", "status", "logs", "wait", "kill", "clean", "prune", "rm", "inspect"])
    budget = int(os.environ.get("CHAPERONE_FUZZ_EXAMPLES", "200"))
    seen_codes = set()
    ran = []

    @settings(max_examples=budget, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(commands, st.lists(words, max_size=7)).map(lambda t: [t[0]] + t[1]))
    def one(argv):
        import contextlib
        import io

        ran.append(argv)
        before = len(started)
        code = None
        # (with .buffer, and Python's own error handlers: strict stdout, backslashreplace stderr)
        err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
                    io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)):
                app.main(args=list(argv), prog_name="chaperone")
        except SystemExit as e:
            code = e.code
        except Started:
            code = "started"
        seen_codes.add(code)
        text = err.buffer.getvalue().decode("utf-8", "replace")
        assert code is None or isinstance(code, int) or code == "started", (argv, code)
        assert "Traceback" not in text and "internal error" not in text, (argv, text)
        if code == 2:  # one line per error (per bad id, for commands that take several)
            lines = text.strip().splitlines()
            assert lines and all(line.startswith("chaperone: ") for line in lines), (argv, text)
        if len(started) > before:
            host, command = started[-1]
            assert argv[0] == "run" and host not in ("", "-") and command, (argv, started[-1])

    one()
    assert seen_codes & {2} and len(seen_codes) > 2
    print("cli fuzz: %d command lines, %d distinct, exit statuses %s"
          % (len(ran), len({tuple(a) for a in ran}), sorted(seen_codes, key=str)))
    assert len(ran) >= budget


def test_arguments_that_are_not_utf8_pass_through(tmp_path):
    """An argument with bytes that are not UTF-8 (found by the fuzzer: the
    record could not be stored) reaches the program exactly, and ps shows it
    escaped."""
    home = tmp_path / "home"
    home.mkdir()
    res = subprocess.run(CLI + ["run", "--id", "nonutf8", "local", "--", "printf", "%s", os.fsdecode(b"a\xffb")],
                         env=cli_env(home), capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                         cwd=str(home))
    assert (res.returncode, res.stdout) == (0, b"a\xffb"), res.stderr
    ps = run_cli(home, "ps", "-a")
    assert b"a\\xffb" in ps.stdout and ps.returncode == 0


@pytest.mark.timeout(60)
def test_status_of_a_run_on_a_host_out_of_reach_is_last_seen_and_bounded(sshd, tmp_path):
    """``status ID`` when its host refuses, or never answers: within
    ``--timeout``, one line on stderr, the row as last seen ("running (seen
    ... ago)", no duration that grows), exit 1 as docs/cli.md says (before:
    shown as current, 255, and a host that never answered took 15 s
    whatever --timeout said)."""
    import socket

    from support.sshd import free_port

    home = tmp_path / "home"
    home.mkdir()
    run_id = unique("far")
    res = run_cli(home, "-F", sshd.config_file, "run", "-d", "--id", run_id, "testhost", "--", "sleep", "60")
    assert res.returncode == 0, res.stderr
    try:
        refused = run_cli(home, "-F", sshd.config_file, "status", "-p", str(free_port()), "--timeout", "5s", run_id)
        with socket.socket() as silent:  # (completes TCP handshakes, never says a word)
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            start = time.monotonic()
            hung = run_cli(home, "-F", sshd.config_file, "status", "-p", str(silent.getsockname()[1]),
                           "--timeout", "2s", run_id)
            took = time.monotonic() - start
        for res in (refused, hung):
            out, err = res.stdout.decode(), res.stderr.decode()
            assert res.returncode == 1, err
            assert "running (seen" in out and err.count("\n") == 1 and run_id in err, (out, err)
        assert took < 8, took
        # ps too: the row as last seen, no duration, and which host could not be reached
        ps = run_cli(home, "-F", sshd.config_file, "ps", "-p", str(free_port()), "--timeout", "5s")
        row = [line for line in ps.stdout.decode().splitlines() if line.startswith(run_id)][0]
        assert "running (seen" in row and " - " in row, row
        assert ps.stderr.decode().startswith("chaperone: could not reach testhost"), ps.stderr
    finally:
        run_cli(home, "-F", sshd.config_file, "kill", "-s", "KILL", run_id)


@pytest.mark.timeout(90)
def test_a_host_name_reached_two_ways_one_down_shows_only_that_ones_runs_as_last_seen(sshd, tmp_path):
    """Two runs on "testhost", started with two SSH configs; the second
    config's port then dead: ``ps``, ``ps --format`` and ``status`` show the
    first run as current and the second as last seen (before: both as
    current, and no word of the host that could not be reached, as the
    answers were kept by host name and the reachable one's won)."""
    from support.sshd import free_port

    home = tmp_path / "home"
    home.mkdir()
    cfg2 = tmp_path / "ssh_config2"
    text = open(sshd.config_file).read()
    cfg2.write_text(text)
    near, far = unique("near"), unique("far2")
    for run_id, cfg in ((near, sshd.config_file), (far, cfg2)):
        res = run_cli(home, "-F", cfg, "run", "-d", "--id", run_id, "testhost", "--", "sleep", "60")
        assert res.returncode == 0, res.stderr
    assert "Port %d" % sshd.port in text
    cfg2.write_text(text.replace("Port %d" % sshd.port, "Port %d" % free_port()))
    try:
        ps = run_cli(home, "ps", "--timeout", "5s")
        rows = {line.split()[0]: line for line in ps.stdout.decode().splitlines()[1:]}
        assert "running (seen" not in rows[near] and "running (seen" in rows[far] and " - " in rows[far], rows
        assert ps.stderr.decode().startswith("chaperone: could not reach testhost"), ps.stderr
        fmt = run_cli(home, "ps", "--timeout", "5s", "--format", "{{.ID}}={{.Status}}").stdout.decode().split()
        statuses = dict(item.split("=", 1) for item in fmt if "=" in item)
        assert statuses[near].startswith("running") and "(seen" not in statuses[near], fmt
        assert "(seen" in " ".join(fmt[fmt.index(far + "=running"):]), fmt
        st = run_cli(home, "status", "--timeout", "5s")
        rows = {line.split()[0]: line for line in st.stdout.decode().splitlines()[1:]}
        assert st.returncode == 1 and "(seen" not in rows[near] and "running (seen" in rows[far], rows
    finally:
        for run_id in (near, far):
            run_cli(home, "-F", sshd.config_file, "kill", "-s", "KILL", run_id)
