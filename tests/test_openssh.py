"""The OpenSSH client transport (the CLI's default): one shared connection
per command through a control master started before the CLI's imports,
which never outlives the CLI, and honours the user's own multiplexing."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import CLI, cli_env

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


def no_masters_left(tag, timeout=5.0):
    """Masters are stopped without waiting for them (ssh takes a few ms
    to say goodbye): wait a moment for them to go."""
    deadline = time.monotonic() + timeout
    while masters(tag):
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
def test_the_speculative_master_is_the_one_the_command_uses(sshd, tmp_path, monkeypatch):
    """``python -m chaperone`` starts the master before its imports; the
    transport the CLI then builds must adopt it (same options), for ``run
    HOST`` and for ``status ID``: a guess that never matches would cost a
    second handshake on every command."""
    from chaperone import __main__ as entry
    from chaperone import sshmaster
    from chaperone.api import Chaperone

    monkeypatch.setenv("CHAPERONE_HOME", str(tmp_path))
    monkeypatch.setenv("CHAPERONE_SSH_CLIENT", "openssh")

    async def main():
        entry._speculate(["-F", sshd.config_file, "run", "-p", str(sshd.port), "--no-host-key-check",
                          "--spool", str(tmp_path / "spool"), "--id", "spec", "testhost", "--", "true"])
        speculative = sshmaster._speculative
        assert speculative is not None
        async with Chaperone(ssh_config=[sshd.config_file], check_host_keys=False,
                             ssh_client="openssh") as ch:
            ssh = {"port": sshd.port, "root": str(tmp_path / "spool")}
            ch.preconnect("testhost", ssh)
            assert sshmaster._speculative is None
            assert ch.transport("testhost", **ssh)._master is speculative
            run = await ch.start("testhost", ["true"], run_id="spec", ssh=ssh)
            await ch.wait(run.id)

        entry._speculate(["-F", sshd.config_file, "status", "spec"])
        speculative = sshmaster._speculative
        assert speculative is not None
        async with Chaperone(ssh_config=[sshd.config_file], ssh_client="openssh") as ch:
            ch.preconnect_run("spec")
            assert sshmaster._speculative is None
            assert ch.client("spec").transport._master is speculative
            assert (await ch.status("spec"))["state"] == "done"

    asyncio.run(main())
    assert no_masters_left(sshd.config_file)


def test_guesses_only_what_it_understands():
    from chaperone.__main__ import _guess

    assert _guess(["run", "local", "--", "true"]) is None
    assert _guess(["run", "--frobnicate", "h", "--", "true"]) is None
    assert _guess(["-F", "a", "-F", "b", "run", "h", "--", "true"]) is None
    assert _guess(["ps"]) is None
    host, settings = _guess(["run", "-l", "bob", "-i", "k1", "--identity=k2", "-p", "2222", "-d", "h", "--", "x"])
    assert host == "h"
    assert settings == dict(config=[], port=2222, username="bob", client_keys=["k1", "k2"], check_host_keys=True)


@pytest.mark.timeout(60)
def test_no_master_outlives_a_killed_cli(sshd, tmp_path):
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
        mine = [m for m in masters(sshd.config_file) if _master_dir(m)]
        assert mine, "the run goes through a control master"
        dirs = {_master_dir(m) for m in mine}
        assert all(os.path.isdir(d) for d in dirs)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert no_masters_left(sshd.config_file, 10), "the control master outlived its CLI"
        deadline = time.monotonic() + 10
        while any(os.path.exists(d) for d in dirs):  # its directory (socket, stderr) goes too
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
    from chaperone.openssh import OpenSSHTransport

    cfg = tmp_path / "cfg"
    cfg.write_text(open(sshd.config_file).read() + "    ControlPath none\n")
    assert OpenSSHTransport("testhost", config=[str(cfg)]).multiplex is False
    assert OpenSSHTransport("testhost", config=[sshd.config_file]).multiplex is True
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
    from sshd import SSHD, require_sshd

    require_sshd()
    flag = tmp_path / "go"
    with SSHD(max_sessions=2) as server:
        async def main():
            async with Chaperone(home=tmp_path, ssh_config=[server.config_file], ssh_client="openssh") as ch:
                ssh = {"root": str(tmp_path / "spool"), "max_sessions": 2}
                transport = ch.transport("testhost", **ssh)

                async def one(i):
                    out = b""
                    argv = ["sh", "-c", "while [ ! -e %s ]; do sleep 0.05; done; echo f%d" % (flag, i)]
                    async for event in ch.start_stream("testhost", argv, ssh=ssh):
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
