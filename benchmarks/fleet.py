#!/usr/bin/env python3
"""Many hosts at once, side by side: one ``ssh HOST CMD`` (the floor),
ClusterShell's ``clush``, parallel-ssh, Ansible ad-hoc (``ansible -m
command``), and chaperone's own fan-out (a hook: :func:`run_chaperone`),
on 10 and 50 hosts, for ``true``, ``uname -a`` and a 1 MiB output.

    python benchmarks/fleet.py                      # starts 50 real sshd itself (tests/fleet_hosts.py)
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
* ``clush``: ``clush -w NODESET -o '-F CFG' -f N CMD`` (output to
  /dev/null, lines as they come).
* ``parallel_ssh``: a Python process that imports ``pssh``, runs
  ``ParallelSSHClient(hosts, host_config=..., pool_size=N).run_command``
  and reads every output (what a script using it costs; the host, port,
  user and key of each host come from ``ssh -G``).  It is libssh2, not
  OpenSSH: other key exchange defaults, and no known_hosts check.
* ``ansible``: ``ansible all -i INV -m command -a CMD -f N`` with the
  inventory's ``ansible_ssh_common_args=-F CFG``; Ansible's default
  ControlPersist is on and a warm-up run comes first (its best case).
* ``chaperone``: :func:`run_chaperone` (the lead plugs the fan-out in).

Rows: wall time of each tool, with ``ssh_one`` of the same command as
baseline (chaperone's target: <= 1.3x); chaperone against each peer (peer
time / chaperone time; targets >= 3x for clush and parallel-ssh, >= 20x for
Ansible); the growth from 10 to 50 hosts (wall(50)/wall(10)); the CPU time
of each tool's whole process tree per host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
TOOLS = ("ssh_one", "clush", "parallel_ssh", "ansible", "chaperone")
PEER_TARGETS = {"clush": ">= 3x", "parallel_ssh": ">= 3x", "ansible": ">= 20x"}


class Skip(Exception):
    pass


class Fleet:
    """The hosts measured: names in an ssh_config (and, for the libraries
    that cannot read one, what ``ssh -G`` resolves for each)."""

    def __init__(self, config: str, names: Sequence[str], tmp: str) -> None:
        self.config = config
        self.names = list(names)
        self.tmp = tmp
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

    def commands(self) -> Dict[str, str]:
        return {"true": "true", "uname": "uname -a", "1mib": "cat %s" % self.big_file}


def _timed(argv: List[str], env=None, cwd=None, timeout: float = 600.0) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        res = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise harness.BenchError("%s timed out after %.0f s" % (shlex.join(argv[:6]), timeout)) from None
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise harness.BenchError("%s exited %d: %s" % (shlex.join(argv[:8]), res.returncode,
                                                        harness.tail(res.stderr)))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _bin(name: str) -> Optional[str]:
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which(name)


# --- the tools ---------------------------------------------------------------------------------


def run_ssh_one(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    return _timed(["ssh", "-F", fleet.config, names[0], cmd])


def run_clush(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    clush = _bin("clush")
    if clush is None:
        raise Skip("clush is not installed (pip install '.[bench]' provides ClusterShell)")
    from chaperone.fleet.nodeset import fold

    env = dict(os.environ, CLUSTERSHELL_CFGDIR=os.path.join(fleet.tmp, "no-clustershell-conf"))
    return _timed([clush, "-w", fold(names), "-o", "-F %s" % fleet.config, "-f", str(len(names)), cmd], env=env)


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
    return _timed(["sh", "-c", 'exec "$0" "$1" < "$2"', sys.executable, script, spec])


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
                  env=env, cwd=os.path.dirname(inv))


def run_chaperone(fleet: Fleet, names: Sequence[str], cmd: str) -> Tuple[float, float]:
    """THE HOOK: chaperone's fan-out on ``names`` (hosts of ``fleet.config``)
    running ``cmd``; returns (wall s, CPU s of chaperone's process tree),
    e.g. with ``_timed(chaperone -F CFG run -H NODESET -- CMD)``.  Until
    ``chaperone run -H`` exists it is skipped."""
    from chaperone.fleet.nodeset import fold

    exe = _bin("chaperone")
    argv = [exe] if exe else [sys.executable, "-m", "chaperone"]
    probe = subprocess.run(argv + ["run", "--help"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if "-H" not in probe.stdout:
        raise Skip("chaperone run -H (the fan-out) is not wired into the CLI yet")
    home = os.path.join(fleet.tmp, "chaperone-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, CHAPERONE_HOME=home)
    return _timed(argv + ["-F", fleet.config, "run", "-H", fold(names), "--", "sh", "-c", cmd], env=env)


RUNNERS: Dict[str, Callable[[Fleet, Sequence[str], str], Tuple[float, float]]] = {
    "ssh_one": run_ssh_one, "clush": run_clush, "parallel_ssh": run_parallel_ssh, "ansible": run_ansible,
    "chaperone": run_chaperone,
}


# --- the run ---------------------------------------------------------------------------------------


def measure(fleet: Fleet, sizes: Sequence[int], tools: Sequence[str], reps: int, verbose: bool) -> dict:
    """{(tool, cmd, n): {"wall": [...], "cpu": [...]} or {"skip"/"error": reason}}."""
    data: Dict[tuple, dict] = {}
    for n in sizes:
        names = fleet.names[:n]
        for cmd_id, cmd in fleet.commands().items():
            alive = [t for t in tools if not (t == "ssh_one" and n != sizes[0])]
            for tool in alive:  # warm-up (caches, Ansible's ControlPersist), and find who can run
                key = (tool, cmd_id, n)
                try:
                    RUNNERS[tool](fleet, names, cmd)
                    data[key] = {"wall": [], "cpu": []}
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
                        wall, cpu = RUNNERS[tool](fleet, names, cmd)
                    except (Skip, harness.BenchError) as e:
                        data[key] = {"error": str(e)}
                        continue
                    data[key]["wall"].append(wall)
                    data[key]["cpu"].append(cpu)
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
        return None, ""

    cmds = ("true", "uname", "1mib")
    for cmd in cmds:
        base = wall("ssh_one", cmd, sizes[0])
        for n in sizes:
            for tool in tools:
                if tool == "ssh_one":
                    continue
                v = wall(tool, cmd, n)
                status, note = why(tool, cmd, n)
                d = data.get((tool, cmd, n)) or {}
                results.add("fleet_%s_%s_%d" % (tool, cmd, n), "%s, %d hosts, %s" % (tool, n, cmd), v, "s",
                            baseline=base, baseline_unit="s", target="<= 1.3x" if tool == "chaperone" else None,
                            status=status, notes=note or "baseline: one ssh -F CFG h01 %s" % cmd,
                            samples=d.get("wall"), cpu_samples=d.get("cpu"))
                mine = wall("chaperone", cmd, n)
                if tool in PEER_TARGETS:
                    ratio = (v / mine) if (v and mine) else None
                    st = None if ratio is not None else ("skipped" if mine is None else status or "error")
                    results.add("fleet_vs_%s_%s_%d" % (tool, cmd, n), "chaperone vs %s, %d hosts, %s" % (tool, n, cmd),
                                mine, "s", baseline=v, baseline_unit="s", ratio=ratio, target=PEER_TARGETS[tool],
                                status=st, notes=("ratio: %s time / chaperone time" % tool) if ratio is not None else
                                ("skipped: no chaperone figure" if mine is None else note or "error: no peer figure"))
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for tool in tools:
            if tool == "ssh_one":
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
            if d.get("cpu"):
                per = harness.median(d["cpu"]) / (1 if tool == "ssh_one" else n)
                results.add("fleet_cpu_%s_%d" % (tool, n if tool != "ssh_one" else 1),
                            "%s: CPU per host launched (its whole process tree), %d host%s, true"
                            % (tool, 1 if tool == "ssh_one" else n, "" if tool == "ssh_one" else "s"), per * 1000, "ms",
                            notes="user+sys of the tool and its children (ssh processes too), per host")


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
    tmp = tempfile.mkdtemp(prefix="chaperone-fleet-bench-")
    started = time.monotonic()
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
            from fleet_hosts import FleetHosts

            hosts = FleetHosts(max(sizes)).start()
            if not args.quiet:
                print("[fleet] %d sshd started in %.2f s" % (hosts.n, hosts.start_seconds), file=sys.stderr)
            names, config = hosts.names, hosts.config_file
        if len(names) < max(sizes):
            ap.error("%d hosts given, %d needed" % (len(names), max(sizes)))
        fleet = Fleet(config, names, tmp)
        data = measure(fleet, sizes, tools, reps, verbose=not args.quiet)
    finally:
        if hosts is not None:
            hosts.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results = harness.Results()
    report(data, sizes, tools, results)
    meta = dict(harness.machine_info_cache(), sizes=sizes, reps=reps, tools=tools,
                duration_s=round(time.monotonic() - started, 1), loadavg_end=os.getloadavg())
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
    print("chaperone fleet benchmark, %s; %s CPUs, %s; sizes %s, %d repetition(s); %.0f s" % (
        meta["date"], meta["nproc"], meta.get("openssh"), sizes, reps, meta["duration_s"]))
    print()
    harness.print_table(results.rows)
    print("\nJSON: %s" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
