"""`chaperone run HOST -- CMD` when the host cannot be used.

Each failure: exit status 255, exactly one line on stderr that says what is
wrong (no traceback), nothing on stdout, and no run left recorded as
``running`` (``chaperone ps --json``).  All against the real sshd fixture or
loopback addresses: no network is needed.
"""

import json
import os
import socket
import subprocess
import time

import pytest

from support.helpers import CLI, cli_env
from support.sshd import free_port


@pytest.fixture(params=["openssh", "asyncssh"], autouse=True)
def ssh_client(request, monkeypatch):
    """Every case with both SSH clients: the same failure, the same line."""
    monkeypatch.setenv("CHAPERONE_SSH_CLIENT", request.param)
    return request.param


def write_config(path, sshd, alias, hostname="127.0.0.1", port=None, known_hosts=None, identity=None, **extra):
    """An ssh_config with one Host block like the fixture's ``testhost``."""
    lines = [
        "Host %s" % alias,
        "    HostName %s" % hostname,
        "    Port %d" % (port or sshd.port),
        "    User %s" % sshd.user,
        '    IdentityFile "%s"' % (identity or sshd.identity_file),
        "    IdentitiesOnly yes",
        '    UserKnownHostsFile "%s"' % (known_hosts or sshd.known_hosts),
        "    GlobalKnownHostsFile /dev/null",
        "    StrictHostKeyChecking yes",
        "    BatchMode yes",
    ] + ["    %s %s" % kv for kv in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def chaperone(home, *args, timeout=60):
    start = time.monotonic()
    res = subprocess.run(CLI + [str(a) for a in args], env=cli_env(home), cwd=str(home),
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    res.elapsed = time.monotonic() - start
    return res


def assert_fails_cleanly(home, res, *words, code=255):
    """255 (or ``code``), one clear line on stderr mentioning ``words``, no running run."""
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == code, err
    assert res.stdout == b""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("chaperone: "), line
    assert "Traceback" not in err
    for word in words:
        assert word in line, line
    ps = chaperone(home, "ps", "-a", "--json")
    assert ps.returncode == 0, ps.stderr
    runs = json.loads(ps.stdout)
    assert [r["state"] for r in runs if r["state"] in ("running", "starting")] == []
    return line


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return str(path)


@pytest.mark.timeout(30)
def test_unknown_host(sshd, tmp_path):
    # A .invalid name never resolves (RFC 6761); no DNS server is needed for
    # it to fail, and it must fail fast.
    cfg = write_config(tmp_path / "cfg", sshd, "nohost", hostname="nonexistent.invalid", port=22)
    res = chaperone(tmp_path, "-F", cfg, "run", "nohost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "unknown host nohost")
    assert res.elapsed < 15


@pytest.mark.timeout(30)
def test_an_unknown_host_in_capitals_is_the_host_itself(sshd, tmp_path):
    """ssh says the name it could not resolve in lower case: that is still
    the host typed, not one on the way to it."""
    res = chaperone(tmp_path, "run", "NoSuch.Invalid", "--", "true")
    line = assert_fails_cleanly(tmp_path, res, "unknown host NoSuch.Invalid")
    assert "on the way" not in line and "jump" not in line, line


@pytest.mark.timeout(30)
def test_an_interpreter_that_is_not_python_is_not_taken_for_the_agent(sshd, tmp_path):
    """``--python /bin/false``: it exits 1 and says nothing; not the
    agent's refusal (exit 1, as if the program had failed) but a start that
    never ran (255), naming --python."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "--python", "/bin/false", "testhost", "echo", "hi")
    assert_fails_cleanly(tmp_path, res, "cannot run the agent on testhost", "--python")


@pytest.mark.timeout(30)
def test_an_identity_file_that_is_missing_is_warned_about_and_passed_over(sshd, tmp_path):
    """``-i /nonexistent``: as ssh, one warning line, and the other keys
    (the config's) log in (before: nothing said with OpenSSH, and asyncssh
    failed to connect)."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-i", tmp_path / "nokey", "testhost", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), res.stderr
    err = res.stderr.decode()
    assert err.count("\n") == 1 and "identity file %s not accessible" % (tmp_path / "nokey") in err, err


@pytest.mark.timeout(30)
def test_an_unknown_jump_host_is_named(sshd, tmp_path):
    """The jump host (-J, ProxyJump) is what cannot be resolved, not the
    host the run was for: the line names it."""
    cfg = write_config(tmp_path / "cfg", sshd, "behind")
    res = chaperone(tmp_path, "-F", cfg, "run", "-J", "nojump.invalid", "behind", "--", "true")
    line = assert_fails_cleanly(tmp_path, res, "behind", "nojump.invalid", "jump host")
    assert "Connection closed" not in line


@pytest.mark.timeout(60)
def test_a_jump_host_on_the_command_line_is_used_for_the_destination_only(sshd, tmp_path):
    """``-J jumpbox behind``: the run goes through jumpbox (the same test
    sshd, reached as another alias) and works; -J is not applied to the
    jump host itself (asyncssh read it for every hop: endless recursion)."""
    cfg = tmp_path / "cfg"
    write_config(cfg, sshd, "behind")
    both = cfg.read_text()
    write_config(cfg, sshd, "jumpbox")
    cfg.write_text(both + cfg.read_text())
    res = chaperone(tmp_path, "-F", cfg, "run", "-J", "jumpbox", "behind", "--", "echo", "through")
    assert (res.returncode, res.stdout) == (0, b"through\n"), res.stderr


@pytest.mark.timeout(30)
def test_connection_refused(sshd, tmp_path):
    cfg = write_config(tmp_path / "cfg", sshd, "closed", port=free_port())
    res = chaperone(tmp_path, "-F", cfg, "run", "closed", "--", "true")
    assert_fails_cleanly(tmp_path, res, "connection to closed refused")


@pytest.mark.timeout(40)
def test_connection_timed_out_honours_connect_timeout(sshd, tmp_path):
    # A listener that completes TCP handshakes (the kernel does, from the
    # backlog) but never says a word: the SSH handshake hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        cfg = write_config(tmp_path / "cfg", sshd, "mute", port=listener.getsockname()[1],
                           ConnectTimeout=2)
        res = chaperone(tmp_path, "-F", cfg, "run", "mute", "--", "true")
    assert_fails_cleanly(tmp_path, res, "connection to mute timed out")
    # ConnectTimeout 2 from the config, not chaperone's 15 s default.
    assert 2 <= res.elapsed < 12, res.elapsed


@pytest.mark.timeout(30)
def test_authentication_failed(sshd, tmp_path):
    other = keygen(tmp_path / "not_authorized")
    cfg = write_config(tmp_path / "cfg", sshd, "testhost", identity=other)
    res = chaperone(tmp_path, "-F", cfg, "run", "testhost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "authentication failed for testhost")


@pytest.mark.timeout(30)
def test_identity_option_logs_in_where_the_config_key_cannot(sshd, tmp_path):
    # -i adds a key the config does not have (OpenSSH tries it first; the
    # asyncssh client uses only the keys given), so the login succeeds.
    other = keygen(tmp_path / "not_authorized")
    cfg = write_config(tmp_path / "cfg", sshd, "testhost", identity=other)
    res = chaperone(tmp_path, "-F", cfg, "run", "-i", sshd.identity_file, "--spool", tmp_path / "spool",
                    "testhost", "--", "echo", "in")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"in\n", b"")


@pytest.mark.timeout(30)
def test_host_key_unknown(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = write_config(tmp_path / "cfg", sshd, "testhost", known_hosts=empty)
    res = chaperone(tmp_path, "-F", cfg, "run", "testhost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "host key verification failed for testhost")
    assert empty.read_text() == "", "nothing may be learnt"


@pytest.mark.timeout(30)
def test_host_key_changed(sshd, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    keytype, key = open(other + ".pub").read().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text("[127.0.0.1]:%d %s %s\n" % (sshd.port, keytype, key))
    cfg = write_config(tmp_path / "cfg", sshd, "testhost", known_hosts=wrong)
    res = chaperone(tmp_path, "-F", cfg, "run", "testhost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "host key verification failed for testhost")


@pytest.mark.timeout(30)
def test_no_host_key_check_lets_an_unknown_host_key_through(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = write_config(tmp_path / "cfg", sshd, "testhost", known_hosts=empty)
    res = chaperone(tmp_path, "-F", cfg, "run", "--no-host-key-check", "testhost", "--",
                    "echo", "through")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"through\n", b"")


@pytest.mark.timeout(30)
def test_no_python_on_the_host(sshd, tmp_path):
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "--python", "/nonexistent/python3",
                    "testhost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "/nonexistent/python3", "testhost")


@pytest.mark.timeout(30)
def test_spool_not_writable(sshd, tmp_path):
    # /etc/hostname is a regular file: nothing can be created under it.
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "--spool", "/etc/hostname/x",
                    "testhost", "--", "true")
    # (3, as docs/cli.md says: the host's spool cannot be written)
    assert_fails_cleanly(tmp_path, res, "/etc/hostname/x", "Not a directory", code=3)


@pytest.mark.timeout(60)
def test_verbose_shows_how_the_host_is_reached_and_the_error_stays_one_clear_line(sshd, tmp_path, ssh_client):
    """``-v`` (ssh's habit when a connection fails): the SSH client's own
    debug messages on stderr, on ``run`` and before the command, and the
    output untouched; a failure still ends with chaperone's one line saying
    what is wrong (before: "No such option '-v'", exit 2)."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-v", "testhost", "--", "echo", "hi")
    err = res.stderr.decode("utf-8", "replace")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), err
    marker = "debug1: " if ssh_client == "openssh" else "asyncssh: "
    assert marker in err and "127.0.0.1" in err, err
    res = chaperone(tmp_path, "-vv", "-F", sshd.config_file, "run", "testhost", "--", "echo", "hi")
    err = res.stderr.decode("utf-8", "replace")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), err
    assert ("debug2: " if ssh_client == "openssh" else "asyncssh: ") in err, err
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-v", "nohost.invalid", "--", "true", timeout=40)
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode == 255 and res.stdout == b"", err
    assert err.splitlines()[-1].startswith("chaperone: unknown host nohost.invalid"), err
    assert "Traceback" not in err
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "testhost", "--", "echo", "hi")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"hi\n", b"")  # (quiet without -v)


@pytest.mark.timeout(60)
def test_ssh_address_family_and_compression_flags(sshd, tmp_path, ssh_client):
    """ssh's ``-4``, ``-6`` and ``-C`` (before: "No such option"): ``-4 -C``
    reaches the IPv4 test host; ``-6`` to a host with only an IPv4 address
    is one line naming the flags; ``-4 -6`` is a usage error."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-4", "-C", "testhost", "--", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), res.stderr
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-6", "testhost", "--", "true")
    assert_fails_cleanly(tmp_path, res, "testhost", "no address of the family", "-6")
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "-4", "-6", "testhost", "--", "true")
    assert res.returncode == 2 and res.stderr.count(b"\n") == 1 and b"-4 and -6" in res.stderr, res.stderr


@pytest.mark.timeout(90)
def test_a_jump_host_that_refuses_or_cannot_connect_is_said_at_once(sshd, tmp_path, ssh_client):
    """OpenSSH: a jump host that refuses the connection, and a jump host
    that cannot reach the destination, are each one line naming the jump
    host, at once (before: both read as "dropped the connection before
    login ... MaxStartups", after about 20 s of retries)."""
    if ssh_client != "openssh":
        pytest.skip("the jump's own ssh messages are OpenSSH's")
    from support.sshd import free_port

    dead = free_port()
    cfg = write_config(tmp_path / "cfg", sshd, "testhost")
    with open(cfg, "a") as f:
        f.write("Host deadjump\n    HostName 127.0.0.1\n    Port %d\n    BatchMode yes\n" % dead)
        f.write("Host viadead\n    HostName 127.0.0.1\n    Port %d\n    BatchMode yes\n    ProxyJump deadjump\n"
                % sshd.port)
        f.write("Host deadbehind\n    HostName 127.0.0.1\n    Port %d\n    BatchMode yes\n    ProxyJump testhost\n"
                % dead)
    for host, words in (("viadead", ("viadead", "jump host 127.0.0.1 (port %d)" % dead, "refused")),
                        ("deadbehind", ("deadbehind", "jump host could not open a connection"))):
        res = chaperone(tmp_path, "-F", cfg, "run", host, "--", "true")
        line = assert_fails_cleanly(tmp_path, res, *words)
        assert "MaxStartups" not in line and res.elapsed < 10, (line, res.elapsed)


@pytest.mark.timeout(60)
def test_ctrl_c_while_connecting_gives_up_as_ssh_does(sshd, tmp_path, ssh_client):
    """Ctrl-C while the host has not answered the start (here: it accepts
    the connection and never speaks): chaperone gives up at once, exit
    130, with one line saying the run may go on if its start got there;
    the record says it was interrupted (before: "sending SIGINT to run" to
    a program that never ran, a second Ctrl-C to "detach", and the record
    said "cut short (CancelledError)")."""
    import signal
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        proc = subprocess.Popen(CLI + ["-F", str(sshd.config_file), "run", "-p", str(silent.getsockname()[1]),
                                       "--id", "cc", "testhost", "--", "echo", "hi"], env=cli_env(tmp_path),
                                cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        silent.settimeout(30)
        conn, _ = silent.accept()  # (its SSH client is connecting)
        import sqlite3

        for _ in range(300):  # (the run is recorded once the CLI is past its start-up: its Ctrl-C is its own)
            if (tmp_path / "runs.db").exists():
                db = sqlite3.connect(str(tmp_path / "runs.db"))
                try:
                    if db.execute("SELECT 1 FROM runs WHERE id = 'cc'").fetchone():
                        break
                except sqlite3.Error:
                    pass
                finally:
                    db.close()
            time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - start
        conn.close()
    err = err.decode()
    assert proc.returncode == 130 and out == b"" and took < 5, (proc.returncode, err, took)
    assert "interrupted before testhost answered the start of run cc" in err and "SIGINT" not in err, err
    info = json.loads(chaperone(tmp_path, "ps", "-a", "--cached", "--json").stdout)
    assert [(i["id"], i["state"]) for i in info] == [("cc", "unknown")] and "interrupted" in info[0]["error"], info


@pytest.mark.timeout(60)
def test_an_unknown_host_points_at_the_config_given(sshd, tmp_path, ssh_client):
    """With ``-F FILE``, the hint names that file, not ~/.ssh/config."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "nohost.invalid", "--", "true")
    assert_fails_cleanly(tmp_path, res, "unknown host nohost.invalid", "is it in %s?" % sshd.config_file)


@pytest.mark.timeout(60)
def test_the_host_key_hint_works_when_followed(sshd, tmp_path, ssh_client):
    """An alias with its own port and known_hosts file, whose key is not
    known: the hint names the real address, port and file (before:
    ``ssh-keyscan ALIAS >> ~/.ssh/known_hosts``, which adds nothing the
    alias uses); running the hint's ssh-keyscan makes the next run work."""
    import re
    import shlex

    known = tmp_path / "known"
    known.write_text("")
    cfg = write_config(tmp_path / "cfg", sshd, "keyless", known_hosts=known)
    res = chaperone(tmp_path, "-F", cfg, "run", "keyless", "--", "echo", "hi")
    line = assert_fails_cleanly(tmp_path, res, "host key verification failed for keyless")
    scan = re.search(r"\(ssh-keyscan (.*?) >> (\S+),", line)
    assert scan and scan.group(2) == str(known) and "-p %d" % sshd.port in scan.group(1), line
    keys = subprocess.run(["ssh-keyscan", "-T", "5"] + shlex.split(scan.group(1)), capture_output=True, timeout=30)
    known.write_bytes(keys.stdout)
    res = chaperone(tmp_path, "-F", cfg, "run", "keyless", "--", "echo", "hi")
    assert (res.returncode, res.stdout) == (0, b"hi\n"), res.stderr


@pytest.mark.timeout(60)
def test_logs_of_a_host_out_of_reach_with_both_streams_together_is_one_line(sshd, tmp_path, ssh_client):
    """``logs ID > f 2>&1`` (both streams to one place: the interleaved
    path) when the host refuses: one line and 255 at once, as with the
    streams apart (before: "...; reconnecting" and a wait for ever)."""
    from support.sshd import free_port

    run_id = "far-%d" % os.getpid()
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "--id", run_id, "testhost", "--", "echo", "hi")
    assert res.returncode == 0, res.stderr
    start = time.monotonic()
    res = subprocess.run(CLI + ["-F", str(sshd.config_file), "logs", "-p", str(free_port()), run_id],
                         env=cli_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=40)
    assert res.returncode == 255 and time.monotonic() - start < 20, res.stdout
    assert res.stdout.count(b"\n") == 1 and b"refused" in res.stdout and b"reconnecting" not in res.stdout, res.stdout


@pytest.mark.timeout(60)
def test_rm_leaves_no_record_of_a_start_that_never_happened(sshd, tmp_path, ssh_client):
    """``run --rm`` whose start never reached the host: one line, 255, and
    no record left (as ``-H --rm`` already did; before: a failed record)."""
    res = chaperone(tmp_path, "-F", sshd.config_file, "run", "--rm", "--id", "rmfail", "nohost.invalid", "--", "true")
    assert_fails_cleanly(tmp_path, res, "unknown host nohost.invalid")
    assert chaperone(tmp_path, "ps", "-a", "-q").stdout == b""
