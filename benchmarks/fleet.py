#!/usr/bin/env python3
"""Many hosts at once, side by side: one ``ssh HOST CMD`` (the floor),
ClusterShell's ``clush``, parallel-ssh, Ansible ad-hoc (``ansible -m
command``), and chaperone's own fan-out (a hook: :func:`run_chaperone`),
on 10 and 50 hosts, for ``true``, ``uname -a`` and a 1 MiB output.

    python benchmarks/fleet.py                      # starts 50 real sshd itself (tests/support/fleet_hosts.py)
    python benchmarks/fleet.py --quick              # 10 hosts, one repetition
    python benchmarks/fleet.py --ssh-config CFG --hosts-file FILE   # hosts you already have
    python benchmarks/fleet.py --only clush,ansible --sizes 10

As benchmarks/run.py: every figure is measured in this run, on this
machine, as a median of repetitions interleaved between the tools (A B C A
B C ...), and reported as a ratio against a baseline of the same run; it
runs in benchmarks/.venv (``pip install '.[bench]'``, made once) unless
``--no-venv``; a tool that is missing is ``skipped``, one that fails is
``error``; results go to a table and to ``benchmarks/results/fleet.json``
(rows with the fields of run.py's).

How each tool is run (each with the same ssh_config; no tool's own tuning):

* ``ssh_one``: ``ssh -F CFG h01 CMD``: one host, the baseline.
* ``ssh_all``: N plain ``ssh -F CFG hNN CMD`` at once (a shell loop and
  ``wait``): no tool at all, so the floor of any fan-out over OpenSSH on
  this machine (every host's handshake, client and server, on its CPUs).
* ``clush``: ``clush -w NODESET -o '-F CFG' -f N CMD`` (output to
  /dev/null, lines as they come).
* ``parallel_ssh``: a Python process that imports ``pssh``, runs
  ``ParallelSSHClient(hosts, host_config=..., pool_size=N).run_command``
  and reads every output (what a script using it costs; the host, port,
  user and key of each host come from ``ssh -G``).  It is libssh2, not
  OpenSSH: other key exchange defaults (no sntrup761x25519: it negotiates
  curve25519-sha256), and no known_hosts check.
* ``ansible``: ``ansible all -i INV -m command -a CMD -f N`` with the
  inventory's ``ansible_ssh_common_args=-F CFG``; Ansible's default
  ControlPersist is on and a warm-up run comes first (its best case).
* ``chaperone``: ``chaperone -F CFG run -H NODESET -- sh -c CMD`` (live
  prefixed output to /dev/null, the summary on stderr), as installed by pip.
* ``chaperone_one``: ``chaperone -F CFG run h01 -- sh -c CMD``: chaperone
  on one host (what its fan-out costs beyond one run).
* ``*_ckex`` (``ssh_one_ckex``, ``ssh_all_ckex``, ``chaperone_ckex``): the
  same with ``-o KexAlgorithms=curve25519-sha256``.  OpenSSH 9.0-9.8's
  default key exchange, the post-quantum hybrid sntrup761x25519-sha512,
  costs each side of a handshake about 130-150 ms of CPU here, curve25519
  about 15 ms: with many hosts on few CPUs, that decides the wall time.
  chaperone keeps the user's key exchange (see docs/hosts.md); these rows
  show what choosing the faster one (``-o`` or ssh_config) gives.

Rows: wall time of each tool, with ``ssh_one`` of the same command as
baseline (chaperone's target: <= 1.3x); chaperone against ``ssh_all`` (how
far above the floor it is); chaperone against each peer (peer time /
chaperone time; targets >= 3x for clush and parallel-ssh, >= 20x for
Ansible); the growth from 10 to 50 hosts (wall(50)/wall(10)); CPU per
host: of each tool's whole process tree (every descendant, also those it
left to exit after it: measured under a subreaper), of the chaperone
process alone, and of the servers (every fleet sshd's reaped children:
sshd, the login shell, the agent's start; not the detached runs).  When
the benchmark starts the hosts itself they share this machine's CPUs with
the tools, so the server CPU is part of the wall time here, as it would
not be on a real fleet.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import run as harness  # noqa: E402  (benchmarks/run.py: Results, tables, the venv)

MiB = 1 << 20
TOOLS = ("ssh_one", "ssh_all", "clush", "parallel_ssh", "ansible", "chaperone", "chaperone_one", "ssh_one_ckex",
         "ssh_all_ckex", "chaperone_ckex")
#: Measured on the smallest size only (one host).
ONE_HOST = ("ssh_one", "ssh_one_ckex", "chaperone_one")
PEER_TARGETS = {"clush": ">= 3x", "parallel_ssh": ">= 3x", "ansible": ">= 20x"}
#: The cheap key exchange of the ``*_ckex`` rows.
CKEX = "KexAlgorithms=curve25519-sha256"


class Skip(Exception):
    pass


class Fleet:
    """The hosts measured: names in an ssh_config (and, for the libraries
    that cannot read one, what ``ssh -G`` resolves for each)."""

    def __init__(self, config: str, names: Sequence[str], tmp: str, server_pids: Sequence[int] = ()) -> None:
        self.config = config
        self.names = list(names)
        self.tmp = tmp
        #: The sshd listeners (when this benchmark started them): their
        #: reaped children's CPU is the servers' share.
        self.server_pids = list(server_pids)
        self._resolved: Dict[str, Dict[str, str]] = {}
        self.big_file = os.path.join(tmp, "one-mib.txt")
        line = b"0123456789abcdef" * 4
        with open(self.big_file, "wb") as f:
            for i in range(MiB // 64):
                f.write(line[:-1] + b"\n")
        os.chmod(tmp, 0o755)
        os.chmod(self.big_file, 0o644)

    def resolved(self, name: str) -> Dict[str, str]:
        if name not in self._resolved:
            res = subprocess.run(["ssh", "-G", "-F", self.config, name], capture_output=True, text=True,
                                 check=True, stdin=subprocess.DEVNULL)
            d: Dict[str, str] = {}
            for line in res.stdout.splitlines():
                k, _, v = line.partition(" ")
                d.setdefault(k, v)
            self._resolved[name] = d
        return self._resolved[name]

    def server_cpu(self) -> Optional[float]:
        """CPU seconds of the servers so far (each sshd and what it reaped)."""
        if not self.server_pids:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.server_pids:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return total / tick

    def commands(self) -> Dict[str, str]:
        return {"true": "true", "uname": "uname -a", "1mib": "cat %s" % self.big_file}


#: Runs a tool as a subreaper (PR_SET_CHILD_SUBREAPER): every descendant it
#: leaves behind is reparented here and reaped, so RUSAGE_CHILDREN counts its
#: whole process tree.  Prints {"wall", "cpu", "self", "rc", "left"} as JSON;
#: "self" is the CPU of the tool's process alone when it reports it on the
#: fd in $FLEET_BENCH_SELF_FD (chaperone, through _SELF_CPU).
_TREE = r"""
import ctypes, json, os, resource, sys, time
argv = sys.argv[1:]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
r, w = os.pipe()
os.set_inheritable(w, True)
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.close(r)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.environ["FLEET_BENCH_SELF_FD"] = str(w)
    try:
        os.execvpe(argv[0], argv, os.environ)
    finally:
        os._exit(127)
os.close(w)
_, status, _ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
rc = os.waitstatus_to_exitcode(status)
mine = os.read(r, 4096).decode() or None
deadline = time.monotonic() + 3.0
left = 0
while True:
    try:
        p, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if p == 0:
        if time.monotonic() > deadline:
            left = 1
            break
        time.sleep(0.01)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "self": float(mine) if mine else None,
                  "rc": rc, "left": left}))
"""

#: chaperone's process reports its own CPU at exit (its atexit runs before os._exit).
_SELF_CPU = ("import atexit, os, resource\n"
             "def _report():\n"
             "    r = resource.getrusage(resource.RUSAGE_SELF)\n"
             "    os.write(int(os.environ['FLEET_BENCH_SELF_FD']), str(r.ru_utime + r.ru_stime).encode())\n"
             "atexit.register(_report)\n"
             "import sys; sys.argv[0] = 'chaperone'\n"
             "from chaperone.__main__ import main; main()\n")


def _timed(argv: List[str], env=None, cwd=None, timeout: float = 600.0,
           fleet: Optional["Fleet"] = None) -> Tuple[float, float, Optional[float], Optional[float]]:
    """(wall s, CPU s of the whole process tree, CPU s of the tool's own
    process if it reports it, CPU s of the servers meanwhile)."""
    before = fleet.server_cpu() if fleet is not None else None
    try:
        res = subprocess.run([sys.executable, "-c", _TREE] + list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise harness.BenchError("%s timed out after %.0f s" % (shlex.join(argv[:6]), timeout)) from None
    try:
        m = json.loads(res.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise harness.BenchError("%s: no measurement: %s" % (shlex.join(argv[:8]), harness.tail(res.stderr))) from None
    if m["rc"] != 0:
        raise harness.BenchError("%s exited %d: %s" % (shlex.join(argv[:8]), m["rc"], harness.tail(res.stderr)))
    server = None
    if before is not None:
        time.sleep(0.3)  # (sshd reaps its sessions' processes just after the client is gone)
        server = fleet.server_cpu() - before
    return m["wall"], m["cpu"], m["self"], server


def _bin(name: str) -> Optional[str]:
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which(name)


# --- the tools ---------------------------------------------------------------------------------


def run_ssh_one(fleet: Fleet, names: Sequence[str], cmd: str, opts: Sequence[str] = ()):
    return _timed(["ssh", "-F", fleet.config] + list(opts) + [names[0], cmd], fleet=fleet)


def run_ssh_all(fleet: Fleet, names: Sequence[str], cmd: str, opts: Sequence[str] = ()):
    script = 'c=$1; shift; for h; do ssh -F "$c" %s "$h" %s </dev/null & done; wait' % (
        " ".join(shlex.quote(o) for o in opts), shlex.quote(cmd))
    return _timed(["sh", "-c", script, "sh", fleet.config] + list(names), fleet=fleet)


def run_ssh_one_ckex(fleet: Fleet, names: Sequence[str], cmd: str):
    return run_ssh_one(fleet, names, cmd, ("-o", CKEX))


def run_ssh_all_ckex(fleet: Fleet, names: Sequence[str], cmd: str):
    return run_ssh_all(fleet, names, cmd, ("-o", CKEX))


def run_clush(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    clush = _bin("clush")
    if clush is None:
        raise Skip("clush is not installed (pip install '.[bench]' provides ClusterShell)")
    from chaperone.fleet.nodeset import fold

    env = dict(os.environ, CLUSTERSHELL_CFGDIR=os.path.join(fleet.tmp, "no-clustershell-conf"))
    return _timed([clush, "-w", fold(names), "-o", "-F %s" % fleet.config, "-f", str(len(names)), cmd], env=env,
                  fleet=fleet)


_PSSH_SCRIPT = r"""
import json, sys
from pssh.clients import ParallelSSHClient
from pssh.config import HostConfig
spec = json.load(sys.stdin)
hosts = [h["hostname"] for h in spec["hosts"]]
cfg = [HostConfig(port=int(h["port"]), user=h["user"], private_key=h["key"]) for h in spec["hosts"]]
client = ParallelSSHClient(hosts, host_config=cfg, pool_size=len(hosts), num_retries=1)
out = client.run_command(spec["cmd"], stop_on_errors=True)
client.join(out)
bad = 0
for o in out:
    n = sum(len(line) + 1 for line in o.stdout)
    if o.exit_code != 0:
        bad += 1
sys.exit(1 if bad else 0)
"""


def run_parallel_ssh(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    try:
        import pssh  # noqa: F401
    except ImportError:
        raise Skip("parallel-ssh is not installed (pip install '.[bench]')") from None
    hosts = []
    for n in names:
        r = fleet.resolved(n)
        key = os.path.expanduser(r.get("identityfile", "~/.ssh/id_ed25519"))
        hosts.append({"hostname": r["hostname"], "port": r["port"], "user": r["user"], "key": key})
    spec = os.path.join(fleet.tmp, "pssh-%d.json" % len(names))
    with open(spec, "w") as f:
        json.dump({"hosts": hosts, "cmd": cmd}, f)
    script = os.path.join(fleet.tmp, "pssh_run.py")
    with open(script, "w") as f:
        f.write(_PSSH_SCRIPT)
    return _timed(["sh", "-c", 'exec "$0" "$1" < "$2"', sys.executable, script, spec], fleet=fleet)


def _ansible_setup(fleet: Fleet, names: Sequence[str]) -> Tuple[str, Dict[str, str], str]:
    ansible = _bin("ansible")
    if ansible is None:
        raise Skip("Ansible is not installed (pip install '.[bench]' provides ansible-core)")
    work = os.path.join(fleet.tmp, "ansible")
    os.makedirs(work, exist_ok=True)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    inv = os.path.join(work, "inventory-%d.ini" % len(names))
    with open(inv, "w") as f:
        f.write("[all:vars]\nansible_ssh_common_args=%s\nansible_python_interpreter=%s\n"
                "ansible_remote_tmp=%s\n[fleet]\n" % (shlex.quote("-F " + fleet.config), python,
                                                     os.path.join(work, "remote_tmp")))
        f.write("".join(n + "\n" for n in names))
    env = dict(os.environ, ANSIBLE_HOME=os.path.join(work, "home"), ANSIBLE_LOCAL_TEMP=os.path.join(work, "tmp"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(work, "cp"), ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=os.path.join(work, "none.cfg"),
               ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_DEPRECATION_WARNINGS="0",
               ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_PYTHON_INTERPRETER=python)
    return ansible, env, inv


def run_ansible(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    ansible, env, inv = _ansible_setup(fleet, names)
    return _timed([ansible, "all", "-i", inv, "-m", "ansible.builtin.command", "-a", cmd, "-f", str(len(names))],
                  env=env, cwd=os.path.dirname(inv), fleet=fleet)


def run_chaperone(fleet: Fleet, names: Sequence[str], cmd: str, opts: Sequence[str] = ()):
    """chaperone's fan-out on ``names`` (hosts of ``fleet.config``) running
    ``cmd``: ``chaperone -F CFG run -H NODESET -- sh -c CMD``, as a user
    runs it (the installed entry point, its head start included), with the
    CPU of its own process reported at exit."""
    from chaperone.fleet.nodeset import fold

    home = os.path.join(fleet.tmp, "chaperone-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, CHAPERONE_HOME=home)
    env.pop("CHAPERONE_SSH_CLIENT", None)
    return _timed([sys.executable, "-c", _SELF_CPU, "-F", fleet.config, "run"] + list(opts)
                  + ["-H", fold(names), "--", "sh", "-c", cmd], env=env, fleet=fleet)


def run_chaperone_one(fleet: Fleet, names: Sequence[str], cmd: str):
    """One host, as ``ssh_one``: ``chaperone -F CFG run h01 -- sh -c CMD``."""
    home = os.path.join(fleet.tmp, "chaperone-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, CHAPERONE_HOME=home)
    env.pop("CHAPERONE_SSH_CLIENT", None)
    return _timed([sys.executable, "-c", _SELF_CPU, "-F", fleet.config, "run", names[0], "--", "sh", "-c",
                   cmd], env=env, fleet=fleet)


def run_chaperone_ckex(fleet: Fleet, names: Sequence[str], cmd: str):
    return run_chaperone(fleet, names, cmd, ("-o", CKEX))


RUNNERS: Dict[str, Callable[[Fleet, Sequence[str], str], tuple]] = {
    "ssh_one": run_ssh_one, "ssh_all": run_ssh_all, "clush": run_clush, "parallel_ssh": run_parallel_ssh,
    "ansible": run_ansible, "chaperone": run_chaperone, "chaperone_one": run_chaperone_one,
    "ssh_one_ckex": run_ssh_one_ckex,
    "ssh_all_ckex": run_ssh_all_ckex, "chaperone_ckex": run_chaperone_ckex,
}


# --- the run ---------------------------------------------------------------------------------------


def measure(fleet: Fleet, sizes: Sequence[int], tools: Sequence[str], reps: int, verbose: bool) -> dict:
    """{(tool, cmd, n): {"wall": [...], "cpu": [...], "self": [...], "server": [...]} or
    {"skip"/"error": reason}}."""
    data: Dict[tuple, dict] = {}
    for n in sizes:
        names = fleet.names[:n]
        for cmd_id, cmd in fleet.commands().items():
            alive = [t for t in tools if not (t in ONE_HOST and n != sizes[0])]
            for tool in alive:  # warm-up (caches, Ansible's ControlPersist), and find who can run
                key = (tool, cmd_id, n)
                try:
                    RUNNERS[tool](fleet, names, cmd)
                    data[key] = {"wall": [], "cpu": [], "self": [], "server": []}
                except Skip as e:
                    data[key] = {"skip": str(e)}
                except harness.BenchError as e:
                    data[key] = {"error": str(e)}
            for _ in range(reps):
                for tool in alive:
                    key = (tool, cmd_id, n)
                    if "wall" not in data[key]:
                        continue
                    try:
                        wall, cpu, mine, server = RUNNERS[tool](fleet, names, cmd)
                    except (Skip, harness.BenchError) as e:
                        data[key] = {"error": str(e)}
                        continue
                    data[key]["wall"].append(wall)
                    data[key]["cpu"].append(cpu)
                    if mine is not None:
                        data[key]["self"].append(mine)
                    if server is not None:
                        data[key]["server"].append(server)
            if verbose:
                print("[fleet] %d hosts, %s: %s" % (n, cmd_id, ", ".join(
                    "%s %s" % (t, "%.2f s" % harness.median(data[(t, cmd_id, n)]["wall"])
                               if data[(t, cmd_id, n)].get("wall") else
                               (data[(t, cmd_id, n)].get("skip") or data[(t, cmd_id, n)].get("error") or "-")[:40])
                    for t in alive)), file=sys.stderr, flush=True)
    return data


def report(data: dict, sizes: Sequence[int], tools: Sequence[str], results: "harness.Results") -> None:
    def wall(tool, cmd, n):
        d = data.get((tool, cmd, n)) or {}
        return harness.median(d["wall"]) if d.get("wall") else None

    def why(tool, cmd, n):
        d = data.get((tool, cmd, n)) or {}
        if "skip" in d:
            return "skipped", "skipped: " + d["skip"]
        if "error" in d:
            return "error", "error: " + d["error"]
        if not d:
            return "skipped", "skipped: not measured"
        return None, ""

    def versus(id_, name, mine_tool, other, cmd, n, target, note, other_n=None):
        mine, theirs = wall(mine_tool, cmd, n), wall(other, cmd, other_n or n)
        ratio = (theirs / mine) if (mine and theirs) else None
        status = None if ratio is not None else (why(mine_tool, cmd, n)[0] or why(other, cmd, other_n or n)[0]
                                                 or "skipped")
        results.add(id_, name, mine, "s", baseline=theirs, baseline_unit="s", ratio=ratio, target=target,
                    status=status, notes=note if ratio is not None else (
                        why(mine_tool, cmd, n)[1] or why(other, cmd, other_n or n)[1]))

    cmds = ("true", "uname", "1mib")
    mine_tools = [t for t in ("chaperone", "chaperone_ckex") if t in tools]
    for cmd in cmds:
        base = wall("ssh_one", cmd, sizes[0])
        for n in sizes:
            for tool in tools:
                if tool in ONE_HOST:
                    continue
                v = wall(tool, cmd, n)
                status, note = why(tool, cmd, n)
                d = data.get((tool, cmd, n)) or {}
                results.add("fleet_%s_%s_%d" % (tool, cmd, n), "%s, %d hosts, %s" % (tool, n, cmd), v, "s",
                            baseline=base, baseline_unit="s",
                            target="<= 1.3x" if tool.startswith("chaperone") else None,
                            status=status, notes=note or "baseline: one ssh -F CFG h01 %s" % cmd,
                            samples=d.get("wall"), cpu_samples=d.get("cpu"))
            for mt in mine_tools:
                floor = "ssh_all_ckex" if mt.endswith("_ckex") else "ssh_all"
                versus("fleet_floor_%s_%s_%d" % (mt, cmd, n), "%s vs %s (no tool: the floor), %d hosts, %s"
                       % (mt, floor, n, cmd), mt, floor, cmd, n, None,
                       "ratio: %s time / %s time (1x: at the floor)" % (floor, mt))
            if "chaperone_one" in tools:
                versus("fleet_one_%s_%d" % (cmd, n), "chaperone vs chaperone_one (one host), %d hosts, %s" % (n, cmd),
                       "chaperone", "chaperone_one", cmd, n, None,
                       "ratio: chaperone on one host / its fan-out on %d" % n, other_n=sizes[0])
            if "chaperone_ckex" in tools and "ssh_one_ckex" in tools:
                versus("fleet_ckex_one_%s_%d" % (cmd, n), "chaperone_ckex vs ssh_one_ckex, %d hosts, %s" % (n, cmd),
                       "chaperone_ckex", "ssh_one_ckex", cmd, n, None,
                       "ratio: one ssh (curve25519) / chaperone's fan-out (curve25519)", other_n=sizes[0])
            for tool in PEER_TARGETS:
                if tool not in tools:
                    continue
                for mt in mine_tools:
                    if mt == "chaperone_ckex" and tool != "parallel_ssh":
                        continue  # (parallel-ssh negotiates curve25519: the like-for-like row)
                    versus("fleet_vs_%s_%s_%s_%d" % (tool, mt, cmd, n), "%s vs %s, %d hosts, %s"
                           % (mt, tool, n, cmd), mt, tool, cmd, n, PEER_TARGETS[tool],
                           "ratio: %s time / %s time" % (tool, mt))
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for tool in tools:
            if tool in ONE_HOST:
                continue
            for cmd in cmds:
                a, b = wall(tool, cmd, lo), wall(tool, cmd, hi)
                results.add("fleet_growth_%s_%s" % (tool, cmd), "%s: wall(%d hosts) / wall(%d hosts), %s"
                            % (tool, hi, lo, cmd), b, "s", baseline=a, baseline_unit="s",
                            status=None if (a and b) else (why(tool, cmd, hi)[0] or "skipped"),
                            notes="" if (a and b) else (why(tool, cmd, hi)[1] or why(tool, cmd, lo)[1]
                                                        or "skipped: not measured"))
    for tool in tools:
        for n in sizes:
            d = data.get((tool, "true", n)) or {}
            hosts = 1 if tool in ONE_HOST else n
            if tool in ONE_HOST and n != sizes[0]:
                continue
            for what, key, label in (("cpu", "cpu", "CPU per host of its whole process tree"),
                                     ("self", "self", "CPU per host of its own process"),
                                     ("server", "server", "server CPU per host (sshd, shell, agent start)")):
                if d.get(key):
                    results.add("fleet_%s_%s_%d" % (what, tool, hosts), "%s: %s, %d host%s, true"
                                % (tool, label, hosts, "" if hosts == 1 else "s"),
                                harness.median(d[key]) / hosts * 1000, "ms",
                                notes={"cpu": "user+sys of the tool and every descendant (ssh ...), per host",
                                       "self": "user+sys of the chaperone process alone, per host",
                                       "server": "user+sys of the fleet's sshd and what they reaped, per host"}[key])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="many-host fan-out: chaperone vs ssh, clush, parallel-ssh, Ansible")
    ap.add_argument("--ssh-config", help="an ssh_config naming the hosts (default: start real sshd here)")
    ap.add_argument("--hosts-file", help="with --ssh-config: host names, one a line")
    ap.add_argument("--sizes", default="10,50", help="host counts (default 10,50)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (median; default 3)")
    ap.add_argument("--quick", action="store_true", help="10 hosts, one repetition")
    ap.add_argument("--only", default="", help="tools, comma-separated: " + ",".join(TOOLS))
    ap.add_argument("--output", default=str(HERE / "results" / "fleet.json"))
    ap.add_argument("--venv", default=str(harness.DEFAULT_VENV))
    ap.add_argument("--no-venv", action="store_true", help="use this Python's packages")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    sizes = [10] if args.quick else sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    reps = 1 if args.quick else max(1, args.reps)
    tools = [t.strip() for t in args.only.split(",") if t.strip()] or list(TOOLS)
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error("unknown tool(s): %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(TOOLS)))
    if "ssh_one" not in tools:
        tools.insert(0, "ssh_one")
    if "chaperone_ckex" in tools and "ssh_one_ckex" not in tools:
        tools.insert(1, "ssh_one_ckex")
    if not args.no_venv and not os.environ.get(harness.VENV_ENV):
        venv = Path(args.venv).resolve()
        try:
            py = harness.ensure_venv(venv, verbose=not args.quiet)
        except (OSError, subprocess.SubprocessError, harness.BenchError) as e:
            print("fleet benchmark: cannot set up the venv %s: %s (--no-venv uses this Python)" % (venv, e),
                  file=sys.stderr)
            return 1
        os.environ[harness.VENV_ENV] = str(venv)
        os.execv(py, [py, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv))
    if str(REPO) not in sys.path and not os.environ.get(harness.VENV_ENV):
        sys.path.insert(0, str(REPO))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (the hosts are stopped on the way out)
    tmp = tempfile.mkdtemp(prefix="chaperone-fleet-bench-")
    started = time.monotonic()
    load_start = os.getloadavg()
    hosts = None
    try:
        if args.ssh_config:
            if not args.hosts_file:
                ap.error("--ssh-config needs --hosts-file")
            names = [l.split("#")[0].strip() for l in open(args.hosts_file)]
            names = [n for n in names if n]
            config = args.ssh_config
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from support.fleet_hosts import FleetHosts

            hosts = FleetHosts(max(sizes)).start()
            if not args.quiet:
                print("[fleet] %d sshd started in %.2f s" % (hosts.n, hosts.start_seconds), file=sys.stderr)
            names, config = hosts.names, hosts.config_file
        if len(names) < max(sizes):
            ap.error("%d hosts given, %d needed" % (len(names), max(sizes)))
        fleet = Fleet(config, names, tmp, [s.proc.pid for s in hosts.servers.values()] if hosts else ())
        data = measure(fleet, sizes, tools, reps, verbose=not args.quiet)
    finally:
        if hosts is not None:
            hosts.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results = harness.Results()
    report(data, sizes, tools, results)
    meta = dict(harness.machine_info_cache(), sizes=sizes, reps=reps, tools=tools,
                duration_s=round(time.monotonic() - started, 1), loadavg_start=load_start,
                loadavg_end=os.getloadavg())
    for mod, dist in (("clustershell", "ClusterShell"), ("parallel_ssh", "parallel-ssh")):
        try:
            from importlib.metadata import version

            meta[mod] = version(dist)
        except Exception:
            meta[mod] = None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"meta": meta, "results": results.rows}, f, indent=2, default=str)
        f.write("\n")
    print("chaperone fleet benchmark, %s; %s CPUs, %s; sizes %s, %d repetition(s); %.0f s; load average "
          "%.1f at the start, %.1f at the end" % (meta["date"], meta["nproc"], meta.get("openssh"), sizes, reps,
                                                 meta["duration_s"], load_start[0], meta["loadavg_end"][0]))
    print()
    harness.print_table(results.rows)
    print("\nJSON: %s" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
