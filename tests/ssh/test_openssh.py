"""The OpenSSH client transport (the CLI's default): one shared connection
per command through a control master started before the CLI's imports,
which never outlives the CLI, and honours the user's own multiplexing."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from support.helpers import CLI, cli_env

MAIN = [sys.executable, "-m", "chaperone"]


def chaperone(sshd, home, *args, cli=MAIN, timeout=60, **env):
    return subprocess.run(cli + ["-F", sshd.config_file] + [str(a) for a in args],
                          env=cli_env(home, CHAPERONE_SSH_CLIENT="openssh", **env), cwd=str(home),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def logins(sshd):
    with open(sshd.log_file, errors="replace") as f:
        return f.read().count("Accepted publickey")


def masters(tag):
    """Pids of ssh control masters whose command line mentions ``tag``."""
    out = subprocess.run(["pgrep", "-f", "%s.*ControlMaster=yes" % tag], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _master_dir(pid):
    """The directory of the control socket in a master's command line."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().decode().split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == "-S":
            return os.path.dirname(argv[i + 1])
    return None


def ssh_processes(tag):
    """Pids of ssh processes (masters, sessions) whose command line mentions ``tag``."""
    out = subprocess.run(["pgrep", "-f", "^[^ ]*ssh .*%s" % tag], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def no_ssh_left(tag, timeout=5.0):
    return _none_left(ssh_processes, tag, timeout)


def no_masters_left(tag, timeout=5.0):
    return _none_left(masters, tag, timeout)


def _none_left(find, tag, timeout):
    """Masters and sessions are stopped without waiting for them (ssh takes
    a few ms to say goodbye): wait a moment for them to go."""
    deadline = time.monotonic() + timeout
    while find(tag):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(60)
def test_a_command_logs_in_once_and_leaves_no_master(sshd, tmp_path):
    spool = tmp_path / "spool"
    chaperone(sshd, tmp_path, "run", "--spool", spool, "testhost", "--", "true")  # ships the agent if needed
    before = logins(sshd)
    res = chaperone(sshd, tmp_path, "run", "--spool", spool, "--id", "once", "testhost", "--",
                    "sh", "-c", "printf 'a\\0b'; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, b"a\0b", b"")
    # status and logs: each one login too (the record says where the run is).
    res = chaperone(sshd, tmp_path, "status", "once", "--json")
    assert res.returncode == 0, res.stderr
    res = chaperone(sshd, tmp_path, "logs", "once")
    assert (res.returncode, res.stdout) == (0, b"a\0b")
    deadline = time.monotonic() + 5
    while logins(sshd) - before < 3 and time.monotonic() < deadline:
        time.sleep(0.05)  # sshd logs asynchronously
    assert logins(sshd) - before == 3
    assert no_masters_left(sshd.config_file)


@pytest.mark.timeout(60)
def test_the_standby_session_is_the_one_the_command_uses(sshd, tmp_path, monkeypatch):
    """``python -m chaperone`` starts an SSH session before its imports;
    the first call of the transport the CLI then builds must run on it
    (same options), for ``run HOST`` and for ``status ID``, and no master
    may be started meanwhile: a guess that never matches, or a second
    connection, would cost a second handshake on every command."""
    from chaperone import __main__ as entry
    from chaperone.transports.ssh import master, options as ssh_opts, process
    from chaperone.api import Chaperone

    monkeypatch.setenv("CHAPERONE_HOME", str(tmp_path))
    monkeypatch.setenv("CHAPERONE_SSH_CLIENT", "openssh")

    async def main():
        entry._speculate(["-F", sshd.config_file, "run", "-p", str(sshd.port), "--no-host-key-check",
                          "--spool", str(tmp_path / "spool"), "--id", "spec", "testhost", "--", "true"])
        standby = master._standby
        assert isinstance(standby, master.Standby)
        async with Chaperone(ssh_config=[sshd.config_file], check_host_keys=False,
                             ssh_client="openssh") as ch:
            ssh = {"port": sshd.port, "root": str(tmp_path / "spool")}
            ch.preconnect("testhost", ssh)
            transport = ch.transport("testhost", **ssh)
            assert master._standby is standby and transport._master is None
            run = await ch.start("testhost", ["true"], run_id="spec", ssh=ssh)
            assert master._standby is None and transport._master is None
            assert standby.proc.returncode == 0  # (it ran the start)
            await ch.wait(run.id)

        entry._speculate(["-F", sshd.config_file, "status", "spec"])
        standby = master._standby
        assert isinstance(standby, master.Standby)
        async with Chaperone(ssh_config=[sshd.config_file], ssh_client="openssh") as ch:
            ch.preconnect_run("spec")
            transport = ch.client("spec").transport
            assert master._standby is standby and transport._master is None
            assert (await ch.status("spec")).state == "done"
            assert master._standby is None and transport._master is None

    asyncio.run(main())
    assert no_ssh_left(sshd.config_file)


@pytest.mark.timeout(60)
def test_a_standby_session_runs_its_command_exactly(sshd, tmp_path):
    """The command goes over stdin as one escaped line; quotes, $,
    backslashes, % and newlines arrive as they would in ``ssh HOST CMD``,
    and the rest of stdin is the command's."""
    from chaperone.transports.ssh import master, options as ssh_opts, process

    command = ("printf '%s|' 'a\\b' \"$HOME\" '%d' \"it's\"; printf 'x\ny\\n'; echo; "
               "cat; echo \"tab\there\"")
    from chaperone.transports.target import Target

    options = ssh_opts.ssh_options("ssh", Target("testhost", config=[sshd.config_file]))
    direct = subprocess.run(ssh_opts.direct_argv(options, "testhost", command, True), input=b"in\0put",
                            capture_output=True, timeout=30)
    standby = master.Standby(options, "testhost", True)
    try:
        standby.proc.stdin.write(master.standby_input(command) + b"in\0put")
        standby.proc.stdin.close()
        out, err = standby.proc.stdout.read(), standby.proc.stderr.read()  # (small: no deadlock)
        standby.proc.wait(30)
    finally:
        standby.stop()
    assert (standby.proc.returncode, out, err) == (direct.returncode, direct.stdout, direct.stderr)
    assert out == b"a\\b|%s|%%d|it's|x\ny\n\nin\0puttab\there\n" % os.environ["HOME"].encode()

    # Unused, it ends doing nothing; stopped, no ssh is left.
    standby = master.Standby(options, "testhost", True)
    standby.proc.stdin.close()
    assert standby.proc.wait(30) == 0
    assert standby.proc.stdout.read() == b""
    standby.stop()
    standby = master.Standby(options, "testhost", True)
    standby.stop()
    assert standby.proc.wait(10) != 0
    assert no_ssh_left(sshd.config_file)


def test_guesses_only_what_it_understands():
    from chaperone.__main__ import _guess

    assert _guess(["run", "local", "--", "true"]) is None
    assert _guess(["run", "--frobnicate", "h", "--", "true"]) is None
    assert _guess(["-F", "a", "-F", "b", "run", "h", "--", "true"]) is None
    assert _guess(["ps"]) is None
    target = _guess(["run", "-l", "bob", "-i", "k1", "--identity=k2", "-p", "2222", "-d", "h", "--", "x"])
    assert (target.name, target.destination) == ("h", "h")
    assert (target.config, target.port, target.user, target.identities, target.check_host_keys) == (
        (), 2222, "bob", ("k1", "k2"), True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("calls", ["one", "more"])
def test_no_ssh_outlives_a_killed_cli(sshd, tmp_path, calls):
    """SIGKILL the CLI while it follows a run: its SSH session (the standby
    session it started with) and, after a reconnect, its control master
    and the master's directory are gone soon after; the run goes on."""
    flag = tmp_path / "started"
    proc = subprocess.Popen(MAIN + ["-F", sshd.config_file, "run", "--spool", str(tmp_path / "spool"), "--id", "orphan",
                                    "testhost", "--", "sh", "-c", "touch %s; sleep 30" % flag],
                            env=cli_env(tmp_path, CHAPERONE_SSH_CLIENT="openssh"), cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not flag.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        assert ssh_processes(sshd.config_file), "the run is followed over SSH"
        dirs = set()
        if calls == "more":
            # Cut the session: the CLI reconnects, over a control master.
            sshd.kill_sessions()
            deadline = time.monotonic() + 20
            while not dirs:
                assert time.monotonic() < deadline and proc.poll() is None
                dirs = {_master_dir(m) for m in masters(sshd.config_file)} - {None}
                time.sleep(0.05)
            assert all(os.path.isdir(d) for d in dirs)
        # The agent process following the run for the CLI: the one the
        # run's supervisor was forked from (start --follow), or, after a
        # reconnect, the follow whose session the CLI uses.
        supervisor = json.loads((tmp_path / "spool" / "orphan" / "state.json").read_text())["agent_pid"]
        if calls == "one":
            follower = psutil.Process(supervisor).ppid()
        else:
            spool = str(tmp_path / "spool")

            def reconnected():
                # (this test's spool: not a follow of another test's run "orphan"; the newest: the one
                # that followed the cut session may not have seen it gone yet on a loaded machine)
                found = [p for p in psutil.process_iter(["cmdline", "create_time"])
                         if "follow" in (p.info["cmdline"] or []) and "orphan" in p.info["cmdline"]
                         and spool in " ".join(p.info["cmdline"])]
                return [p.pid for p in sorted(found, key=lambda p: p.info["create_time"])]

            deadline = time.monotonic() + 20
            while not reconnected():
                assert time.monotonic() < deadline, "the CLI did not follow again"
                time.sleep(0.05)
            follower = reconnected()[-1]
        assert "--marker" in psutil.Process(follower).cmdline()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert no_ssh_left(sshd.config_file, 10), "an ssh process outlived its CLI"
        # ... and on the host, the agent that followed the run for it sees
        # the session gone and ends, though the run has no output to send.
        deadline = time.monotonic() + 10
        while psutil.pid_exists(follower) and psutil.Process(follower).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "an agent kept following for a dead client"
            time.sleep(0.05)
        assert psutil.pid_exists(supervisor), "the run goes on"
        deadline = time.monotonic() + 10
        while any(os.path.exists(d) for d in dirs):  # a master's directory (socket, stderr) goes too
            assert time.monotonic() < deadline, dirs
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        # The run itself goes on (detached): stop it.
        res = subprocess.run(CLI + ["-F", sshd.config_file, "kill", "-s", "KILL", "orphan"],
                             env=cli_env(tmp_path), capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr


@pytest.mark.timeout(60)
def test_the_users_own_multiplexing_is_left_alone(sshd, tmp_path):
    """A config with ControlMaster/ControlPath: chaperone starts no master
    of its own (ssh then multiplexes the user's way)."""
    from chaperone.transports.ssh.via_openssh import OpenSSHTransport
    from chaperone.transports.target import Target

    cfg = tmp_path / "cfg"
    cfg.write_text(open(sshd.config_file).read() + "    ControlPath none\n")
    assert OpenSSHTransport(Target("testhost", config=[str(cfg)])).multiplex is False
    assert OpenSSHTransport(Target("testhost", config=[sshd.config_file])).multiplex is True
    res = subprocess.run(MAIN + ["-F", str(cfg), "run", "--spool", str(tmp_path / "spool"), "testhost",
                                 "--", "echo", "mine"],
                         env=cli_env(tmp_path, CHAPERONE_SSH_CLIENT="openssh"), cwd=str(tmp_path),
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"mine\n", b"")
    assert no_masters_left(str(cfg))


@pytest.mark.timeout(90)
def test_calls_past_max_sessions_get_a_connection_of_their_own(tmp_path):
    """A server that allows 2 sessions per connection, 4 follows at once:
    the first 2 share the master, the others connect on their own instead
    of being refused ("open failed") or queued behind the long follows."""
    from chaperone.api import Chaperone
    from chaperone.protocol import OutputChunk
    from support.sshd import SSHD, require_sshd

    require_sshd()
    flag = tmp_path / "go"
    with SSHD(max_sessions=2) as server:
        async def main():
            async with Chaperone(home=tmp_path, ssh_config=[server.config_file], ssh_client="openssh",
                                 max_sessions=2) as ch:
                ssh = {"root": str(tmp_path / "spool")}
                transport = ch.transport("testhost", **ssh)

                async def one(i):
                    out = b""
                    argv = ["sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; echo f%d" % (flag, i)]
                    async for event in ch.run("testhost", argv, ssh=ssh):
                        if isinstance(event, OutputChunk):
                            out += event.data
                    return out

                tasks = [asyncio.ensure_future(one(i)) for i in range(4)]
                try:
                    deadline = time.monotonic() + 30
                    while len(transport._procs) < 4:
                        assert time.monotonic() < deadline and not any(t.done() for t in tasks), \
                            [t.exception() for t in tasks if t.done()]
                        await asyncio.sleep(0.05)
                    assert transport._muxed == 2
                finally:
                    flag.touch()  # the programs end either way
                return await asyncio.gather(*tasks)

        assert asyncio.run(main()) == [b"f%d\n" % i for i in range(4)]


def test_child_is_spawned_like_popen_with_close_fds_and_a_new_session(tmp_path):
    """process.Child (posix_spawn, for a fast head start) keeps
    subprocess.Popen's guarantees that the watchdog and ssh rely on: only
    fds 0-2 and the kept ones are inherited (also inheritable fds this
    process got from its parent), a session of its own, SIGPIPE back to
    its default, pipes and /dev/null as asked."""
    from chaperone.transports.ssh import master, options as ssh_opts, process

    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)  # as if inherited from our own parent
    keep_r, keep_w = os.pipe()
    script = ("import os, sys; sys.stdout.write(repr((sorted(int(f) for f in os.listdir('/proc/self/fd')), "
              "os.getsid(0) == os.getpid(), sys.stdin.read())))")
    try:
        child = process.Child([sys.executable, "-S", "-c", script], stdin=process.PIPE,
                                stdout=process.PIPE, stderr=process.DEVNULL, keep=(keep_r,))
        child.stdin.write(b"hello")
        child.stdin.close()
        out = child.stdout.read()
        assert child.wait(30) == 0
        child.stdout.close()
        fds, own_session, got = eval(out)
        # 0-2, the kept pipe, and the one fd listdir itself opened
        assert keep_r in fds and leak_r not in fds and leak_w not in fds and keep_w not in fds
        assert len(set(fds) - {0, 1, 2, keep_r}) == 1, fds
        assert own_session and got == "hello"
        assert not os.get_inheritable(keep_r), "kept fds are inheritable only for the spawn"
        assert child.poll() == 0

        # Signals this (Python) process ignores are not ignored there
        # (/proc's SigIgn, as grep inherits it through sh's exec).
        sig = process.Child(["/bin/sh", "-c", "grep SigIgn /proc/self/status"], stdout=process.PIPE)
        ignored = int(sig.stdout.read().split()[1], 16)
        sig.stdout.close()
        assert sig.wait(30) == 0
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
        assert not ignored & (1 << (signal.SIGPIPE - 1)), hex(ignored)

        silent = process.Child(["/bin/sh", "-c", "cat; echo err >&2; exit 3"], stdin=process.DEVNULL,
                                 stdout=process.DEVNULL, stderr=process.PIPE)
        assert silent.stdin is None and silent.stdout is None
        assert silent.stderr.read() == b"err\n"
        assert silent.wait() == 3
        silent.stderr.close()

        sleeper = process.Child(["/bin/sleep", "30"])
        with pytest.raises(process.TimeoutExpired):
            sleeper.wait(0.05)
        sleeper.kill()
        assert sleeper.wait(10) == -signal.SIGKILL
    finally:
        for fd in (leak_r, leak_w, keep_r, keep_w):
            os.close(fd)


def test_a_connect_timeout_for_another_host_leaves_this_one_bounded(tmp_path):
    """A config whose ConnectTimeout is for another host only: this host
    still gets chaperone's bound (before: any mention of ConnectTimeout in
    the config dropped it for every host, and a host that accepts the
    connection and never speaks hung ``rm``, ``kill``, ``logs`` and ``run``
    for ever).  The host the config gives one keeps its own."""
    from chaperone.transports.ssh import options
    from chaperone.transports.target import Target

    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host slowpoke\n    ConnectTimeout 3\nHost *\n    User nobody\n")
    ssh = options.ssh_binary()
    for name, expected in (("node5", ["ConnectTimeout=%d" % options.DEFAULT_CONNECT_TIMEOUT]), ("slowpoke", [])):
        argv = options.ssh_options(ssh, Target.parse(name, config=[str(cfg)]))
        assert [a for a in argv if a.startswith("ConnectTimeout")] == expected, (name, argv)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_host_that_never_speaks_times_out_whatever_the_config_says_of_others(tmp_path):
    """The real thing: a listener that accepts and never says a word, in a
    config that gives another host a ConnectTimeout: ``run -d`` ends with
    one line, after chaperone's bound, not never."""
    import socket

    from chaperone.transports.ssh.options import DEFAULT_CONNECT_TIMEOUT

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        cfg = tmp_path / "ssh_config"
        cfg.write_text("Host mute\n    HostName 127.0.0.1\n    Port %d\n    BatchMode yes\n"
                       "Host other\n    ConnectTimeout 3\n" % silent.getsockname()[1])
        home = tmp_path / "home"
        home.mkdir()
        start = time.monotonic()
        res = subprocess.run(CLI + ["-F", str(cfg), "run", "-d", "mute", "--", "true"], env=cli_env(home),
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=55)
        took = time.monotonic() - start
    assert res.returncode == 255 and res.stderr.decode().startswith("chaperone: connection to mute timed out"), res
    assert DEFAULT_CONNECT_TIMEOUT - 1 < took < DEFAULT_CONNECT_TIMEOUT + 15, took
