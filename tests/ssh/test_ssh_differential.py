"""`chaperone run testhost -- ARGV` against real OpenSSH `ssh testhost CMD`.

For every argv of the corpus, both run on the same real sshd (the ``sshd``
fixture, host key checking on) and must give the same stdout bytes, the same
stderr bytes and the same exit status.  ``ssh`` takes one shell string and
chaperone an exact argv: ``shlex.join(argv)`` makes them equivalent, so
quotes, ``$()``, globs, ``~`` and newlines in the arguments must reach the
program literally on both sides.

Signals are the one deliberate difference.  When the session's command
itself is killed by signal N, OpenSSH reports exit 255 (sshd sends an
``exit-signal``, which ssh maps to 255), while chaperone reports ``128+N``
like a shell does.  So for the signal cases the ssh side is wrapped so a
shell reports the status: ``exec 3>&2 2>/dev/null; CMD 2>&3 3>&-; exit $?``
(the wrapping shell's own stderr goes to /dev/null so its "Terminated" /
"Killed" job message is not mixed into the program's stderr, which still
goes to the session's stderr through fd 3).  ``test_ssh_reports_255_for_a_
killed_command`` pins that OpenSSH behaviour down, so the reason for the
wrapping stays checked.
"""

import concurrent.futures
import hashlib
import json
import os
import pwd
import shlex
import subprocess
import sys
import threading

import pytest

from support.probes import PROBE
from support.helpers import CLI, cli_env

#: Deterministic, non-repeating 20.48 MB on stdout (10000 blocks of
#: sha256(i) * 64), and 10000 short lines on stderr in between.
BIG = ("import os,hashlib\n"
       "for i in range(10000):\n"
       "    os.write(1, hashlib.sha256(b'%d' % i).digest() * 64); os.write(2, b'e%05d\\n' % i)")
BINARY = r"import sys; sys.stdout.buffer.write(b'\x00\xff\xfe\x80 NUL\x00 bad utf-8 \xc3\x28 end\x00')"
LITERAL_ARGS = [
    "héllo wörld", "✓ 日本語 🎉", "$(echo pwned)", "`echo pwned`", "*", "/*", "~", "$HOME", "a'b",
    'a"b', "\\", ";", "|", "&&", "!", "#", "{a,b}", "?", "[a]", " lead", "trail ", "", "a\nb",
    "tab\there", "-n",
]

CORPUS = {
    "no-trailing-newline": ["printf", "no newline at the end"],
    "empty-output-and-stdin": ["cat"],
    "exit-1-stderr-only": ["sh", "-c", "echo to stderr >&2; printf 'no newline' >&2; exit 1"],
    "exit-7-both-streams": ["sh", "-c", "echo partial; echo oops >&2; exit 7"],
    "exit-255": ["sh", "-c", "printf 'bye'; exit 255"],
    "binary-nul-invalid-utf8": ["python3", "-c", BINARY],
    "large-20MB": ["python3", "-c", BIG],
    # Unicode, quotes, $(), globs, ~, newlines: each must arrive as it is.
    "literal-unicode-and-shell-syntax": ["printf", "[%s]\n", *LITERAL_ARGS],
}

#: Shell command lines (one string, no ``--``): run by the login shell on
#: the host (root's is bash here), as ``ssh HOST LINE`` runs them: ``$0``
#: names it, and bash-only syntax works.
SHELL_LINES = {
    "login-shell-and-bash-syntax": "echo $0; [[ a == a ]] && echo double-brackets; echo ${BASH_VERSION:+bash}; "
                                   "a=(x y z); echo ${a[2]}",
    "pipeline-and-home": "echo $HOME | tr a-z A-Z; echo $((6 * 7)) >&2; exit 3",
}

SIGNALS = {
    "signal-TERM": ["sh", "-c", "echo before; echo err >&2; kill -TERM $$; echo after"],
    "signal-KILL": ["python3", "-c", "import os,sys; sys.stdout.write('x'); sys.stdout.flush(); "
                    "os.kill(os.getpid(), 9)"],
}


def _communicate(argv, env=None, cwd=None, out=None):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out.update(stdout=stdout, stderr=stderr, code=proc.returncode)
    return out


def both(sshd, home, argv, ssh_command):
    """Run chaperone and ssh at the same time; (chaperone, ssh) results.
    ``argv``: an exact argv (after ``--``), or a string: one shell command
    line (no ``--``)."""
    home.mkdir(exist_ok=True)
    mine, theirs = {}, {}
    words = [argv] if isinstance(argv, str) else ["--", *argv]
    chaperone = CLI + ["-F", sshd.config_file, "run", "testhost", *words]
    t = threading.Thread(target=_communicate, args=(chaperone, cli_env(home), str(home), mine))
    t.start()
    _communicate(sshd.ssh_argv(ssh_command), out=theirs)
    t.join()
    return mine, theirs


def _signal_wrapped(argv):
    # See the module docstring: ssh alone says 255; a shell says 128+N.
    return "exec 3>&2 2>/dev/null; %s 2>&3 3>&-; exit $?" % shlex.join(argv)


@pytest.fixture(scope="module")
def quiet_sshd(tmp_path_factory):
    """A test sshd whose sessions get a home of their own with an empty
    ``.bashrc``: what a login prints is then the same every time.  (The
    machine's own rc files may print, and not always: two logins at once
    running ``pyenv rehash`` race and one of them says so on stderr.  ssh
    passes that on, chaperone keeps the program's output apart from it, so
    such noise would make the sides differ for a reason this file does not
    test; the tests with the ``noisy_host`` fixture test it.)"""
    from support.sshd import require_sshd, sshd_with_home

    require_sshd()
    server = sshd_with_home(tmp_path_factory.mktemp("quiet") / "home", "")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def outcomes(quiet_sshd, tmp_path_factory):
    """Every case run once, three at a time (the machine is slow to start
    processes); each with its own CHAPERONE_HOME.  {name: (chaperone, ssh)}."""
    sshd = quiet_sshd
    cases = {name: (argv, shlex.join(argv)) for name, argv in CORPUS.items()}
    cases.update({name: (argv, _signal_wrapped(argv)) for name, argv in SIGNALS.items()})
    cases.update({name: (line, line) for name, line in SHELL_LINES.items()})
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(both, sshd, tmp_path_factory.mktemp("home"), argv, command)
                   for name, (argv, command) in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_same(mine, theirs):
    for key in ("code", "stderr", "stdout"):  # the short ones first: clearer failures
        a, b = mine[key], theirs[key]
        if key != "code" and len(a) + len(b) > 2000:
            assert (len(a), a == b) == (len(b), True), "%s differs (chaperone vs ssh)" % key
        else:
            assert a == b, "%s differs (chaperone %r, ssh %r)" % (key, a, b)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CORPUS))
def test_same_as_openssh(outcomes, name):
    mine, theirs = outcomes[name]
    assert_same(mine, theirs)


def test_the_corpus_does_what_it_says(outcomes):
    """The cases really cover what their names say (on the ssh side, which
    the chaperone side equals)."""
    out = {name: theirs for name, (_, theirs) in outcomes.items()}
    assert out["no-trailing-newline"]["stdout"] == b"no newline at the end"
    assert out["empty-output-and-stdin"] == {"stdout": b"", "stderr": b"", "code": 0}
    assert out["exit-1-stderr-only"]["code"] == 1 and out["exit-1-stderr-only"]["stdout"] == b""
    assert out["exit-7-both-streams"]["code"] == 7
    assert out["exit-255"]["code"] == 255 and out["exit-255"]["stdout"] == b"bye"
    assert b"\x00" in out["binary-nul-invalid-utf8"]["stdout"]
    with pytest.raises(UnicodeDecodeError):
        out["binary-nul-invalid-utf8"]["stdout"].decode()
    big = out["large-20MB"]
    assert len(big["stdout"]) == 10000 * 32 * 64
    assert big["stdout"][-32:] == hashlib.sha256(b"9999").digest()
    assert big["stderr"] == b"".join(b"e%05d\n" % i for i in range(10000))
    printed = out["literal-unicode-and-shell-syntax"]["stdout"].decode()
    assert printed == "".join("[%s]\n" % a for a in LITERAL_ARGS)
    assert (out["signal-TERM"]["code"], out["signal-TERM"]["stdout"]) == (128 + 15, b"before\n")
    assert (out["signal-KILL"]["code"], out["signal-KILL"]["stdout"]) == (128 + 9, b"x")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(SHELL_LINES))
def test_a_command_line_is_run_by_the_login_shell_as_by_ssh(outcomes, name):
    mine, theirs = outcomes[name]
    assert_same(mine, theirs)


def test_the_login_shell_cases_do_what_they_say(outcomes, quiet_sshd):
    out = {name: theirs for name, (_, theirs) in outcomes.items()}
    home = quiet_sshd.extra_config.split("HOME=", 1)[1].split("\n", 1)[0]
    shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    assert shell.endswith("bash"), "these cases expect bash as the login shell (%s here)" % shell
    assert out["login-shell-and-bash-syntax"]["stdout"] == b"bash\ndouble-brackets\nbash\nz\n"
    assert out["pipeline-and-home"]["stdout"] == home.upper().encode() + b"\n"
    assert (out["pipeline-and-home"]["stderr"], out["pipeline-and-home"]["code"]) == (b"42\n", 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(SIGNALS))
def test_killed_by_signal_same_as_a_shell_over_openssh(outcomes, name):
    mine, theirs = outcomes[name]
    assert_same(mine, theirs)


@pytest.mark.timeout(30)
def test_ssh_reports_255_for_a_killed_command(sshd):
    # The deliberate difference: OpenSSH itself says 255 when the session's
    # command dies of a signal; chaperone (above) says 128+N.
    res = subprocess.run(sshd.ssh_argv("exec sh -c 'kill -TERM $$'"), stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=30)
    assert res.returncode == 255


# --- the process world: the same as ssh's ----------------------------------------------


#: A ``python3`` shim as pyenv's: it changes PATH and sets PYENV_* before
#: it runs the real interpreter.
SHIM = """#!/bin/sh
PATH="/opt/shimmed/versions/3.x/bin:/opt/shimmed/libexec:$PATH"
PYENV_VERSION=3.x PYENV_ROOT=/opt/shimmed PYENV_DIR="$PWD"
export PATH PYENV_VERSION PYENV_ROOT PYENV_DIR
exec %s "$@"
"""


@pytest.fixture(scope="module")
def shimmed_sshd(tmp_path_factory):
    """A test sshd of its own whose sessions start with a ``python3`` shim
    first on PATH (sshd's SetEnv).  (A login shell's rc files may put
    another in front, as here: pyenv's own, which changes PATH too.)"""
    from support.sshd import SSHD, require_sshd

    require_sshd()
    shims = tmp_path_factory.mktemp("shims")
    real = os.path.realpath(sys.executable)
    (shims / "python3").write_text(SHIM % shlex.quote(real))
    (shims / "python3").chmod(0o755)
    server = SSHD(extra_config="SetEnv PATH=%s:/usr/local/bin:/usr/bin:/bin\n" % shims)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _ssh_out(sshd, command):
    res = subprocess.run(sshd.ssh_argv(command), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.timeout(180)
def test_the_program_gets_the_process_world_of_ssh(shimmed_sshd, tmp_path):
    """A program run by chaperone gets what ``ssh HOST CMD`` gives it:
    the same environment (not the one the python3 shim and Python's locale
    coercion made for the agent), signal mask and ignored signals, open
    descriptors, umask, limits, ids, cwd and niceness; for a shell command
    line and for an exact argv (``ssh HOST ARGV`` run as one command)."""
    sshd = shimmed_sshd
    # The host's python3 changes the environment it is given (else this
    # test would prove nothing): the shim, or one a login rc put first.
    path = _ssh_out(sshd, "echo \"$PATH\"").strip()
    assert _ssh_out(sshd, "python3 -c 'import os; print(os.environ[\"PATH\"])'").strip() != path
    python = os.path.realpath(sys.executable)
    argv = [python, "-I", "-S", "-c", PROBE]
    line = shlex.join(argv)
    cases = {"line": ([line], line, "openssh"), "argv": (["--", *argv], line, "openssh"),
             "argv-asyncssh": (["--", *argv], line, "asyncssh")}
    want = json.loads(_ssh_out(sshd, line))
    for name, (words, ssh_command, client) in cases.items():
        home = tmp_path / name
        home.mkdir()
        res = subprocess.run(CLI + ["-F", sshd.config_file, "run", "testhost", *words],
                             env=cli_env(home, CHAPERONE_SSH_CLIENT=client),
                             cwd=str(home), stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        for key in sorted(want):
            assert got[key] == want[key], "%s: %s differs from ssh's" % (name, key)
