"""`chaperone logs ID` over SSH streams the spool file in one agent call:
exact bytes, any size, without holding them in memory."""

import hashlib
import os
import subprocess
import sys

import pytest

WRITER = ("import hashlib,os,sys\n"
          "h=hashlib.sha256()\n"
          "for i in range(40):\n"
          "    b=hashlib.sha256(str(i).encode()).digest()*32768+bytes([0,255,10,13])\n"
          "    h.update(b); sys.stdout.buffer.write(b)\n"
          "sys.stderr.write(h.hexdigest())\n")


def cli(sshd, home, *args, stdout=subprocess.PIPE):
    env = dict(os.environ, CHAPERONE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "chaperone.cli", "-F", str(sshd.config_file), *args],
                          env=env, stdout=stdout, stderr=subprocess.PIPE, timeout=120)


@pytest.mark.timeout(120)
def test_logs_of_a_40_mb_run_over_ssh_are_exact(sshd, tmp_path):
    res = cli(sshd, tmp_path, "run", "-d", "testhost", "--spool", str(tmp_path / "spool"), "--",
              "python3", "-c", WRITER)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.decode().strip()
    assert cli(sshd, tmp_path, "wait", run_id).returncode == 0
    expected = cli(sshd, tmp_path, "logs", run_id, "--stderr").stdout.decode()
    out = tmp_path / "out"
    with open(out, "wb") as f:
        res = cli(sshd, tmp_path, "logs", "--stdout", run_id, stdout=f)
    assert res.returncode == 0 and res.stderr == b"", res.stderr
    data = out.read_bytes()
    assert len(data) == 40 * (32 * 32768 + 4)
    assert hashlib.sha256(data).hexdigest() == expected


@pytest.mark.timeout(120)
def test_logs_into_a_closed_pipe_ends_quietly(sshd, tmp_path):
    res = cli(sshd, tmp_path, "run", "-d", "testhost", "--spool", str(tmp_path / "spool"), "--",
              "python3", "-c", WRITER)
    run_id = res.stdout.decode().strip()
    assert cli(sshd, tmp_path, "wait", run_id).returncode == 0
    env = dict(os.environ, CHAPERONE_HOME=str(tmp_path))
    p = subprocess.run("%s -m chaperone.cli -F %s logs %s | head -c 5 | od -An -c"
                       % (sys.executable, sshd.config_file, run_id), shell=True, env=env,
                       capture_output=True, timeout=60)
    assert p.stdout.split()[:1] != []
    assert b"Traceback" not in p.stderr


@pytest.mark.timeout(90)
def test_a_foreground_run_whose_reader_goes_away_says_the_run_goes_on(sshd, tmp_path):
    """``chaperone run HOST CMD | head -2``: once nothing reads its output
    here, chaperone exits 141 and says on stderr that the run goes on and
    how to reach it (before: 141 in silence); the run is not killed: its
    output is all in the spool at its end."""
    env = dict(os.environ, CHAPERONE_HOME=str(tmp_path))
    line = "for i in $(seq 1 40); do echo x$i; sleep 0.05; done"
    p = subprocess.Popen([sys.executable, "-m", "chaperone.cli", "-F", str(sshd.config_file), "run", "testhost",
                          line], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"x1\n"
    p.stdout.close()  # (as head does once it has its lines)
    err = p.stderr.read().decode()
    assert p.wait(60) == 141, err
    assert "goes on" in err and "chaperone wait " in err and err.count("\n") == 1, err
    run_id = err.split("run ", 1)[1].split()[0]
    assert cli(sshd, tmp_path, "wait", run_id).returncode == 0
    logs = cli(sshd, tmp_path, "logs", run_id).stdout
    assert logs == b"".join(b"x%d\n" % i for i in range(1, 41))
