"""Which cipher chaperone's SSH connections use.  On a CPU with AES
instructions AES-GCM moves bytes with about a third of the CPU time of
chacha20-poly1305, which OpenSSH (and asyncssh) put first by default: both
clients then put AES-GCM first, keeping every other default cipher after
it.  A ``Ciphers`` in the user's ssh config or ``-o`` options stands, as
with ssh.  Checked in the server's log, where sshd says what was agreed."""

import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaperone.transports.ssh import options as ssh_opts
from support.helpers import CLI, cli_env
from support.sshd import SSHD, require_sshd


@pytest.fixture(scope="module")
def debug_sshd():
    require_sshd()
    server = SSHD(log_level="DEBUG1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def agreed(server, since):
    """The ciphers sshd agreed on for connections logged after offset ``since``."""
    with open(server.log_file, errors="replace") as f:
        f.seek(since)
        return set(re.findall(r"kex: client->server cipher: (\S+)", f.read()))


def log_size(server):
    with open(server.log_file, "rb") as f:
        return len(f.read())


def test_a_ciphers_setting_of_the_user_stands(tmp_path):
    own = tmp_path / "config"
    own.write_text("Host *\n    Ciphers chacha20-poly1305@openssh.com\n")
    empty = tmp_path / "empty"
    empty.write_text("Host *\n    ServerAliveInterval 5\n")
    assert ssh_opts.prefer_fast_ciphers([str(own)]) is False
    assert ssh_opts.prefer_fast_ciphers([str(empty)], ["Ciphers=aes256-ctr"]) is False
    assert ssh_opts.prefer_fast_ciphers([str(empty)]) is ssh_opts.cpu_has_aes()
    # a Ciphers in a file the config includes (as a system crypto policy does) stands too
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "50-crypto.conf").write_text("Ciphers aes256-gcm@openssh.com\n")
    including = tmp_path / "including"
    including.write_text("Host *\n    Include %s/policy.d/*.conf\n" % tmp_path)
    assert ssh_opts.prefer_fast_ciphers([str(including)]) is False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_connections_agree_on_aes_gcm_unless_told(debug_sshd, tmp_path, client):
    if not ssh_opts.cpu_has_aes():
        pytest.skip("this CPU has no AES instructions: chaperone keeps the default order")
    home = tmp_path / "home"
    home.mkdir()
    env = cli_env(home, CHAPERONE_SSH_CLIENT=client)

    def run(config, *extra):
        at = log_size(debug_sshd)
        res = subprocess.run(CLI + ["-F", str(config), "run", "-q"] + list(extra) + ["testhost", "--", "true"],
                             env=env, cwd=str(home), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return agreed(debug_sshd, at)

    assert run(debug_sshd.config_file) == {"aes128-gcm@openssh.com"}
    theirs = tmp_path / "theirs"
    theirs.write_text("Ciphers chacha20-poly1305@openssh.com\n" + open(debug_sshd.config_file).read())
    assert run(theirs) == {"chacha20-poly1305@openssh.com"}
    assert run(debug_sshd.config_file, "-o", "Ciphers=aes256-ctr") == {"aes256-ctr"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from(["Ciphers aes128-ctr", "  ciphers=aes", "CiphersX y", "# Ciphers x",
                                       "\tConnectTimeout 5", "ControlMaster auto", "controlpersist=1",
                                       "Host *", "HostName h", "ControlPathX", " é Ciphers", "Include",
                                       "Ciphers", "ConnectTimeoutx 3", ""]), max_size=6))
def test_config_keywords_read_as_the_regular_expression_did(tmp_path, lines):
    """config_mentions reads keywords without re (the head start calls it
    before ssh starts): as ``\\s*(KEYWORD)\\b`` matched, case-insensitive."""
    path = tmp_path / ("cfg-%d" % (hash(tuple(lines)) & 0xffffff))
    path.write_text("\n".join(lines) + "\n")
    for names, pattern in ((("Ciphers",), "Ciphers"), (("ConnectTimeout",), "ConnectTimeout"),
                           (("ControlMaster", "ControlPath", "ControlPersist"), "Control(Master|Path|Persist)")):
        want = any(re.match(r"\s*(%s)\b" % pattern, line, re.IGNORECASE) for line in lines)
        assert ssh_opts.config_mentions([str(path)], *names) == want, (names, lines)


@settings(max_examples=400, deadline=None)
@given(pattern=st.text(alphabet="ab*?.c", max_size=7), name=st.text(alphabet="abc.", max_size=7))
def test_include_wildcards_match_as_fnmatch(pattern, name):
    """config_keywords follows ``Include dir/*.conf`` without glob (and its
    re): the same names as fnmatch's (glob's) ``*`` and ``?``."""
    import fnmatch

    assert ssh_opts._wild_match(pattern, name) == fnmatch.fnmatchcase(name, pattern)


def test_include_globs_list_what_glob_lists(tmp_path):
    import glob

    for name in ("a.conf", "b.conf", ".hidden.conf", "c.txt", "dir.conf", "x"):
        (tmp_path / name).write_text("")
    for pattern in ("*.conf", "*", ".*", "?.conf", "a.conf", "nothere.conf", "*.none", "[ab].conf", "*/x",
                    "x"):
        path = str(tmp_path / pattern)
        assert sorted(ssh_opts._glob(path)) == sorted(glob.glob(path)), pattern
    assert ssh_opts._glob(str(tmp_path / "missing" / "*.conf")) == []
