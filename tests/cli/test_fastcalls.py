"""The head start's direct agent calls against a real sshd:
``chaperone logs ID > file`` with ssh writing into the file itself
(chaperone/cli/fastlogs.py), and ``chaperone status ID`` in one ssh call
(chaperone/cli/fastcall.py).

The fast path is run with click, asyncio and pydantic made unimportable:
the normal path cannot run like that, so what such a command delivers, the
fast path delivered.  The normal path is the same command with
``CHAPERONE_FAST_LOGS=0``.  Both must write the same bytes."""

import json
import subprocess
import sys

import pytest

from support.helpers import cli, cli_env
from support.sshd import SSHD

BLOCKED = ("click", "asyncio", "pydantic")
FAST = [sys.executable, "-c", "import sys\nfor m in %r: sys.modules[m] = None\n"
        "from chaperone.__main__ import main\nmain()" % (BLOCKED,)]
NORMAL = [sys.executable, "-c", "from chaperone.__main__ import main\nmain()"]

#: Both streams, bytes that are not UTF-8, no newline at the end of either.
WRITE = ("import sys\n"
         "sys.stdout.buffer.write(bytes(range(256)) * 300 + b'out, no newline')\n"
         "sys.stderr.buffer.write(b'err \\xff\\x00 ' * 1000 + b'err, no newline')\n")
OUT = bytes(range(256)) * 300 + b"out, no newline"
ERR = b"err \xff\x00 " * 1000 + b"err, no newline"


def logs_to_files(entry, home, config, *args, env=None, prefix=b""):
    """``chaperone -F CONFIG logs ARGS > out 2> err``: (status, out, err)."""
    out, err = home / "out.bin", home / "err.bin"
    out.write_bytes(prefix)
    with open(out, "ab" if prefix else "wb") as o, open(err, "wb") as e:
        res = subprocess.run(entry + ["-F", str(config), "logs"] + [str(a) for a in args], stdout=o, stderr=e,
                             stdin=subprocess.DEVNULL, env=cli_env(home, **(env or {})), cwd=str(home), timeout=60)
    return res.returncode, out.read_bytes(), err.read_bytes()


def finished_run(home, config):
    res = cli(home, "-F", config, "run", "-q", "testhost", "--", sys.executable, "-c", WRITE)
    assert res.returncode == 0, res.stderr
    res = cli(home, "ps", "-a", "-q")
    return res.stdout.decode().split()[0]


@pytest.mark.timeout(120)
def test_fast_logs_to_files_are_the_exact_bytes(sshd, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run_id = finished_run(home, sshd.config_file)
    for entry, env in ((FAST, None), (NORMAL, {"CHAPERONE_FAST_LOGS": "0"})):
        assert logs_to_files(entry, home, sshd.config_file, run_id, env=env) == (0, OUT, ERR)
        assert logs_to_files(entry, home, sshd.config_file, "--stdout", run_id, env=env) == (0, OUT, b"")
        assert logs_to_files(entry, home, sshd.config_file, "--stderr", run_id, env=env) == (0, ERR, b"")
        # appended (>>) after what the file held: kept
        assert logs_to_files(entry, home, sshd.config_file, "--stdout", run_id, env=env,
                             prefix=b"before\n") == (0, b"before\n" + OUT, b"")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["before", "after"])
def test_fast_logs_never_keep_what_login_scripts_print(noisy_host, late_noisy_host, tmp_path, where):
    """Login noise lands in the file with the data (before it, or after it
    from a job the login script left behind): the file is not what the
    agent counted, so it is cut back to where it was, the run's stderr was
    not written yet, and the normal path (which reads the data after the
    agent's marker) delivers the exact bytes."""
    host = noisy_host if where == "before" else late_noisy_host
    home = tmp_path / "home"
    home.mkdir()
    run_id = finished_run(home, host.config_file)
    assert logs_to_files(NORMAL, home, host.config_file, run_id) == (0, OUT, ERR)
    assert logs_to_files(NORMAL, home, host.config_file, "--stderr", run_id, prefix=b"x") == (0, b"x" + ERR, b"")
    code, out, err = logs_to_files(FAST, home, host.config_file, run_id, prefix=b"kept")
    assert code != 0 and out == b"kept" and ERR not in err  # (the fast path alone gave it back untouched)


@pytest.mark.timeout(120)
def test_fast_logs_hand_errors_to_the_normal_path(sshd, tmp_path):
    """A run whose spool is gone on the host: nothing written, the normal
    path's message and status (4), and the file left as it was."""
    home = tmp_path / "home"
    home.mkdir()
    run_id = finished_run(home, sshd.config_file)
    subprocess.run(sshd.ssh_argv("rm", "-rf", ".chaperone/runs/%s" % run_id), check=True, timeout=30)
    code, out, err = logs_to_files(NORMAL, home, sshd.config_file, run_id, prefix=b"kept")
    assert (code, out) == (4, b"kept")
    assert err.decode().startswith("chaperone: ") and run_id in err.decode() and err.count(b"\n") == 1
    # the fast path alone (the normal one blocked) gave up before writing anything
    code, out, _ = logs_to_files(FAST, home, sshd.config_file, run_id, prefix=b"kept")
    assert code != 0 and out == b"kept"


def status_of(entry, home, config, *args, env=None):
    res = subprocess.run(entry + ["-F", str(config), "status"] + [str(a) for a in args], capture_output=True,
                         stdin=subprocess.DEVNULL, env=cli_env(home, **(env or {})), cwd=str(home), timeout=60)
    return res.returncode, res.stdout, res.stderr


@pytest.mark.timeout(120)
def test_fast_status_says_what_the_normal_path_says(sshd, tmp_path):
    """A run recorded as running that has ended since: the fast call reads
    its end from the host, records it, and prints the table and the JSON
    object the normal path prints."""
    home = tmp_path / "home"
    home.mkdir()
    res = cli(home, "-F", sshd.config_file, "run", "-d", "-q", "testhost", "--", "sh", "-c", "echo hi; exit 3")
    run_id = res.stdout.decode().strip()
    assert res.returncode == 0 and run_id, res.stderr
    subprocess.run(sshd.ssh_argv("sleep", "1"), check=True, timeout=30)  # (it has ended on the host)
    code, table, err = status_of(FAST, home, sshd.config_file, run_id)
    assert (code, err) == (0, b""), err
    assert table.decode().split("\n")[1].split()[:5] == [run_id, "testhost", "done", "exited", "3"]
    assert json.loads(cli(home, "ps", "-a", "--json").stdout)[0]["state"] == "done"  # (recorded)
    fast = json.loads(status_of(FAST, home, sshd.config_file, "--json", run_id)[1])
    normal = json.loads(status_of(NORMAL, home, sshd.config_file, "--json", run_id,
                                  env={"CHAPERONE_FAST_CALLS": "0"})[1])
    for obj in (fast, normal):
        obj.pop("last_seen")  # (when it was read)
    assert fast == normal and fast["exit_code"] == 3
    assert status_of(FAST, home, sshd.config_file, run_id)[1] == \
        status_of(NORMAL, home, sshd.config_file, run_id, env={"CHAPERONE_FAST_CALLS": "0"})[1]


@pytest.mark.timeout(120)
def test_fast_calls_to_a_host_that_is_down_fail_as_the_normal_path_does(tmp_path):
    """Once, with the normal path's message and status (not tried twice)."""
    home = tmp_path / "home"
    home.mkdir()
    server = SSHD()
    server.start()
    try:
        res = cli(home, "-F", server.config_file, "run", "-d", "-q", "testhost", "--", "sleep", "60")
        run_id = res.stdout.decode().strip()
        assert res.returncode == 0 and run_id, res.stderr
        config = tmp_path / "ssh_config"  # (sshd's files go with it)
        config.write_text(open(server.config_file).read())
    finally:
        server.stop()
    fast = status_of(FAST, home, config, run_id)
    normal = status_of(NORMAL, home, config, run_id, env={"CHAPERONE_FAST_CALLS": "0"})
    assert fast[0] == normal[0] == 1, (fast, normal)  # (docs/cli.md: status, a host that could not be reached)
    assert fast[2] == normal[2] and b"refused" in fast[2] and fast[2].count(b"\n") == 1
    assert fast[1].split()[:10] == normal[1].split()[:10]  # (the run as recorded; its duration goes on)
    code, out, err = logs_to_files(FAST, home, config, run_id)
    assert (code, out) == (255, b"") and err.startswith(b"chaperone: ") and b"refused" in err
