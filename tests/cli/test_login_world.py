"""The world a program starts in, as ``ssh HOST CMD`` gives it: a command
line is run by the user's login shell (not /bin/sh), and an exact argv by
no shell at all.  Local runs here; over a real sshd in
tests/ssh/test_ssh_differential.py."""

import json
import os
import pwd
import shlex
import subprocess
import sys

import pytest

from support.helpers import CLI, cli, spool_dir, unique

LOGIN_SHELL = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"


@pytest.mark.timeout(60)
def test_a_command_line_is_run_by_the_login_shell(home):
    line = "echo $0; [[ a == a ]] && echo double-brackets; printf '%s\\n' \"${BASH_VERSION:+bash}\""
    run_id = unique("sh")
    res = cli(home, "run", "local", "--id", run_id, line)
    # what sshd does with a command: the login shell, named by its base name, -c LINE
    want = subprocess.run([os.path.basename(LOGIN_SHELL), "-c", line], executable=LOGIN_SHELL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert (res.returncode, res.stdout, res.stderr) == (want.returncode, want.stdout, want.stderr)
    if LOGIN_SHELL.endswith("bash"):
        assert res.stdout == b"bash\ndouble-brackets\nbash\n"
    # the run is recorded as typed; the spool holds the line, for the shell
    info = json.loads(cli(home, "status", run_id, "--json").stdout)
    assert (info["command"], info["argv"]) == (line, None)
    spec = json.loads((spool_dir(home, run_id) / "program.json").read_bytes())
    assert (spec["program"]["argv"], spec["program"]["shell"]) == ([line], True)


@pytest.mark.timeout(60)
def test_an_exact_argv_is_never_shell_interpreted(home):
    run_id = unique("ex")
    res = cli(home, "run", "local", "--id", run_id, "--", "echo", "$0", "$(id)", "*", "[[")
    assert (res.returncode, res.stdout) == (0, b"$0 $(id) * [[\n"), res.stderr
    info = json.loads(cli(home, "status", run_id, "--json").stdout)
    assert info["argv"] == ["echo", "$0", "$(id)", "*", "[["]
    spec = json.loads((spool_dir(home, run_id) / "program.json").read_bytes())
    assert spec["program"]["shell"] is False


#: Prints what a program's world is (see tests/ssh/test_ssh_differential.py's PROBE).
from support.probes import PROBE  # noqa: E402


@pytest.mark.timeout(60)
def test_a_local_program_gets_the_callers_world(home, tmp_path):
    """``run local`` gives the program the environment chaperone was given
    (not what Python changed in its own: in the C locale it adds
    LC_CTYPE=C.UTF-8, PEP 538), and the rest of the world a program
    started here directly gets; a command line as ``SHELL -c LINE`` here."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "CHAPERONE_HOME": str(home),
           "PWD": str(tmp_path), "ODD": "a b\tc\u00e9"}  # no LANG, LC_*: the C locale
    argv = [os.path.realpath(sys.executable), "-I", "-S", "-c", PROBE]
    line = shlex.join(argv)
    # (in a session of its own, as under chaperone and under sshd)
    direct = {"argv": subprocess.run(argv, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, check=True, start_new_session=True).stdout,
              "line": subprocess.run([os.path.basename(LOGIN_SHELL), "-c", line], executable=LOGIN_SHELL, env=env,
                                     cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     check=True, start_new_session=True).stdout}
    for name, words in (("argv", ["--", *argv]), ("line", [line])):
        res = subprocess.run(CLI + ["run", "local", *words], env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert res.returncode == 0, res.stderr
        got, want = json.loads(res.stdout), json.loads(direct[name])
        assert "LC_CTYPE" not in got["env"]
        for key in sorted(want):
            assert got[key] == want[key], "%s: %s differs from a direct start's" % (name, key)
