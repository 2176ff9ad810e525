"""The README's examples run as written: its Python examples against a
real sshd that the user's own ~/.ssh/config names `gpu1` (a private
~/.ssh in a mount namespace of its own), and its first command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import user_ssh_dir, with_ssh_dir

README = Path(__file__).resolve().parents[2] / "README.md"


def python_examples():
    return re.findall(r"```python\n(.*?)\n```", README.read_text(), re.S)


def test_the_readme_has_library_examples():
    assert len(python_examples()) >= 2


@pytest.mark.timeout(150)
@pytest.mark.parametrize("index", range(len(python_examples())))
def test_a_library_example_runs_as_written(sshd, tmp_path, index):
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"):
        pytest.skip("needs root and unshare for a private ~/.ssh")
    code = python_examples()[index]
    env = dict(os.environ, CHAPERONE_HOME=str(tmp_path / "home"))
    res = with_ssh_dir(user_ssh_dir(tmp_path, sshd), [sys.executable, "-c", code], env)
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert "Traceback" not in res.stderr.decode()
    if "step $i" in code:
        assert "step 1\nstep 2\nstep 3\n" in out and " done 0" in out
    if "job %d" in code:
        assert out.count(" 0 b'job ") == 3 and "done" in out


def test_the_first_command_runs(tmp_path):
    res = subprocess.run([sys.executable, "-m", "chaperone", "run", "local", "--", "echo", "hello"],
                         env=dict(os.environ, CHAPERONE_HOME=str(tmp_path)), capture_output=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, b"hello\n"), res.stderr
