"""chaperone.command: argv shapes, input checks, and round trips through a
real shell and a real sshd."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone.command import CommandOptions, build_command, build_program

PRINTER = [sys.executable, "-I", "-S", "-c", "import sys,json; sys.stdout.write(json.dumps(sys.argv[1:]))"]

# Text that a shell would love to interpret.  NUL cannot be in an argv; lone
# surrogates cannot be encoded.
NASTY = ["'", '"', "\\", "`", "$", "$(", ")", "${HOME}", "$((1+2))", "*", "?", "[", "]",
         ";", "&&", "|", "||", "&", ">", "<", "#", "~", "!", "\n", "\r", "\t", " ", "-",
         "--", "-c", "=", "{", "}", "%", "é", "日本", "\u2028", "\x1b", "\x7f", "ß", "🙂"]
arg_text = st.lists(
    st.one_of(st.sampled_from(NASTY),
              st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                      max_size=6)),
    max_size=5,
).map("".join)
argv_lists = st.lists(arg_text, max_size=6)

RUN = dict(stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


# -- argv shapes ---------------------------------------------------------------

def test_local():
    assert build_command("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert build_command("echo hi", user="bob") == [
        "sudo", "-n", "-u", "bob", "--", "/bin/sh", "-c", "echo hi"]
    assert build_command("x", user="bob", options={"batch": False, "sudo": "/usr/bin/sudo"}) == [
        "/usr/bin/sudo", "-u", "bob", "--", "/bin/sh", "-c", "x"]


def test_ssh():
    assert build_command("echo 'hi'", host="h") == [
        "ssh", "-o", "BatchMode=yes", "--", "h", "/bin/sh -c 'echo '\"'\"'hi'\"'\"''"]
    assert build_command("true", host="h", user="bob") == [
        "ssh", "-o", "BatchMode=yes", "-l", "bob", "--", "h", "/bin/sh -c true"]


def test_ssh_all_options():
    opts = {"port": 2222, "identity_file": "/k/id", "config_file": "/c/cfg", "ssh": "/opt/ssh",
            "ssh_options": ["ControlMaster=auto", "ControlPath=/tmp/%C"], "batch": False}
    assert build_command("true", host="h", options=opts) == [
        "/opt/ssh", "-F", "/c/cfg", "-p", "2222", "-i", "/k/id",
        "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/%C", "--", "h", "/bin/sh -c true"]
    argv = build_command("true", host="h",
                         options={"ssh_options": {"ConnectTimeout": 5, "Compression": True}})
    assert argv == ["ssh", "-o", "ConnectTimeout=5", "-o", "Compression=yes",
                    "-o", "BatchMode=yes", "--", "h", "/bin/sh -c true"]


def test_ssh_as():
    assert build_command("true", host="h", user="bob", options={"mode": "ssh-as"}) == [
        "ssh", "-o", "BatchMode=yes", "-l", "bob", "--", "h", "/bin/sh -c true"]


def test_sudo_then_ssh_argv():
    assert build_command("echo $X", host="h", user="bob", options={"mode": "sudo-then-ssh"}) == [
        "sudo", "-n", "-u", "bob", "--", "ssh", "-o", "BatchMode=yes", "--", "h",
        "/bin/sh -c 'echo $X'"]


def test_ssh_then_sudo():
    argv = build_command("echo $X; ls *", host="h", user="bob",
                         options=CommandOptions(mode="ssh-then-sudo"))
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", "--"]
    assert argv[4] == "h"
    assert len(argv) == 6
    assert shlex.split(argv[5]) == ["sudo", "-n", "-u", "bob", "--", "/bin/sh", "-c",
                                    "echo $X; ls *"]


def test_build_program_shape():
    argv = build_program(["printf", "%s\n", "a b", "", "$(x)"], host="h")
    remote = shlex.split(argv[-1])
    assert remote[:2] == ["/bin/sh", "-c"]
    assert shlex.split(remote[2]) == ["exec", "printf", "%s\n", "a b", "", "$(x)"]


@given(argv_lists, st.sampled_from([None, "ssh-then-sudo"]))
def test_remote_string_parses_back(argv, mode):
    """What the remote shell parses is exactly what we asked for (shlex model)."""
    argv = ["prog", *argv]
    opts = {"mode": mode} if mode else None
    remote = build_program(argv, host="h", user="u", options=opts)[-1]
    words = shlex.split(remote)
    if mode:
        assert words[:5] == ["sudo", "-n", "-u", "u", "--"]
        words = words[5:]
    assert words[:2] == ["/bin/sh", "-c"] and len(words) == 3
    assert shlex.split(words[2]) == ["exec", *argv]


# -- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(host="h", options={"mode": "telnet"}), "unknown mode"),
    (dict(host="h", options={"mode": "ssh-as"}), "needs a user"),
    (dict(host="h", options={"mode": "sudo-then-ssh"}), "needs a user"),
    (dict(host="h", options={"mode": "ssh-then-sudo"}), "needs a user"),
    (dict(host="-oProxyCommand=evil"), "starts with '-'"),
    (dict(host="h", user="-r"), "starts with '-'"),
    (dict(user="-s"), "starts with '-'"),
    (dict(host=""), "must not be empty"),
    (dict(host="h", user=""), "must not be empty"),
    (dict(host="h\nx"), "control"),
    (dict(host="a b"), "whitespace"),
    (dict(host="h", options={"prot": 22}), "unknown option"),
    (dict(host="h", options={"port": 0}), "out of range"),
    (dict(host="h", options={"port": "22"}), "must be an int"),
    (dict(host="h", options={"ssh_options": "BatchMode=no"}), "ssh_options"),
    (dict(host="h", options={"ssh_options": ["-oX=y"]}), "must not start"),
    (dict(host="h", options={"ssh_options": {"A B": "c"}}), "invalid ssh option name"),
    (dict(host="h", options={"ssh_options": ["ProxyCommand=a\nb"]}), "control"),
    (dict(host="h", options=["ssh"]), "must be a dict"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_command("true", **kwargs)


def test_bad_command_and_argv():
    with pytest.raises(ValueError, match="NUL"):
        build_command("echo \0")
    with pytest.raises(ValueError, match="NUL"):
        build_program(["echo", "a\0b"])
    with pytest.raises(ValueError, match="empty"):
        build_program([])
    with pytest.raises(ValueError, match="argv\\[0\\]"):
        build_program([""])
    with pytest.raises(ValueError, match="string"):
        build_program("echo hi")
    with pytest.raises(ValueError, match="str"):
        build_program(["echo", 1])


# -- local execution -----------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(argv_lists)
def test_local_program_round_trip(argv):
    res = subprocess.run(build_program(PRINTER + argv), **RUN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == argv


def test_local_shell_command():
    res = subprocess.run(build_command("echo $((1+2)) | tr 3 x"), **RUN)
    assert (res.returncode, res.stdout) == (0, "x\n")


# -- against the real sshd -----------------------------------------------------

@pytest.fixture(scope="module")
def ssh_options(sshd):
    """Options for build_*: the test ssh_config plus a shared control master."""
    control_path = os.path.join(sshd.tmpdir, "cm-%C")
    mux = {"ControlMaster": "auto", "ControlPath": control_path, "ControlPersist": "60"}
    # Start the master ourselves, detached from any captured pipe (a master
    # started by a captured `ssh` would hold the pipe open).
    subprocess.run(["ssh", "-F", sshd.config_file, "-o", "ControlMaster=yes",
                    "-o", f"ControlPath={control_path}", "-o", "ControlPersist=60",
                    "-f", "-N", sshd.host_alias],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30, check=True)
    yield {"config_file": sshd.config_file, "ssh_options": mux}
    subprocess.run(["ssh", "-F", sshd.config_file, "-o", f"ControlPath={control_path}",
                    "-O", "exit", sshd.host_alias], **RUN)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=argv_lists)
def test_remote_program_round_trip(sshd, ssh_options, argv):
    res = subprocess.run(build_program(PRINTER + argv, host=sshd.host_alias,
                                       options=ssh_options), **RUN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == argv


def test_remote_program_without_control_master(sshd):
    argv = ["a b", "", "$(id)", "`id`", "*", "'\"", "\n", "-x", "日本"]
    res = subprocess.run(build_program(PRINTER + argv, host=sshd.host_alias,
                                       options={"config_file": sshd.config_file}), **RUN)
    assert res.returncode == 0, res.stderr + sshd.log_tail()
    assert json.loads(res.stdout) == argv


def test_remote_shell_command(sshd, ssh_options):
    res = subprocess.run(build_command("echo $((1+2)) | tr 3 x", host=sshd.host_alias,
                                       options=ssh_options), **RUN)
    assert (res.returncode, res.stdout) == (0, "x\n"), res.stderr
    res = subprocess.run(build_command("""printf '%s|' "a  b" 'c'"d" $((6*7)); exit 7""",
                                       host=sshd.host_alias, options=ssh_options), **RUN)
    assert (res.returncode, res.stdout) == (7, "a  b|cd|42|"), res.stderr


def test_remote_empty_command_is_not_a_login_shell(sshd, ssh_options):
    res = subprocess.run(build_command("", host=sshd.host_alias, options=ssh_options), **RUN)
    assert (res.returncode, res.stdout) == (0, ""), res.stderr


def test_remote_stdin_passes_through(sshd, ssh_options):
    res = subprocess.run(build_program(["cat"], host=sshd.host_alias, options=ssh_options),
                         input="line 1\nline 2\n", capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (0, "line 1\nline 2\n"), res.stderr


def test_remote_ssh_as(sshd, ssh_options):
    res = subprocess.run(build_program(["id", "-un"], host=sshd.host_alias, user=sshd.user,
                                       options={**ssh_options, "mode": "ssh-as"}), **RUN)
    assert (res.returncode, res.stdout) == (0, sshd.user + "\n"), res.stderr


FAKE_SUDO = """#!/bin/sh
# A stand-in for sudo that checks its arguments and runs the command as the
# current user: lets the sudo modes' quoting be tested without sudo.
[ "$1" = -n ] && shift
[ "$1" = -u ] || { echo "fake sudo: no -u" >&2; exit 99; }
[ "$2" = "$(id -un)" ] || { echo "fake sudo: can only be $(id -un)" >&2; exit 98; }
shift 2
[ "$1" = -- ] || { echo "fake sudo: no --" >&2; exit 97; }
shift
exec "$@"
"""


@pytest.fixture(scope="module")
def fake_sudo(sshd):
    path = os.path.join(sshd.tmpdir, "fake sudo")  # a space, to test quoting
    with open(path, "w") as f:
        f.write(FAKE_SUDO)
    os.chmod(path, 0o755)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=argv_lists)
def test_remote_ssh_then_sudo_round_trip_fake_sudo(sshd, ssh_options, fake_sudo, argv):
    opts = {**ssh_options, "mode": "ssh-then-sudo", "sudo": fake_sudo}
    res = subprocess.run(build_program(PRINTER + argv, host=sshd.host_alias, user=sshd.user,
                                       options=opts), **RUN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == argv


def test_sudo_then_ssh_fake_sudo(sshd, ssh_options, fake_sudo):
    argv = ["a b", "$(id)", "'", "\n", "-"]
    opts = {**ssh_options, "mode": "sudo-then-ssh", "sudo": fake_sudo}
    res = subprocess.run(build_program(PRINTER + argv, host=sshd.host_alias, user=sshd.user,
                                       options=opts), **RUN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == argv


def test_local_user_fake_sudo(sshd, fake_sudo):
    res = subprocess.run(build_command("echo $((2*21))", user=sshd.user,
                                       options={"sudo": fake_sudo}), **RUN)
    assert (res.returncode, res.stdout) == (0, "42\n"), res.stderr


needs_sudo = pytest.mark.skipif(
    shutil.which("sudo") is None,
    reason="sudo is not installed (on the test host, which is also the sshd host)")
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="sudo -n -u root needs root")


@needs_sudo
@needs_root
def test_remote_ssh_then_sudo(sshd, ssh_options):
    argv = ["a b", "$(id)", "'", "\n"]
    res = subprocess.run(build_program(PRINTER + argv, host=sshd.host_alias, user="root",
                                       options={**ssh_options, "mode": "ssh-then-sudo"}), **RUN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == argv
    res = subprocess.run(build_command("id -un", host=sshd.host_alias, user="root",
                                       options={**ssh_options, "mode": "ssh-then-sudo"}), **RUN)
    assert (res.returncode, res.stdout) == (0, "root\n"), res.stderr


@needs_sudo
@needs_root
def test_sudo_then_ssh(sshd, ssh_options):
    res = subprocess.run(build_command("id -un", host=sshd.host_alias, user="root",
                                       options={**ssh_options, "mode": "sudo-then-ssh"}), **RUN)
    assert (res.returncode, res.stdout) == (0, "root\n"), res.stderr
