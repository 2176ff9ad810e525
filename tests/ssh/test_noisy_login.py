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
