"""Another user's code never runs as you; another user cannot make you
signal their chosen process (issue 12, items 2, 3 and 10).

* The bootstraps run the agent only from bytes they checked: the SSH one
  from ``~/.chaperone/agent-HASH.py`` whose sha256 it verified, or a
  checked-hash ``.pyc`` of exactly those bytes; never a timestamp-based or
  unchecked ``.pyc`` someone put in ``__pycache__``.
* ``~/.chaperone``, its ``__pycache__`` and the spool root must be this
  user's and writable by nobody else, checked without following symbolic
  links: else one line says what is wrong and how to fix it.
* Damage where the agent lives (a directory, FIFO or symbolic link in
  place of the agent file or of ``__pycache__``, a cached bytecode with a
  valid header and damaged data) is repaired by shipping again: the bad
  entry is moved aside, and the client says so.

The SSH bootstrap and ship script are run here by ``sh -c`` with a HOME of
the test's own (what sshd runs them with, minus sshd); one case goes
through a real sshd end to end.
"""

import hashlib
import importlib.util
import json
import marshal
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.helpers import AGENT, CLI, agent, agent_start, cli_env, marker_number, one_line_error, pid_alive, program, \
    read_state, wait_for
from chaperone.agent_source import agent_bytes
from chaperone.transports.ssh.common import agent_command, agent_file, ship_command
from chaperone.transports.local import _BOOTSTRAP as LOCAL_BOOTSTRAP

sys.path.insert(0, str(AGENT.parent))
import agent as ag  # noqa: E402

PY = sys.executable
PLANTED = "import os; os.write(1, b'PLANTED CODE RAN'); os._exit(0)\n"


# --- the SSH bootstrap, run as sshd would run it -------------------------------------


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    return h


def remote(home, args, stdin=b"", python=PY):
    """``agent.py ARGS`` through the SSH bootstrap, in ``home``."""
    env = dict(os.environ, HOME=str(home))
    env.pop("CHAPERONE_SPOOL", None)
    return subprocess.run(["sh", "-c", agent_command(python, str(home / "spool"), args)], input=stdin,
                          env=env, capture_output=True, timeout=60)


def ship(home, python=PY):
    env = dict(os.environ, HOME=str(home))
    return subprocess.run(["sh", "-c", ship_command(python)], input=agent_bytes(), env=env,
                          capture_output=True, timeout=60)


def agent_in(home):
    return home / ".chaperone" / os.path.basename(agent_file())


def pyc_of(path):
    return importlib.util.cache_from_source(str(path))


def planted_pyc(path, flags):
    """A .pyc of PLANTED that the interpreter's own loader takes for
    ``path``: timestamp-based with its mtime and size (flags 0), or
    hash-based with its source hash but "do not check" (flags 1)."""
    code = marshal.dumps(compile(PLANTED, str(path), "exec"))
    if flags == 0:
        info = os.stat(str(path))
        head = (int(info.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (info.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        head = importlib.util.source_hash(path.read_bytes())
    data = importlib.util.MAGIC_NUMBER + flags.to_bytes(4, "little") + head + code
    pyc = pyc_of(path)
    os.makedirs(os.path.dirname(pyc), mode=0o700, exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(data)
    os.chmod(pyc, 0o600)


def shipped(home):
    res = ship(home)
    assert res.returncode == 0, res.stderr
    res = remote(home, ["list"])
    assert res.returncode == 0 and json.loads(res.stdout) == [], res
    return agent_in(home)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags", [0, 1], ids=["timestamp-pyc", "unchecked-hash-pyc"])
def test_a_planted_pyc_never_runs(home, flags):
    path = shipped(home)
    planted_pyc(path, flags)
    res = remote(home, ["list"])
    assert b"PLANTED" not in res.stdout, res
    assert res.returncode == 0 and json.loads(res.stdout) == [], res
    # ... and the cache holds the checked-hash bytecode of the agent again
    data = open(pyc_of(path), "rb").read()
    assert data[4:8] == b"\x03\x00\x00\x00" and data[8:16] == importlib.util.source_hash(agent_bytes())


@pytest.mark.timeout(60)
def test_the_local_bootstrap_never_runs_a_planted_pyc(tmp_path):
    d = tmp_path / "pkg"
    d.mkdir()
    path = d / "agent.py"
    path.write_bytes(agent_bytes())
    argv = [PY, "-I", "-S", "-c", LOCAL_BOOTSTRAP, str(path), "--root", str(tmp_path / "spool"), "list"]
    assert subprocess.run(argv, capture_output=True).stdout == b"[]\n"
    assert os.path.exists(pyc_of(path))  # (a cache it may use)
    for flags in (0, 1):
        planted_pyc(path, flags)
        res = subprocess.run(argv, capture_output=True)
        assert res.returncode == 0 and res.stdout == b"[]\n", res
    # A cache others may write is not used, nor written.
    os.unlink(pyc_of(path))
    os.chmod(os.path.dirname(pyc_of(path)), 0o777)
    planted_pyc(path, 0)
    res = subprocess.run(argv, capture_output=True)
    assert res.returncode == 0 and res.stdout == b"[]\n", res
    assert open(pyc_of(path), "rb").read()[4:8] == b"\x00\x00\x00\x00"  # (the planted one, untouched)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where, how, words", [
    (".chaperone", "g+w", "is writable by group or others (mode 0770): run chmod go-w"),
    (".chaperone", "o+w", "is writable by group or others (mode 0707): run chmod go-w"),
    (".chaperone/__pycache__", "g+w", "is writable by group or others (mode 0770): run chmod go-w"),
    (".chaperone/__pycache__", "symlink", "is a symbolic link"),
    (".chaperone", "symlink", "is a symbolic link"),
])
def test_an_agent_directory_others_can_write_is_refused(home, tmp_path, where, how, words):
    path = shipped(home)
    planted_pyc(path, 0)
    target = home / where
    if how == "symlink":
        moved = tmp_path / "elsewhere"
        os.rename(str(target), str(moved))
        os.symlink(str(moved), str(target))
    else:
        os.chmod(str(target), 0o770 if how == "g+w" else 0o707)
    res = remote(home, ["list"])
    assert b"PLANTED" not in res.stdout
    assert res.returncode == 3, res
    line = one_line_error(res.stderr)
    assert line.startswith("chaperone-agent: %s " % target) and words in line, line
    # shipping again does not quietly make it private (what was planted would stay)
    if how != "symlink":
        ship(home)
        assert stat.S_IMODE(os.lstat(str(target)).st_mode) != 0o700


# --- a second user --------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_user():
    """A throw-away local user (CI runs as root), removed afterwards."""
    if os.getuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a second user")
    name = "chtst%s" % uuid.uuid4().hex[:8]
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def as_user(user, *argv):
    return subprocess.run(["runuser", "-u", user.pw_name, "--"] + [str(a) for a in argv],
                          capture_output=True, timeout=30)


@pytest.fixture
def canary():
    proc = subprocess.Popen(["sleep", marker_number()], start_new_session=True)
    wait_for(lambda: ag.proc_stat(proc.pid), 5, what="the canary")
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def forged_state(run_id, root, canary):
    """What another user can write: a running state whose supervisor is
    gone and whose program is the canary, with every field right (its
    start time, this host's boot id and host id: /proc is readable)."""
    st = ag.Supervisor(ag.Run(str(root), run_id), {"config": {}}, None).base_state()
    st.update(agent_pid=os.getpid(), agent_start=1, pid=canary.pid, pgid=canary.pid,
              pid_start=ag.proc_stat(canary.pid)[1])
    return json.dumps(st)


@pytest.fixture
def reachable():
    """A directory the other user can reach (pytest's tmp_path is 0700)."""
    import tempfile

    d = tempfile.mkdtemp(prefix="chaperone-strict-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_another_user_cannot_make_list_kill_a_group(reachable, other_user, canary, mode):
    """A spool root others can write (even sticky, as /tmp): another user
    plants a run naming the canary; status, list and clean refuse the
    spool in one line, and the canary lives."""
    root = reachable / "spool"
    root.mkdir()
    os.chmod(str(root), mode)
    if mode == 0o770:
        os.chown(str(root), 0, other_user.pw_gid)
    planted = root / "evil"
    res = as_user(other_user, "mkdir", planted)
    assert res.returncode == 0, res
    subprocess.run(["runuser", "-u", other_user.pw_name, "--", "sh", "-c", "cat > %s/state.json" % planted],
                   input=forged_state("evil", root, canary).encode(), check=True)
    for args in (["list"], ["status", "evil"], ["clean", "--force", "evil"], ["signal", "evil", "KILL"]):
        res = agent(root, *args)
        assert res.returncode == 3, (args, res)
        line = one_line_error(res.stderr)
        assert line.startswith("chaperone-agent: unsafe spool directory %s: %s is writable by " % (root, root)), line
        assert "chmod go-w %s" % root in line
        assert pid_alive(canary.pid)
    # start refuses it too: nothing starts in a spool others can write
    res = agent(root, "start", input=program("mine", ["true"]))
    assert res.returncode == 3 and "unsafe spool directory" in one_line_error(res.stderr)
    assert not (root / "mine").exists()


@pytest.mark.timeout(60)
def test_a_run_directory_of_another_user_is_one_error_line(tmp_path, other_user, canary):
    root = tmp_path / "spool"
    agent_start(root, program("ok", ["true"]))
    (root / "evil").mkdir()
    (root / "evil" / "state.json").write_text(forged_state("evil", root, canary))
    os.chown(str(root / "evil"), other_user.pw_uid, other_user.pw_gid)
    res = agent(root, "list")
    assert res.returncode == 0 and [s["id"] for s in json.loads(res.stdout)] == ["ok"]
    assert "run evil: its spool directory %s belongs to uid %d" % (root / "evil", other_user.pw_uid) \
        in one_line_error(res.stderr)
    res = agent(root, "status", "evil")
    assert res.returncode == 3 and "belongs to uid" in one_line_error(res.stderr)
    assert pid_alive(canary.pid)


@pytest.mark.timeout(60)
def test_a_symlinked_home_spool_owned_by_another_user_is_refused(tmp_path, home, other_user, canary):
    """``~/.chaperone`` is a symbolic link to a directory of another user
    (who planted a run there): the agent (default root) and the SSH
    bootstrap refuse it in one line; nothing is signalled, nothing runs."""
    theirs = tmp_path / "theirs"
    (theirs / "runs" / "evil").mkdir(parents=True)
    (theirs / "runs" / "evil" / "state.json").write_text(forged_state("evil", theirs / "runs", canary))
    (theirs / "agent.py").write_text(PLANTED)
    for dirpath, dirnames, filenames in os.walk(str(theirs)):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(name, other_user.pw_uid, other_user.pw_gid)
    os.symlink(str(theirs), str(home / ".chaperone"))
    env = dict(os.environ, HOME=str(home))
    mine = tmp_path / "mine"  # (a link of theirs to a directory of mine: refused too)
    mine.mkdir()
    os.symlink(str(mine), str(tmp_path / "link"))
    os.lchown(str(tmp_path / "link"), other_user.pw_uid, other_user.pw_gid)
    res = agent(tmp_path / "link", "list")
    assert res.returncode == 3, res
    assert "%s is a symbolic link of uid %d" % (tmp_path / "link", other_user.pw_uid) in one_line_error(res.stderr)
    env.pop("CHAPERONE_SPOOL", None)
    res = subprocess.run([PY, str(AGENT), "list"], env=env, capture_output=True, timeout=30)
    assert res.returncode == 3, res
    assert "%s belongs to uid %d, not to this user" % (theirs, other_user.pw_uid) in one_line_error(res.stderr)
    assert pid_alive(canary.pid)
    res = subprocess.run(["sh", "-c", agent_command(PY, None, ["list"])], env=env, capture_output=True, timeout=30)
    assert res.returncode == 3 and b"PLANTED" not in res.stdout
    assert "is a symbolic link" in one_line_error(res.stderr)
    assert pid_alive(canary.pid)


# --- damage where the agent lives: repaired, and said --------------------------------------


def damage(path, how):
    if how == "directory":
        os.unlink(str(path))
        os.mkdir(str(path))
        (path / "junk").write_text("x")
    elif how == "fifo":
        os.unlink(str(path))
        os.mkfifo(str(path))
    elif how == "symlink-to-dir":
        os.unlink(str(path))
        os.symlink("/", str(path))
    elif how == "pyc-damaged":
        pyc = pyc_of(path)
        data = open(pyc, "rb").read()
        with open(pyc, "wb") as f:
            f.write(data[:16] + data[16:200])  # valid header, marshal data too short
    elif how == "pycache-fifo":
        cache = os.path.dirname(pyc_of(path))
        shutil.rmtree(cache)
        os.mkfifo(cache)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["directory", "fifo", "symlink-to-dir", "pyc-damaged", "pycache-fifo"])
def test_agent_file_damage_is_repaired_and_said(home, how):
    path = shipped(home)
    damage(path, how)
    res = remote(home, ["list"])
    assert res.returncode == 97 and res.stdout == b"", res  # (never a hang, never a traceback)
    res = ship(home)
    assert res.returncode == 0, res
    notes = res.stderr.decode()
    assert notes.startswith("chaperone-agent: note: "), notes
    if how == "pyc-damaged":
        assert "replaced the damaged cached bytecode %s" % pyc_of(path) in notes
    else:
        assert "moved aside %s" % (path if not how.startswith("pycache") else os.path.dirname(pyc_of(path))) in notes
        assert len([n for n in os.listdir(str(path.parent)) if ".damaged-" in n]) == 1
    res = remote(home, ["list"])
    assert res.returncode == 0 and json.loads(res.stdout) == [], res


@pytest.mark.timeout(120)
def test_a_directory_in_place_of_the_agent_over_ssh(tmp_path):
    """End to end through an sshd of its own whose sessions get a private
    HOME (sshd's SetEnv), so that the directory planted where the agent
    goes is seen by no other test running at once: the run works, and the
    CLI says what was repaired."""
    from support.sshd import SSHD

    remote_home = tmp_path / "rhome"
    remote_home.mkdir(mode=0o700)
    sshd = SSHD(extra_config="SetEnv HOME=%s\n" % remote_home)
    sshd.start()
    home = tmp_path / "chome"
    home.mkdir()
    real = os.path.join(str(remote_home), ".chaperone", os.path.basename(agent_file()))

    def run():
        return subprocess.run(CLI + ["-F", sshd.config_file, "run", "--spool", str(tmp_path / "spool"), "testhost",
                                     "--", "echo", "hi"], env=cli_env(home), cwd=str(home),
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=60)

    try:
        _directory_in_place_of_the_agent(run, real)
    finally:
        sshd.stop()


def _directory_in_place_of_the_agent(run, real):
    assert run().returncode == 0
    assert os.path.isfile(real)  # (shipped into the private home)
    try:
        os.unlink(real)
    except FileNotFoundError:
        pass
    os.mkdir(real)
    res = run()
    assert res.returncode == 0 and res.stdout == b"hi\n", res
    assert ("moved aside %s (a directory)" % real) in res.stderr.decode(), res.stderr
    for name in os.listdir(os.path.dirname(real)):
        if name.startswith(os.path.basename(real) + ".damaged-"):
            shutil.rmtree(os.path.join(os.path.dirname(real), name))


@pytest.mark.timeout(60)
def test_the_bootstraps_on_python38(home, tmp_path):
    """The loaders use _imp.source_hash and the frozen importlib's magic
    number: there since 3.7; the oldest Python the agent supports is 3.8."""
    from support.helpers import require_python

    PY38 = require_python("3.8")
    assert ship(home, python=PY38).returncode == 0
    for _ in range(2):  # (compiles and writes the .pyc, then uses it)
        res = remote(home, ["list"], python=PY38)
        assert res.returncode == 0 and json.loads(res.stdout) == [], res
    pyc = home / ".chaperone" / "__pycache__" / (os.path.basename(agent_file())[:-3] + ".cpython-38.pyc")
    assert open(str(pyc), "rb").read()[4:8] == b"\x03\x00\x00\x00"
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "agent.py").write_bytes(agent_bytes())
    for _ in range(2):
        res = subprocess.run([PY38, "-I", "-S", "-c", LOCAL_BOOTSTRAP, str(d / "agent.py"), "--root",
                              str(tmp_path / "spool"), "list"], capture_output=True, timeout=30)
        assert res.returncode == 0 and res.stdout == b"[]\n", res


def test_the_bootstrap_hashes_the_agent_once_without_openssl(home, tmp_path):
    """Through the SSH bootstrap an agent call hashes the agent once, with
    the interpreter's own SHA-256: the bootstrap checks the bytes and tells
    the agent (BOOTSTRAP_SHA256), which does not read and hash itself
    again with hashlib (OpenSSL: 3 ms of every call)."""
    assert ship(home).returncode == 0
    python = tmp_path / "python-importtime"
    python.write_text('#!/bin/sh\nexec %s -X importtime "$@"\n' % PY)
    python.chmod(0o755)
    res = remote(home, ["list"], python=str(python))
    assert res.returncode == 0, res.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert imported and "hashlib" not in imported and "_hashlib" not in imported, imported
