"""A host whose login scripts print (a banner on stdout, a warning on
stderr: bash reads ~/.bashrc for every command sshd runs).  The agent's
marker line is how the client tells its reply from that noise; a call
that ends with noise and no marker is no reply, and its exit status says
why (97: the agent is not there yet, ship it).  Before, the noise was
taken for the agent's reply: the agent was never shipped, and every
command on such a host failed with the noise's last line ("chaperone:
stderr noise")."""

import json
import os
import subprocess

import pytest

from support.helpers import CLI, cli_env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_run_status_and_logs_on_a_host_whose_login_scripts_print(noisy_host, tmp_path, client):
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home, CHAPERONE_SSH_CLIENT=client)

    def chaperone(*args):
        return subprocess.run(CLI + ["-F", noisy_host.config_file] + list(args), env=env, cwd=str(home),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    first = chaperone("run", "-q", "testhost", "--", "sh", "-c", "printf 'out\\n'; printf err >&2; exit 3")
    assert (first.returncode, first.stdout, first.stderr) == (3, b"out\n", b"err")
    home_there = tmp_path / "remote-home" / ".chaperone"
    assert any(name.startswith("agent-") for name in os.listdir(home_there))  # (shipped on the first call)
    run_id = chaperone("ps", "-a", "-q").stdout.decode().split()[0]
    status = chaperone("status", run_id, "--json")
    assert status.returncode == 0, status
    got = json.loads(status.stdout)
    assert (got["state"], got["exit_code"]) == ("done", 3), got
    logs = chaperone("logs", "--stdout", run_id)
    assert (logs.returncode, logs.stdout) == (0, b"out\n")


@pytest.fixture
def chatty_host(tmp_path):
    """A host whose login script leaves a job behind that prints into the
    session half a second after login, in the middle of the agent's reply
    to a run that is still writing."""
    from support.sshd import require_sshd, sshd_with_home

    require_sshd()
    server = sshd_with_home(tmp_path / "chatty-home", "(sleep 0.5; echo 'late noise') &\n")
    try:
        yield server
    finally:
        server.stop()


#: 40 numbered lines over 2 s, each after 256 KiB: the job's line falls in
#: the middle of the reply, most likely inside a frame's data.
STEADY = "import sys,time\nfor i in range(40):\n    sys.stdout.write(('%02d' % i) * (1 << 17) + 'line %02d\\n' % i); " \
         "sys.stdout.flush(); time.sleep(0.05)\nsys.stdout.write('end, no newline')"


@pytest.mark.timeout(120)
def test_a_run_whose_reply_is_broken_by_a_login_job_reads_on_from_the_spool(chatty_host, tmp_path):
    """The job's line lands among the agent's frames: the client sees bytes
    that are not the agent's, drops that reply and reads on from the spool
    (the offsets it holds), as after a dropped connection.  The program's
    output arrives whole, each byte once, and the run's exit status is its
    own (before: 'the agent on testhost ended its output stream early',
    exit 255)."""
    home = tmp_path / "home"
    home.mkdir()
    res = subprocess.run(CLI + ["-F", chatty_host.config_file, "run", "-q", "testhost", "--", "python3", "-c",
                                STEADY], env=cli_env(home), cwd=str(home), stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=90)
    want = b"".join(b"%02d" % i * (1 << 17) + b"line %02d\n" % i for i in range(40)) + b"end, no newline"
    assert (res.returncode, len(res.stdout), res.stdout == want) == (0, len(want), True), res.stderr
    assert b"late noise" not in res.stdout + res.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_reading_output_never_keeps_what_a_login_job_prints_after_the_reply(late_noisy_host, tmp_path, client):
    """``read()`` and ``output()`` (what the run holds now) give the run's
    bytes and nothing after them: the agent counts them and ends its reply
    with its marker (before, what the job printed after the agent had
    ended came with them)."""
    import asyncio

    from chaperone import Chaperone

    out = bytes(range(256)) * 40 + b"no newline"

    async def main():
        async with Chaperone(home=tmp_path / "home", ssh_config=[late_noisy_host.config_file], ssh_client=client) as ch:
            run = await ch.start("testhost", ["python3", "-c", "import sys; sys.stdout.buffer.write(%r)" % out])
            assert (await run.wait()).exit_code == 0
            assert await run.read() == out
            assert b"".join([c async for c in run.output()]) == out
            assert await run.read(offset=10, length=5) == out[10:15]

    asyncio.run(main())
