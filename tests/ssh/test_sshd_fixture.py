"""The sshd fixture itself: a real server, with host key checking on."""

import os
import signal
import subprocess
import time


def run(argv, **kw):
    kw.setdefault("timeout", 30)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)


def test_echo_hi(sshd):
    res = run(sshd.ssh_argv("echo", "hi"))
    assert res.returncode == 0, res.stderr + sshd.log_tail()
    assert res.stdout == "hi\n"


def test_config_file_has_the_settings(sshd):
    text = open(sshd.config_file).read()
    assert f"Port {sshd.port}" in text
    assert "StrictHostKeyChecking yes" in text
    assert "BatchMode yes" in text
    assert open(sshd.known_hosts).read().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")


def test_host_key_checking_is_on(sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    # -o on the command line wins over the config file.
    res = run(["ssh", "-F", sshd.config_file, "-o", f"UserKnownHostsFile={empty}",
               "-o", "StrictHostKeyChecking=yes", sshd.host_alias, "echo", "hi"])
    assert res.returncode == 255
    assert res.stdout == ""
    assert not empty.read_text(), "ssh must not have learnt the key"


def test_wrong_host_key_is_refused(sshd, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    keytype, key = (tmp_path / "other_key.pub").read_text().split()[:2]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {keytype} {key}\n")
    res = run(["ssh", "-F", sshd.config_file, "-o", f"UserKnownHostsFile={wrong}",
               sshd.host_alias, "echo", "hi"])
    assert res.returncode == 255
    assert res.stdout == ""


def test_kill_sessions(sshd):
    # (The server is shared: a connection an earlier test left closing may
    # still be listed. This test's own session is the new one.)
    before = set(sshd.session_pids())
    proc = subprocess.Popen(sshd.ssh_argv("sleep", "30"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not set(sshd.session_pids()) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = sorted(set(sshd.session_pids()) - before)
        assert pids, sshd.log_tail()
        assert os.getpid() not in pids
        killed = sshd.kill_sessions(signal.SIGKILL)
        assert set(pids) <= set(killed)
        assert proc.wait(timeout=10) == 255  # the client saw the connection die
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
