"""Helpers for the agent / local-CLI tests: real processes, no mocks.

Every helper takes the test's own ``home`` (a ``CHAPERONE_HOME``) or spool
``root``, so tests never share state.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "remote" / "agent.py"
#: The CLI, run with this Python (the package is installed editable).
CLI = [sys.executable, "-c", "from chaperone.cli import main; main()"]


def find_python(version):
    """A Python ``version`` ("3.8") on this machine: on PATH as pythonX.Y,
    under pyenv (``$PYENV_ROOT`` or ~/.pyenv), uv's or the system's; None
    if there is none.  (CI must have them: see :func:`require_python`.)"""
    import glob
    import shutil

    found = shutil.which("python%s" % version)
    if found and "/shims/" not in found:  # (a pyenv shim may know no such version)
        return found
    roots = [os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv"),
             os.path.expanduser("~/.local/share/uv/python")]
    for root in roots:
        for pattern in ("%s/versions/%s.*/bin/python%s" % (root, version, version),
                        "%s/cpython-%s.*/bin/python%s" % (root, version, version)):
            hits = sorted(glob.glob(pattern))
            if hits:
                return hits[-1]
    for path in ("/usr/bin/python%s" % version, "/usr/local/bin/python%s" % version):
        if os.access(path, os.X_OK):
            return path
    return None


def require_python(version):
    """The path of Python ``version``; skipped when it is missing, but a
    failure in CI (CHAPERONE_REQUIRE_SSHD=1), where the agent's oldest
    Python must be checked, not silently skipped."""
    import pytest

    path = find_python(version)
    if path is None:
        if os.environ.get("CHAPERONE_REQUIRE_SSHD") == "1":
            pytest.fail("no Python %s on this machine (CI checks the agent on it)" % version, pytrace=False)
        pytest.skip("no Python %s on this machine" % version)
    return path


#: The oldest Python the agent supports, if this machine has it (else None).
PY38 = find_python("3.8")


def unique(prefix="m"):
    """A unique token for run ids and process markers."""
    return "%s%s" % (prefix, uuid.uuid4().hex[:12])


def cli_env(home, **extra):
    env = dict(os.environ)
    env["CHAPERONE_HOME"] = str(home)
    env.pop("CHAPERONE_SPOOL", None)
    env.update(extra)
    return env


def cli(home, *args, input=None, timeout=60, cwd=None):
    """Run ``chaperone ARGS``; a CompletedProcess with bytes stdout/stderr."""
    return subprocess.run(
        CLI + [str(a) for a in args], env=cli_env(home), input=input,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
        cwd=cwd or str(home),
    )


def cli_popen(home, *args, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(CLI + [str(a) for a in args], env=cli_env(home), cwd=str(home), **kw)


def spool_root(home):
    """The local spool root the CLI uses under ``home``."""
    return Path(home) / "spool"


def spool_dir(home, run_id):
    return spool_root(home) / run_id


def program(run_id, argv, **kw):
    """A program.json dict; ``config``/``callback`` keys go top-level, the
    rest into ``program``."""
    spec = {"id": run_id, "program": {"argv": list(argv)}}
    for key in ("config", "callback", "version"):
        if key in kw:
            spec[key] = kw.pop(key)
    spec["program"].update(kw)
    return spec


def agent_cmd(root, *args, python=None):
    return [python or sys.executable, str(AGENT), "--root", str(root)] + [str(a) for a in args]


def agent(root, *args, input=None, python=None, timeout=60):
    """Run ``agent.py --root ROOT ARGS``; ``input`` may be a dict (program.json)."""
    if isinstance(input, dict):
        input = json.dumps(input).encode()
    return subprocess.run(
        agent_cmd(root, *args, python=python), input=input,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
    )


def agent_start(root, spec, python=None):
    """Start ``spec`` with the agent; returns the first state it printed."""
    res = agent(root, "start", input=spec, python=python)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout.decode().splitlines()[0])


def read_state(root, run_id):
    with open(os.path.join(str(root), run_id, "state.json"), "rb") as f:
        return json.loads(f.read().decode())


def run_async(coro, timeout=150):
    """Run a coroutine to its end in a new event loop, at most ``timeout`` s."""
    import asyncio

    return asyncio.run(asyncio.wait_for(coro, timeout))


def load_agent(name="chaperone_agent_under_test"):
    """remote/agent.py loaded in this process as a fresh module ``name``
    (its functions tested directly; what a host runs is the same file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, str(AGENT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(predicate, timeout=10.0, what="condition", interval=0.02):
    """Poll ``predicate`` until it returns something truthy; returns it."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def wait_state(root, run_id, states=("done", "error", "lost"), timeout=20.0):
    """Wait until the run's state.json says one of ``states`` (as refreshed
    by the agent's ``status``, so a dead supervisor reads ``lost``)."""
    if isinstance(states, str):
        states = (states,)

    def check():
        try:
            st = read_state(root, run_id)
        except (OSError, ValueError):
            return None
        if st["state"] == "running" and "lost" in states:
            res = agent(root, "status", run_id)
            if res.returncode == 0:
                st = json.loads(res.stdout.decode())
        return st if st["state"] in states else None

    return wait_for(check, timeout, what="run %s to be %s" % (run_id, "/".join(states)))


def wait_pid_field(root, run_id, timeout=10.0):
    return wait_for(lambda: read_state(root, run_id).get("pid"), timeout, what="a pid")


def procs_with(marker, exact=True):
    """Live (non-zombie) processes with ``marker`` as one of their arguments
    (``exact``), or anywhere in their command line."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            args = p.info["cmdline"] or ()
            if (marker in args) if exact else any(marker in a for a in args):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_procs(marker, timeout=5.0):
    wait_for(lambda: not procs_with(marker), timeout, what="no process with %r" % marker)


def pid_alive(pid):
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_marked(marker):
    """Clean up: SIGKILL any process left with ``marker`` (only ours)."""
    for p in procs_with(marker, exact=False):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def one_line_error(stderr):
    """Assert ``stderr`` is exactly one non-empty line and no traceback; return it."""
    text = stderr.decode("utf-8", "replace")
    lines = [l for l in text.splitlines() if l.strip()]
    assert "Traceback" not in text, text
    assert len(lines) == 1, "expected one line on stderr, got %r" % text
    return lines[0]


def ps_ids(home):
    res = cli(home, "ps", "-a", "--json")
    assert res.returncode == 0, res.stderr.decode()
    return [r["id"] for r in json.loads(res.stdout.decode())]


def read_until(stream, needle, timeout=10.0):
    """Read a Popen pipe (raw, no buffering) until ``needle`` shows up."""
    import select

    fd = stream.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for %r; got %r" % (needle, buf[-500:]))
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise AssertionError("EOF before %r; got %r" % (needle, buf[-500:]))
            buf += chunk
    return buf


def read_rest(proc, timeout=30.0):
    """The rest of a Popen's stdout and stderr, and its exit status."""
    out, err = proc.communicate(timeout=timeout)
    return out, err, proc.returncode


def marker_number():
    """A unique decimal like ``300.123456789`` for ``sleep``: findable in ps."""
    return "300.%d" % (uuid.uuid4().int % 10 ** 9)


def with_ssh_dir(ssh_dir, argv, env):
    """``argv`` with ``ssh_dir`` as ~/.ssh, in a mount namespace of its own:
    what the user's ssh config would be, changing nothing on this machine."""
    home = os.path.expanduser("~")
    if not os.path.isdir(os.path.join(home, ".ssh")):
        os.makedirs(os.path.join(home, ".ssh"), mode=0o700)
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(ssh_dir),
                           os.path.join(home, ".ssh")] + argv, env=env, capture_output=True, timeout=90)


def user_ssh_dir(tmp_path, sshd, aliases=("gpu1",)):
    """A ~/.ssh of the user's own (for :func:`with_ssh_dir`): a config with
    ``Host ALIAS`` for each alias, reaching ``sshd``, its key and known_hosts."""
    import textwrap

    ssh_dir = tmp_path / "dotssh"
    ssh_dir.mkdir(mode=0o700)
    key = ssh_dir / "id_test"
    key.write_bytes(open(sshd.identity_file, "rb").read())
    os.chmod(key, 0o600)
    (ssh_dir / "known_hosts_test").write_bytes(open(sshd.known_hosts, "rb").read())
    blocks = "".join(textwrap.dedent("""\
        Host {alias}
            HostName {addr}
            Port {port}
            User {user}
            IdentityFile ~/.ssh/id_test
            IdentitiesOnly yes
            UserKnownHostsFile ~/.ssh/known_hosts_test
            StrictHostKeyChecking yes
            BatchMode yes
            LogLevel ERROR
        """).format(alias=a, addr=sshd.listen_address, port=sshd.port, user=sshd.user) for a in aliases)
    (ssh_dir / "config").write_text(blocks)
    os.chmod(ssh_dir / "config", 0o600)
    os.chmod(ssh_dir / "known_hosts_test", 0o600)
    return ssh_dir


def main_thread_wakeups(pid):
    """Voluntary context switches of the supervisor's main thread."""
    with open("/proc/%d/task/%d/status" % (pid, pid)) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def read_terminal(master):
    """All a pseudo-terminal's programs wrote, read from its ``master``
    side until the last of them closed it (EIO)."""
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            return got
        if not chunk:
            return got
        got += chunk
