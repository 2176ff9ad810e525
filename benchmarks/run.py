#!/usr/bin/env python3
"""chaperone's benchmarks: every figure is a ratio against a baseline measured
in the same run (medians over several repetitions), on this machine only.

    python benchmarks/run.py            # full sizes (1 GiB, 200/1000 programs, 60 s idle ...)
    python benchmarks/run.py --quick    # small sizes, under two minutes (what CI runs)
    python benchmarks/run.py --only cli_startup,records --output /tmp/b.json
    python benchmarks/run.py --list

It sets up what it needs itself: a throw-away OpenSSH server on 127.0.0.1
(``tests/support/sshd.py``, imported by path) with ``Host testhost`` in its
ssh_config, and its own ``CHAPERONE_HOME`` in a temporary directory.
Nothing leaves the loopback interface.  A benchmark whose prerequisite is
missing (no sshd, no SSH transport yet, no Ansible) is reported as
``skipped: <reason>``; one that breaks is reported as ``error: <reason>``;
neither stops the others.

Results: a table on stdout and JSON in ``benchmarks/results/latest.json``
(or ``--output PATH``).  Each row has: id, name, value, unit, baseline,
baseline_unit, ratio, target, status (pass / fail / info / skipped / error),
notes, and the raw samples.  The exit status is 0 unless the harness itself
broke; a missed target is data, not a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
#: Set (to the venv's path) when the harness runs inside the venv it made.
VENV_ENV = "CHAPERONE_BENCH_VENV"
DEFAULT_VENV = REPO / "benchmarks" / ".venv"
if not os.environ.get(VENV_ENV) and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # (in its venv: the installed copy)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1000 * 1000

#: Sizes and counts of the two modes.
MODES = {
    "quick": dict(
        cli_reps=5, reps=3, io_reps=1, big=64 * MiB, launch_n=20, scale_n=[10], concurrency=8, launch_pairs=2,
        nohup_n=20, ansible_n=(1, 3), ansible_reps=1, idle=3.0, records=1000,
        delivery_sizes=[1 * MB, 64 * MiB], wait_n=10, wait_reps=1, many_n=30,
    ),
    "full": dict(
        cli_reps=20, reps=10, io_reps=3, big=1 * GiB, launch_n=200, scale_n=[10, 100, 1000], launch_pairs=5,
        concurrency=8, nohup_n=200, ansible_n=(5, 25), ansible_reps=2, idle=60.0, records=10000,
        delivery_sizes=[1 * MB, 100 * MB, 1 * GiB], wait_n=300, wait_reps=5, many_n=300,
    ),
}

STATUSES = ("pass", "fail", "info", "skipped", "error")


class Skip(Exception):
    """A prerequisite is missing: the rows are reported as skipped."""


class BenchError(Exception):
    """A benchmark could not measure (a command failed ...)."""


# --- small helpers ------------------------------------------------------------


def human_size(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return "%d %s" % (n // size, unit)
    if n >= MB and n % MB == 0:
        return "%d MB" % (n // MB)
    return "%d B" % n


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def tail(text, n: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = (text or "").strip()
    return text[-n:]


def parse_target(target: Optional[str]):
    """'<= 1.5x' (on the ratio), '>= 50/s' (on the value), '< 0.5 s' ..."""
    if not target:
        return None
    op, _, rest = target.partition(" ")
    rest = rest.strip()
    on = "ratio" if rest.endswith("x") else "value"
    number = ""
    for ch in rest:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            break
    return op, float(number), on


def judge(value, ratio, target: Optional[str]) -> str:
    spec = parse_target(target)
    if spec is None:
        return "info"
    op, limit, on = spec
    x = ratio if on == "ratio" else value
    if x is None:
        return "error"
    ok = {"<=": x <= limit, "<": x < limit, ">=": x >= limit, ">": x > limit}[op]
    return "pass" if ok else "fail"


def fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return "%.0f" % x
    if abs(x) >= 10:
        return "%.1f" % x
    if abs(x) >= 0.1:
        return "%.2f" % x
    return "%.3g" % x


class Results:
    def __init__(self):
        self.rows: List[dict] = []

    def add(self, id: str, name: str, value=None, unit: str = "", *, baseline=None, baseline_unit=None,
            ratio=None, target: Optional[str] = None, status: Optional[str] = None, notes: str = "",
            samples=None, baseline_samples=None, **extra) -> dict:
        if ratio is None and value is not None and baseline:
            ratio = value / baseline
        row = {
            "id": id, "name": name, "value": value, "unit": unit,
            "baseline": baseline, "baseline_unit": baseline_unit if baseline_unit is not None else (
                unit if baseline is not None else None),
            "ratio": ratio, "target": target,
            "status": status or judge(value, ratio, target),
            "notes": notes,
        }
        if samples is not None:
            row["samples"] = samples
        if baseline_samples is not None:
            row["baseline_samples"] = baseline_samples
        row.update(extra)
        self.rows.append(row)
        return row

    def ids(self):
        return {r["id"] for r in self.rows}


def print_table(rows: List[dict], out=sys.stdout) -> None:
    headers = ("benchmark", "value", "baseline", "ratio", "target", "status")
    table = []
    for r in rows:
        value = "%s %s" % (fmt_num(r["value"]), r["unit"]) if r["value"] is not None else "-"
        base = "%s %s" % (fmt_num(r["baseline"]), r["baseline_unit"] or "") if r["baseline"] is not None else "-"
        ratio = "%sx" % fmt_num(r["ratio"]) if r["ratio"] is not None else "-"
        table.append((r["name"], value.strip(), base.strip(), ratio, r["target"] or "-", r["status"]))
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    line = "  ".join("%%-%ds" % w for w in widths)
    print(line % headers, file=out)
    print(line % tuple("-" * w for w in widths), file=out)
    for row in table:
        print((line % row).rstrip(), file=out)
    print(file=out)
    for r in rows:
        if r["notes"]:
            print("- %s [%s]: %s" % (r["name"], r["status"], r["notes"]), file=out)


def markdown_table(rows: List[dict]) -> str:
    """The results as a Markdown table (for docs/performance.md)."""
    out = ["| benchmark | chaperone | baseline | ratio | target | status |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        value = "%s %s" % (fmt_num(r["value"]), r["unit"]) if r["value"] is not None else "-"
        base = "%s %s" % (fmt_num(r["baseline"]), r["baseline_unit"] or "") if r["baseline"] is not None else "-"
        ratio = "%sx" % fmt_num(r["ratio"]) if r["ratio"] is not None else "-"
        status = "**%s**" % r["status"] if r["status"] == "fail" else r["status"]
        out.append("| %s | %s | %s | %s | %s | %s |" % (
            r["name"].replace("|", "\\|"), value.strip(), base.strip(), ratio,
            (r["target"] or "-").replace("<", "&lt;"), status))
    return "\n".join(out)


def machine_info() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "install": ("venv %s: chaperone installed from the tree with pip, not editable" % os.environ[VENV_ENV]
                    if os.environ.get(VENV_ENV) else "the running Python's environment (--no-venv)"),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) * KiB / GiB, 1)
                    break
    except OSError:
        pass
    try:
        res = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
        info["openssh"] = (res.stderr or res.stdout).strip()
    except (OSError, subprocess.TimeoutExpired):
        info["openssh"] = None
    try:
        res = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        info["commit"] = res.stdout.strip() or None
        res = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, timeout=10)
        info["dirty"] = bool(res.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    for mod in ("asyncssh", "ansible"):
        try:
            from importlib.metadata import version

            info[mod] = version("asyncssh" if mod == "asyncssh" else "ansible-core")
        except Exception:
            info[mod] = None
    return info


# --- process helpers -----------------------------------------------------------


def _prctl_subreaper(on: bool) -> bool:
    """Make this process the subreaper of orphaned descendants (Linux), so a
    detached supervisor started through the local transport becomes our
    child and ``wait4`` gives its exact CPU time and peak RSS."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(36, 1 if on else 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


class Timed:
    """Run a command ``reps`` times; seconds of each (wall clock)."""

    @staticmethod
    def once(argv, env=None, stdout=subprocess.DEVNULL, timeout=120.0, cwd=None) -> float:
        t0 = time.perf_counter()
        try:
            res = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                 stderr=subprocess.PIPE, timeout=timeout, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise BenchError("%s timed out after %.0f s" % (shlex.join(argv[:6]), timeout)) from None
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            raise BenchError("%s exited %d: %s" % (shlex.join(argv[:6]), res.returncode, tail(res.stderr)))
        return dt

    @staticmethod
    def pair(a, b, reps: int, env=None, warmup: int = 1, timeout=120.0):
        """Interleaved A/B timings (A B A B ...), after ``warmup`` rounds."""
        ta, tb = [], []
        for i in range(warmup + reps):
            x = Timed.once(a, env=env, timeout=timeout)
            y = Timed.once(b, env=env, timeout=timeout)
            if i >= warmup:
                ta.append(x)
                tb.append(y)
        return ta, tb


def make_data_file(path: str, size: int) -> str:
    """``size`` bytes of incompressible data (an 8 MiB random block repeated:
    zlib's 32 KiB window cannot see the repeats)."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    block = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    return path


# --- the context --------------------------------------------------------------


class Context:
    def __init__(self, mode: str, tmp: str, results: Results, keep_going_deadline: float,
                 real_home: bool = False, concurrency: Optional[int] = None):
        self.mode = mode
        self.real_home = real_home
        self.p = dict(MODES[mode])
        if concurrency:
            self.p["concurrency"] = concurrency
        self.tmp = tmp
        self.results = results
        self.deadline = keep_going_deadline
        self.home = os.path.join(tmp, "home")
        os.makedirs(self.home, mode=0o700)
        self.prefix = "bench%s" % os.urandom(3).hex()
        self.counter = 0
        self.sshd = None
        self.sshd_reason: Optional[str] = None
        self.ssh_reason: Optional[str] = "not checked yet"
        self.data_files: Dict[int, str] = {}
        self.cli = self._find_cli()
        self.env = dict(os.environ)
        self.env["CHAPERONE_HOME"] = self.home
        self.env.pop("CHAPERONE_SPOOL", None)
        if not os.environ.get(VENV_ENV):
            pp = self.env.get("PYTHONPATH")
            self.env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")

    def run_id(self, what: str) -> str:
        self.counter += 1
        return "%s-%s-%d" % (self.prefix, what, self.counter)

    def _find_cli(self) -> List[str]:
        """The installed ``chaperone`` entry point of this Python (not a
        pyenv shim, whose own start-up would be measured), else ``-m``."""
        here = os.path.join(os.path.dirname(sys.executable), "chaperone")
        try:
            with open(here, errors="replace") as f:
                current = "chaperone.__main__" in f.read()  # not an install older than the entry point
        except OSError:
            current = False
        if current and os.access(here, os.X_OK):
            return [here]
        return [sys.executable, "-m", "chaperone"]

    def cli_argv(self, *args: str, ssh: bool = False) -> List[str]:
        argv = list(self.cli)
        if ssh:
            argv += ["-F", self.sshd.config_file]
        return argv + list(args)

    def data_file(self, size: int) -> str:
        if size not in self.data_files:
            self.data_files[size] = make_data_file(os.path.join(self.tmp, "data-%d" % size), size)
        return self.data_files[size]

    def drop_data_file(self, size: int) -> None:
        path = self.data_files.pop(size, None)
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # SSH -----------------------------------------------------------------------

    def start_sshd(self) -> None:
        try:
            spec = importlib.util.spec_from_file_location("chaperone_bench_sshd", REPO / "tests" / "support" / "sshd.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception as e:
            self.sshd_reason = "cannot load tests/support/sshd.py: %s" % e
            return
        reason = mod.sshd_unavailable_reason()
        if reason:
            self.sshd_reason = reason
            return
        clean_home = not self.real_home

        class BenchSSHD(mod.SSHD):
            """tests/support/sshd.py's server; unless --real-home, its sessions get
            HOME=<a fresh empty dir> (sshd_config SetEnv), so the login shell
            reads no ~/.bashrc and the agent and its spools live in the
            temporary directory."""

            remote_home = None

            def _write_configs(self, *args, **kw):
                super()._write_configs(*args, **kw)
                if clean_home:
                    self.remote_home = os.path.join(self.tmpdir, "remote-home")
                    os.makedirs(self.remote_home, mode=0o700, exist_ok=True)
                    with open(self.sshd_config, "a") as f:
                        f.write("SetEnv HOME=%s\n" % self.remote_home)

        try:
            # MaxSessions as OpenSSH's default: the library must live with it.
            self.sshd = BenchSSHD(max_sessions=10, log_level="ERROR").start()
        except Exception as e:
            self.sshd_reason = "sshd did not start: %s" % tail(str(e), 300)

    def require_ssh(self) -> None:
        """Skip unless sshd runs and chaperone can run a program over SSH."""
        if self.sshd is None:
            raise Skip(self.sshd_reason or "no sshd")
        if self.ssh_reason:
            raise Skip(self.ssh_reason)

    def require_sshd(self) -> None:
        if self.sshd is None:
            raise Skip(self.sshd_reason or "no sshd")

    def check_ssh_transport(self) -> Optional[float]:
        """One ``chaperone run testhost -- true`` (it also ships the agent);
        sets ``ssh_reason`` when the SSH path is not usable yet."""
        if self.sshd is None:
            self.ssh_reason = self.sshd_reason
            return None
        if importlib.util.find_spec("chaperone.transports.ssh.via_asyncssh") is None:
            self.ssh_reason = "the SSH transport is not there yet"
            return None
        try:
            dt = Timed.once(self.cli_argv("run", "--id", self.run_id("preflight"), "testhost", "--", "true",
                                          ssh=True), env=self.env, timeout=60)
        except BenchError as e:
            self.ssh_reason = "chaperone cannot run a program over SSH yet: %s" % e
            return None
        self.ssh_reason = None
        return dt

    def library(self, **kw):
        from chaperone.api import Chaperone

        ssh_config = [self.sshd.config_file] if self.sshd is not None else None
        return Chaperone(self.home, ssh_config=ssh_config, **kw)

    # Clean-up --------------------------------------------------------------------

    def remove_remote_spools(self) -> int:
        """Remove the spool directories of this run's runs on testhost (the
        agent's default root on this same machine), found from the records."""
        path = os.path.join(self.home, "runs.db")
        if not os.path.exists(path):
            return 0
        from chaperone.records import Records

        removed = 0
        records = Records(path)
        try:
            for rec in records.all():
                spool = (rec.last or {}).get("spool")
                if (rec.host != "local" and rec.id.startswith(self.prefix) and spool
                        and os.path.basename(spool.rstrip("/")) == rec.id and os.path.isdir(spool)):
                    shutil.rmtree(spool, ignore_errors=True)
                    removed += 1
        finally:
            records.close()
        return removed

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.remove_remote_spools()
        if self.sshd is not None:
            with contextlib.suppress(Exception):
                self.sshd.stop()
            self.sshd = None


# --- benchmarks -------------------------------------------------------------------


def bench_cli_startup(ctx: Context):
    reps = ctx.p["cli_reps"]
    chap, base = Timed.pair(ctx.cli_argv("--help"), [sys.executable, "-c", "pass"], reps, env=ctx.env,
                            warmup=2)
    # The floor under any click CLI: Python importing click (the brief's
    # choice of CLI library), measured the same way.
    _, click_only = Timed.pair(ctx.cli_argv("--help"), [sys.executable, "-c", "import click"], reps,
                               env=ctx.env, warmup=1)
    ctx.results.add(
        "cli_startup_vs_click", "CLI start-up: chaperone --help, against importing click alone", median(chap), "s",
        baseline=median(click_only), samples=chap, baseline_samples=click_only,
        notes="no target; baseline: %s -c 'import click' (%.1fx %s -c pass): what chaperone adds to click"
              % (os.path.basename(sys.executable), median(click_only) / median(base),
                 os.path.basename(sys.executable)))
    ctx.results.add(
        "cli_startup", "CLI start-up: chaperone --help", median(chap), "s",
        baseline=median(base), target="<= 3x", samples=chap, baseline_samples=base,
        notes="baseline: %s -c pass; %d reps each, interleaved; CLI: %s"
              % (os.path.basename(sys.executable), reps, shlex.join(ctx.cli)),
    )


def bench_cold_launch(ctx: Context):
    ctx.require_ssh()
    reps = ctx.p["reps"]
    chap, base = [], []
    for i in range(reps + 1):
        x = Timed.once(ctx.cli_argv("run", "--id", ctx.run_id("cold"), "testhost", "--", "true", ssh=True),
                       env=ctx.env, timeout=60)
        y = Timed.once(ctx.sshd.ssh_argv("true"), env=ctx.env, timeout=60)
        if i:
            chap.append(x)
            base.append(y)
    ctx.results.add(
        "cold_launch", "cold launch: chaperone run testhost -- true", median(chap), "s",
        baseline=median(base), target="<= 1.1x", samples=chap, baseline_samples=base,
        notes="baseline: ssh -F cfg testhost true; %d reps each, interleaved, agent already shipped" % reps,
    )
    # No SSH at all: the local transport (the head start's fast path,
    # chaperone/cli/fastrun.py), and for comparison the normal path
    # (click, asyncio, the agent as a subprocess).
    import resource

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    local_reps = max(5, reps)
    loc, py, loc_cpu, py_cpu = [], [], [], []
    for i in range(2 + local_reps):  # (interleaved, 2 rounds of warm-up)
        for argv, times, cpus in ((ctx.cli_argv("run", "local", "--", "true"), loc, loc_cpu),
                                  ([sys.executable, "-c", "pass"], py, py_cpu)):
            c0 = cpu()
            dt = Timed.once(argv, env=ctx.env)
            if i >= 2:
                times.append(dt)
                cpus.append(cpu() - c0)
    ctx.results.add(
        "cold_launch_local", "cold launch, local: chaperone run local -- true", median(loc), "s",
        baseline=median(py), target="<= 3x", samples=loc, baseline_samples=py,
        notes="baseline: python -c pass; %d reps each, interleaved; the fast path of the head start; CPU "
              "(user+sys, the supervisor and the program included): %.4f s against %.4f s, %.2fx"
              % (local_reps, median(loc_cpu), median(py_cpu), median(loc_cpu) / max(median(py_cpu), 1e-9)),
    )
    normal_env = dict(ctx.env, CHAPERONE_FAST_RUN="0")
    slow, py2 = Timed.pair(ctx.cli_argv("run", "local", "--", "true"), [sys.executable, "-c", "pass"],
                           max(3, reps // 2), env=normal_env)
    ctx.results.add(
        "cold_launch_local_normal", "cold launch, local, without the fast path (CHAPERONE_FAST_RUN=0)",
        median(slow), "s", baseline=median(py2), samples=slow, baseline_samples=py2,
        notes="no target; baseline: python -c pass; click, asyncio and the agent as a subprocess",
    )


def _insert_records(path: str, n: int, prefix: str, running_every: int = 0, host: str = "testhost") -> float:
    """``n`` records of runs (on ``host``) that are over, but every
    ``running_every``-th one, which is running; seconds it took."""
    from chaperone.records import Records

    records = Records(path)
    t0 = time.perf_counter()
    how = {"host": "testhost", "ssh": {"port": 2222, "username": "bench", "config": ["/etc/ssh/ssh_config"],
                                       "known_hosts": None, "check_host_keys": True, "python": "python3",
                                       "client_keys": None}}
    records.db.execute("BEGIN")
    finals = ("done", "done", "done", "error", "lost")
    for i in range(n):
        run_id = "%s-rec-%06d" % (prefix, i)
        records.add(run_id, host, how, ["python3", "train.py", "--seed", str(i), "--epochs", "100"])
        running = running_every and i % running_every == 0
        state = {
            "version": 1, "id": run_id, "host": host, "state": "running" if running else finals[i % len(finals)],
            "agent_pid": 1000 + i, "agent_start": 123456, "boot_id": "0" * 36, "pid": 2000 + i, "pgid": 2000 + i,
            "return_code": 0, "signal": None, "timed_out": False, "error": None, "errno": None,
            "rusage": {"ru_utime": 1.5, "ru_stime": 0.2, "ru_maxrss": 123456},
            "start_time": "2026-01-01T00:00:00+00:00", "end_time": "2026-01-01T01:00:00+00:00",
            "stdout_bytes": 1 << 20, "stderr_bytes": 1 << 10, "spool": "/home/bench/.chaperone/runs/" + run_id,
        }
        records.update(run_id, state)
    records.db.execute("COMMIT")
    records.close()
    return time.perf_counter() - t0


def bench_records(ctx: Context):
    """``chaperone ps`` with 10,000 runs: ``running`` of them local runs
    that run (``sleep``, started here; ps reads their spools: current
    states), the others over (on this machine and a host).  And, for
    comparison, the same with 1,000 of them recorded running on a host that
    cannot be reached (ps tries it, within its --timeout)."""
    n = ctx.p["records"]
    running = 20
    reps = ctx.p["reps"]
    home = os.path.join(ctx.tmp, "records-home")
    os.makedirs(home, mode=0o700)
    env = dict(ctx.env, CHAPERONE_HOME=home)
    from chaperone.api import Chaperone

    async def start():
        async with Chaperone(home) as ch:
            return [(await ch.start("local", ["sleep", "600"], id="%s-live-%02d" % (ctx.prefix, i), cwd=ctx.tmp)).id
                    for i in range(running)]

    async def stop(ids):
        async with Chaperone(home) as ch:
            for run_id in ids:
                with contextlib.suppress(Exception):
                    await ch.signal(run_id, "SIGKILL")

    ids = asyncio.run(start())
    try:
        insert = _insert_records(os.path.join(home, "runs.db"), n - running, ctx.prefix + "-local", host="local")
        times = [Timed.once(ctx.cli_argv("ps"), env=env, timeout=60) for _ in range(reps + 1)][1:]
        res = subprocess.run(ctx.cli_argv("ps", "-q"), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=60)
        shown = len(res.stdout.split())
        if res.returncode != 0 or shown != running:
            raise BenchError("ps -q listed %d runs (expected the %d running): %s" % (shown, running,
                                                                                    tail(res.stderr)))
        all_times = [Timed.once(ctx.cli_argv("ps", "-a"), env=env, timeout=60) for _ in range(2)]
    finally:
        asyncio.run(stop(ids))
    ctx.results.add(
        "records_ps", "records: chaperone ps with %s runs" % format(n, ","), median(times), "s",
        target="< 0.3 s", samples=times,
        notes="%d local runs running (ps reads their spools), %d over (inserted in %.2f s); ps -a (all %d "
              "rows): %.2f s; %d reps%s" % (running, n - running, insert, n, median(all_times), reps,
                                            "" if n >= 10000 else " (quick mode: the target is for 10,000)"))
    shutil.rmtree(home, ignore_errors=True)

    # The same number of records, a tenth of them running on a host that
    # cannot be reached ("testhost" without the harness's ssh config).
    home = os.path.join(ctx.tmp, "records-home-remote")
    os.makedirs(home, mode=0o700)
    env = dict(ctx.env, CHAPERONE_HOME=home)
    _insert_records(os.path.join(home, "runs.db"), n, ctx.prefix, running_every=10)
    times = [Timed.once(ctx.cli_argv("ps"), env=env, timeout=60) for _ in range(max(3, reps // 2) + 1)][1:]
    ctx.results.add(
        "records_ps_unreachable", "records: chaperone ps with %s runs, %s running on an unreachable host"
        % (format(n, ","), format(n // 10, ",")), median(times), "s", samples=times,
        notes="no target: ps tries the host (ssh fails to resolve it) within its --timeout, then shows the "
              "runs as last seen")
    shutil.rmtree(home, ignore_errors=True)


async def _start_many(ch, n: int, concurrency: int, prefix: str, argv=("true",)):
    sem = asyncio.Semaphore(concurrency)
    states = []

    async def one(i):
        async with sem:
            run = await ch.start("testhost", list(argv), run_id="%s-%d" % (prefix, i))
            states.append(run.state)

    t0 = time.perf_counter()
    # Every task ends before this returns (return_exceptions), so no start
    # is still in flight when the caller closes the Chaperone.
    done = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    dt = time.perf_counter() - t0
    errors = ["%s: %s" % (type(e).__name__, tail(str(e), 300)) for e in done if isinstance(e, BaseException)]
    if len(errors) == n:
        raise BenchError("all %d starts failed; the first: %s" % (n, errors[0]))
    return dt, states, errors


async def _raw_channel_rate(ctx: Context, n: int, conc: int, cmds=("true", "python3 -c pass")):
    """Commands per second over one plain asyncssh connection, one channel
    each (no chaperone): ``true``, then ``python3 -c pass``; then the
    concurrency used."""
    try:
        import asyncssh
    except ImportError:
        return None
    conn = await asyncssh.connect("testhost", config=[ctx.sshd.config_file])
    try:
        rates = []
        conc = min(conc, 4)  # channels close lazily: stay well under MaxSessions
        for cmd in cmds:
            sem = asyncio.Semaphore(conc)

            async def one():
                async with sem:
                    await conn.run(cmd, check=True)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            rates.append(n / (time.perf_counter() - t0))
        return tuple(rates) + (conc,)
    finally:
        conn.close()
        await conn.wait_closed()


def bench_launch(ctx: Context):
    ctx.require_ssh()
    conc = ctx.p["concurrency"]
    sizes = sorted(set([ctx.p["launch_n"]] + list(ctx.p["scale_n"])))
    rates: Dict[int, float] = {}
    conns: Dict[int, int] = {}
    failures: Dict[int, str] = {}

    extra = {}

    async def main():
        ch = ctx.library()
        try:
            await ch.start("testhost", ["true"], run_id=ctx.run_id("warm"))  # connect, ship
            head_n = ctx.p["launch_n"]
            # First (before any clean-up: see below), the ratio: pairs of
            # (warm launch of head_n, the raw channel rate) one after the
            # other, so that both halves of a pair see the same load; the
            # median of the pairs' ratios.
            pairs = []
            for k in range(ctx.p["launch_pairs"]):
                try:
                    dt, states, errors = await asyncio.wait_for(
                        _start_many(ch, head_n, head_n, ctx.run_id("launchpair%d" % k)), max(60.0, head_n * 0.5))
                except Exception as e:
                    extra["pair_error"] = "%s: %s" % (type(e).__name__, tail(str(e), 200))
                    break
                bad = [s for s in states if s is None or s.state not in ("running", "done")]
                if errors or bad:
                    extra["pair_error"] = "%d starts failed, %d ended badly" % (len(errors), len(bad))
                    break
                # (The spools stay until the pairs are over: ext4 skips the
                # inodes it freed in the last minute or more when it makes new
                # ones, a search that grows with what was just removed, and
                # would charge the next launch for this clean-up.)
                raw = await _raw_channel_rate(ctx, head_n, conc, cmds=("true",))
                if raw is None:
                    break
                pairs.append((head_n / dt, raw[0]))
            extra["pairs"] = pairs
            ctx.remove_remote_spools()
            for n in sizes:
                budget = max(60.0, n * 0.5)
                try:
                    # As a scheduler submits: all n at once (the library
                    # batches the starts of one event-loop turn per host).
                    dt, states, errors = await asyncio.wait_for(
                        _start_many(ch, n, n, ctx.run_id("launch%d" % n)), budget)
                except asyncio.TimeoutError:
                    failures[n] = "%d programs did not all start within %.0f s" % (n, budget)
                    continue
                bad = [s for s in states if s is None or s.state not in ("running", "done")]
                if errors:
                    failures[n] = "%d of %d starts failed (the rate counts every attempt); the first: %s" % (
                        len(errors), n, errors[0])
                elif bad:
                    failures[n] = "%d of %d starts ended %s" % (len(bad), n, bad[0] and bad[0].state)
                rates[n] = n / dt
                if ctx.sshd is not None:
                    conns[n] = len(ctx.sshd.session_pids())
                ctx.remove_remote_spools()
            head_n = ctx.p["launch_n"]
            wide = conc  # and with few starts in flight: small batches
            try:
                dt, _, errors = await asyncio.wait_for(
                    _start_many(ch, head_n, wide, ctx.run_id("launchwide")), max(60.0, head_n * 0.5))
                extra["wide"] = (wide, head_n / dt, len(ctx.sshd.session_pids()), errors)
            except Exception as e:
                extra["wide_error"] = "%s: %s" % (type(e).__name__, tail(str(e), 200))
            ctx.remove_remote_spools()
        finally:
            await ch.close()
        extra["floor"] = await _raw_channel_rate(ctx, ctx.p["launch_n"], conc)

    asyncio.run(main())
    ctx.launch_rates = rates
    head = ctx.p["launch_n"]
    note_conc = "Chaperone.start detached, all submitted at once with asyncio.gather (one batched agent call)"
    def add(rid, name, n, target=None):
        fail = failures.get(n)
        if n in rates:
            ctx.results.add(rid, name, rates[n], "programs/s", target=target, status="error" if fail else None,
                            notes=("error: %s; " % fail if fail else "")
                            + "%s; sshd connections open after: %s" % (note_conc, conns.get(n)))
        else:
            ctx.results.add(rid, name, target=target, status="error", notes="error: %s" % (fail or "no result"))

    add("launch_throughput", "warm launch: %d programs, library, one host" % head, head, target=">= 50/s")
    if "wide" in extra:
        wide, rate, nconn, errors = extra["wide"]
        ctx.results.add(
            "launch_wide", "warm launch: %d programs, bound %d" % (head, wide), rate, "programs/s",
            status="error" if errors else None,
            notes=("error: %d starts failed, the first: %s; " % (len(errors), errors[0]) if errors else "")
            + "as above with at most %d Chaperone.start calls in flight; sshd connections open after: %d"
            % (wide, nconn))
    elif "wide_error" in extra:
        ctx.results.add("launch_wide", "warm launch: %d programs, bound %d" % (head, conc), status="error",
                        notes="error: " + extra["wide_error"])
    floor = extra.get("floor")
    if floor:
        ctx.results.add(
            "launch_channel_floor", "raw asyncssh: one channel per `true`, one connection", floor[0],
            "commands/s", notes="the ceiling of any one-channel-per-program design here: asyncssh conn.run('true') "
                                "%d times, %d at a time; with `python3 -c pass`: %.1f/s" % (head, floor[2], floor[1]))
    pairs = extra.get("pairs")
    if pairs:
        ratios = [a / b for a, b in pairs]
        ctx.results.add(
            "launch_vs_channel_floor", "warm launch: %d programs vs raw asyncssh, one channel per `true`" % head,
            median([a for a, _ in pairs]), "programs/s", baseline=median([b for _, b in pairs]),
            baseline_unit="commands/s", ratio=median(ratios), target=">= 1.0x",
            status="error" if extra.get("pair_error") else None,
            samples=[round(a, 1) for a, _ in pairs], baseline_samples=[round(b, 1) for _, b in pairs],
            notes=("error: %s; " % extra["pair_error"] if extra.get("pair_error") else "")
            + "%d pairs, each the library's warm launch of %d programs (Chaperone.start x %d at once: one "
              "batched agent call) then asyncssh conn.run('true') x %d, 4 at a time, on one connection (the "
              "ceiling of any one-channel-per-program design); the median of the pairs' ratios (each: %s)"
            % (len(pairs), head, head, head, ", ".join("%.2fx" % r for r in ratios)))
    elif extra.get("pair_error"):
        ctx.results.add("launch_vs_channel_floor", "warm launch: %d programs vs raw asyncssh, one channel per `true`"
                        % head, target=">= 1.0x", status="error", notes="error: " + extra["pair_error"])
    for n in sizes:
        if n != head:
            add("launch_scale_%d" % n, "warm launch scaling: %s programs" % format(n, ","), n)


async def _ssh_nohup_many(ctx: Context, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    errors = []

    async def one():
        async with sem:
            proc = await asyncio.create_subprocess_exec(
                *ctx.sshd.ssh_argv("nohup true >/dev/null 2>&1 &"), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                errors.append(tail(err))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.perf_counter() - t0
    if errors:
        raise BenchError("%d ssh commands failed: %s" % (len(errors), errors[0]))
    return dt


def bench_launch_ssh_nohup(ctx: Context):
    ctx.require_sshd()
    n, conc = ctx.p["nohup_n"], ctx.p["concurrency"]
    dt = asyncio.run(asyncio.wait_for(_ssh_nohup_many(ctx, n, conc), max(120.0, n * 2.0)))
    rate = n / dt
    mine = getattr(ctx, "launch_rates", {}).get(ctx.p["launch_n"])
    ctx.results.add(
        "launch_vs_ssh_nohup", "warm launch vs one ssh 'nohup CMD &' per program", mine, "programs/s",
        baseline=rate, ratio=(mine / rate) if mine else None, status=None if mine else "info",
        notes="baseline: %d x ssh -F cfg testhost 'nohup true >/dev/null 2>&1 &', %d at a time; no target"
              % (n, conc) + ("" if mine else "; chaperone figure missing (launch benchmark skipped)"),
    )


def _ansible_playbook() -> Optional[str]:
    here = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("ansible-playbook")


def bench_launch_ansible(ctx: Context):
    ctx.require_sshd()
    playbook_bin = _ansible_playbook()
    if playbook_bin is None or importlib.util.find_spec("ansible") is None:
        raise Skip("Ansible is not installed (pip install .[bench] provides ansible-core)")
    work = os.path.join(ctx.tmp, "ansible")
    os.makedirs(work, exist_ok=True)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    with open(os.path.join(work, "inventory.ini"), "w") as f:
        f.write("testhost ansible_ssh_common_args=%s ansible_python_interpreter=%s "
                "ansible_remote_tmp=%s ansible_async_dir=%s\n" % (
                    shlex.quote("-F " + ctx.sshd.config_file), python,
                    os.path.join(work, "remote_tmp"), os.path.join(work, "async")))
    with open(os.path.join(work, "launch.yml"), "w") as f:
        f.write(
            "- hosts: testhost\n"
            "  gather_facts: false\n"
            "  tasks:\n"
            "    - name: start programs\n"
            "      ansible.builtin.command: /bin/true\n"
            "      async: 60\n"
            "      poll: 0\n"
            "      loop: \"{{ range(n | int) | list }}\"\n"
        )
    env = dict(ctx.env, ANSIBLE_HOME=os.path.join(work, "home"), ANSIBLE_LOCAL_TEMP=os.path.join(work, "tmp"),
               ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(work, "cp"), ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_NOCOLOR="1", ANSIBLE_CONFIG=os.path.join(work, "none.cfg"),
               ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_DEPRECATION_WARNINGS="0")

    def play(n: int) -> float:
        return Timed.once([playbook_bin, "-i", "inventory.ini", "launch.yml", "-e", "n=%d" % n], env=env,
                          cwd=work, timeout=max(120.0, n * 10.0))

    n1, n2 = ctx.p["ansible_n"]
    play(1)  # warm-up: caches, ControlMaster
    t1s, t2s = [], []
    for _ in range(ctx.p["ansible_reps"]):
        t1s.append(play(n1))
        t2s.append(play(n2))
    marginal = max(median(t2s) - median(t1s), 1e-6)
    rate = (n2 - n1) / marginal
    whole = n2 / median(t2s)
    mine = getattr(ctx, "launch_rates", {}).get(ctx.p["launch_n"])
    ctx.results.add(
        "launch_vs_ansible", "warm launch vs Ansible async (poll: 0)", mine, "programs/s",
        baseline=rate, ratio=(mine / rate) if mine else None, target=">= 50x",
        status=None if mine else "skipped",
        notes=("" if mine else "skipped: no chaperone figure (the launch benchmark did not measure); ")
              + "Ansible's marginal rate: (%d - %d) tasks / (%.1f s - %.1f s), its start-up excluded; a whole "
              "playbook of %d: %.2f programs/s; ansible-core %s, ControlPersist on"
              % (n2, n1, median(t2s), median(t1s), n2, whole, machine_info_cache().get("ansible")),
        samples=None, baseline_samples={"n1": n1, "t1": t1s, "n2": n2, "t2": t2s},
    )


_MI = {}


def machine_info_cache() -> dict:
    if not _MI:
        _MI.update(machine_info())
    return _MI


class _Sampler(threading.Thread):
    """Samples a process's RSS and CPU with psutil until it exits."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = 0
        self.cpu = None
        self.stop = threading.Event()

    def run(self):
        try:
            import psutil

            p = psutil.Process(self.pid)
            while not self.stop.is_set():
                with p.oneshot():
                    self.peak_rss = max(self.peak_rss, p.memory_info().rss)
                    t = p.cpu_times()
                    self.cpu = t.user + t.system
                time.sleep(self.interval)
        except Exception:
            return


async def _local_run(ctx: Context, ch, argv, run_id: str):
    """Start ``argv`` through the local transport; wait for its supervisor
    (our child: we are its subreaper); the seconds from start to the
    supervisor's exit, its rusage (self + program) and its state."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    run = await ch.start("local", list(argv), run_id=run_id, cwd=ctx.tmp)
    pid = run.state.agent_pid
    if not pid:
        raise BenchError("no agent_pid in the state: %s" % run.state)
    sampler = _Sampler(pid)
    sampler.start()
    try:
        _, status, rusage = await loop.run_in_executor(None, os.wait4, pid, 0)
    except ChildProcessError:
        raise BenchError("the supervisor (pid %d) is not our child: no subreaper?" % pid) from None
    dt = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join(2)
    with open(os.path.join(run.state.spool, "state.json")) as f:
        state = json.load(f)
    return dt, rusage, state, sampler


def bench_spool(ctx: Context):
    """Spooling, agent CPU per GiB and agent memory: one program writes
    ``big`` bytes to stdout through the local transport (the same agent and
    supervisor as over SSH, without SSH's start-up)."""
    size = ctx.p["big"]
    data = ctx.data_file(size)
    if not _prctl_subreaper(True):
        raise Skip("cannot become a subreaper (prctl), so the supervisor cannot be measured")
    reps = ctx.p["io_reps"]
    runs = []
    base_t, cat_cpu, cat_file_cpu, cat_pipe_cpu = [], [], [], []
    spool_root = os.path.join(ctx.home, "spool")
    os.makedirs(spool_root, exist_ok=True)

    async def one_run():
        ch = ctx.library()
        try:
            return await _local_run(ctx, ch, ["cat", data], ctx.run_id("spool"))
        finally:
            await ch.close()

    def children_cpu():
        r = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    try:
        for i in range(reps + 1):
            dt, rusage, state, sampler = asyncio.run(one_run())
            if state.get("stdout_bytes") != size or state.get("state") != "done":
                raise BenchError("the spool holds %s of %d bytes (state %s)"
                                 % (state.get("stdout_bytes"), size, state.get("state")))
            prog = state.get("rusage") or {}
            sup_cpu = rusage.ru_utime + rusage.ru_stime - prog.get("ru_utime", 0) - prog.get("ru_stime", 0)
            t_start = datetime.datetime.fromisoformat(state["start_time"])
            t_end = datetime.datetime.fromisoformat(state["end_time"])
            if i:
                runs.append(dict(seconds=dt, cpu=sup_cpu, maxrss_kib=rusage.ru_maxrss,
                                 sampled_peak_rss=sampler.peak_rss,
                                 inside=(t_end - t_start).total_seconds()))
            shutil.rmtree(state["spool"], ignore_errors=True)

            out = os.path.join(spool_root, "baseline-out")
            c0 = children_cpu()
            t = Timed.once(["sh", "-c", 'exec cat "$1" > "$2"', "sh", data, out], timeout=600)
            c1 = children_cpu()
            os.unlink(out)
            Timed.once(["cat", data], timeout=600)
            c2 = children_cpu()
            pipe_cpu = _cat_pipe_to_file_cpu(data, out)
            os.unlink(out)
            if i:
                base_t.append(t)
                cat_file_cpu.append(c1 - c0)
                cat_cpu.append(c2 - c1)
                cat_pipe_cpu.append(pipe_cpu)
    finally:
        _prctl_subreaper(False)

    secs = [r["seconds"] for r in runs]
    tput = size / MiB / median(secs)
    base_tput = size / MiB / median(base_t)
    inside = median([r["inside"] for r in runs])
    ctx.results.add(
        "spool_throughput", "spooling: program writes %s to stdout" % human_size(size), tput, "MiB/s",
        baseline=base_tput, target=">= 0.8x", samples=secs, baseline_samples=base_t,
        notes="from Chaperone.start to the supervisor's exit (spool complete, state final), local transport "
              "(same agent as over SSH); inside the supervisor (start_time..end_time) %.0f MiB/s; baseline: "
              "cat FILE > file in the same directory; %d reps" % (size / MiB / inside, reps),
    )
    gib = size / GiB
    cpu = median([r["cpu"] for r in runs]) / gib
    base_cpu = median(cat_pipe_cpu) / gib
    ctx.results.add(
        "agent_cpu_per_gib", "agent CPU per GiB of output", cpu, "CPU s/GiB", baseline=base_cpu,
        target="<= 3x", samples=[r["cpu"] for r in runs], baseline_samples=cat_pipe_cpu,
        notes="supervisor's own user+sys (wait4 rusage minus the program's), %s written; baseline: the "
              "CPU of `cat` doing the supervisor's job on the same bytes (reading them from a pipe, writing "
              "them to a file); for reference, cat FILE > /dev/null: %.3g and cat FILE > file: %.3g CPU s/GiB"
              % (human_size(size), median(cat_cpu) / gib, median(cat_file_cpu) / gib),
    )
    rss = max(r["maxrss_kib"] for r in runs) * KiB / MiB
    sampled = max(r["sampled_peak_rss"] for r in runs) / MiB
    ctx.results.add(
        "agent_memory", "agent memory: supervisor peak RSS, %s of output" % human_size(size), rss, "MiB",
        target="<= 20 MiB", samples=[r["maxrss_kib"] for r in runs],
        notes="ru_maxrss from wait4 (the supervisor; includes its reaped program, cat, which is smaller); "
              "psutil sampled peak: %.1f MiB" % sampled,
    )


def _cat_pipe_to_file_cpu(data: str, out: str) -> float:
    """CPU seconds of a `cat` that reads ``data``'s bytes from a pipe and
    writes them to ``out``: the supervisor's job, done by cat."""
    r, w = os.pipe()
    producer = subprocess.Popen(["cat", data], stdout=w)
    os.close(w)
    with open(out, "wb") as f:
        consumer = subprocess.Popen(["cat"], stdin=r, stdout=f)
    os.close(r)
    os.wait4(producer.pid, 0)
    _, _, ru = os.wait4(consumer.pid, 0)
    producer.returncode = consumer.returncode = 0  # reaped here
    return ru.ru_utime + ru.ru_stime


def bench_idle(ctx: Context):
    idle = ctx.p["idle"]
    if not _prctl_subreaper(True):
        raise Skip("cannot become a subreaper (prctl)")
    import psutil

    async def main():
        ch = ctx.library()
        try:
            run = await ch.start("local", ["sleep", "%g" % (idle + 30)], run_id=ctx.run_id("idle"), cwd=ctx.tmp)
            pid = run.state.agent_pid
            p = psutil.Process(pid)
            await asyncio.sleep(0.5)
            t = p.cpu_times()
            c0 = t.user + t.system
            await asyncio.sleep(idle)
            t = p.cpu_times()
            c1 = t.user + t.system
            rss = p.memory_info().rss
            await ch.signal(run.id, "SIGKILL")
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(None, os.wait4, pid, 0), 30)
            shutil.rmtree(run.state.spool, ignore_errors=True)
            return c1 - c0, rss
        finally:
            await ch.close()

    try:
        cpu, rss = asyncio.run(main())
    finally:
        _prctl_subreaper(False)
    per60 = cpu * 60.0 / idle
    ctx.results.add(
        "idle_cost", "idle cost: supervisor CPU while the program sleeps", per60, "CPU s per 60 s",
        target="<= 0.05 s", samples=[cpu],
        notes="measured over %g s (psutil, 10 ms clock ticks)%s; supervisor RSS while idle %.1f MiB"
              % (idle, ", scaled to 60 s" if idle != 60 else "", rss / MiB),
    )


async def _deliver_stream(ch, run_id: str, path: str) -> int:
    from chaperone.api import SKIP_OUTPUT
    from chaperone.protocol import OutputChunk

    n = 0
    with open(path, "wb") as f:
        async for event in ch.events(run_id, {"stdout": 0, "stderr": SKIP_OUTPUT["stderr"]}):
            if isinstance(event, OutputChunk) and event.stream == "stdout":
                f.write(event.data)
                n += len(event.data)
    return n


def _gcm_first() -> bool:
    """Whether chaperone's connections put AES-GCM first here (a CPU with
    AES instructions; the harness's ssh config names no Ciphers): then the
    delivery rows get one more, against ssh told to use the same cipher."""
    from chaperone.transports.ssh.options import cpu_has_aes

    return cpu_has_aes()


GCM_NOTE = ("no target: the same chaperone figure against `ssh -o Ciphers=aes128-gcm@openssh.com ... cat FILE > "
            "file`, the cipher chaperone puts first on a CPU with AES instructions (plain ssh agrees on "
            "chacha20-poly1305, OpenSSH's first choice): what the rest of chaperone's path costs")


def _with_gcm(argv: List[str]) -> List[str]:
    return argv[:1] + ["-o", "Ciphers=aes128-gcm@openssh.com"] + argv[1:]


def bench_delivery(ctx: Context):
    ctx.require_ssh()
    sizes = ctx.p["delivery_sizes"]
    big = max(sizes)
    out = os.path.join(ctx.tmp, "delivered")
    rows = {}
    gcm = _gcm_first()
    ctx.reconnect_run = None

    for size in sizes:
        data = ctx.data_file(size)
        reps = ctx.p["io_reps"] if size >= 64 * MiB else min(ctx.p["reps"], 5)

        async def setup():
            ch = ctx.library()
            try:
                run = await ch.start("testhost", ["cat", data], run_id=ctx.run_id("deliver"))
                st = await asyncio.wait_for(ch.wait(run.id), 600)
                return run.id, st
            finally:
                await ch.close()

        run_id, st = asyncio.run(setup())
        if st.stdout_bytes != size:
            raise BenchError("the run holds %s of %d bytes" % (st.stdout_bytes, size))

        def timed_to_file(argv):
            with open(out, "wb") as f:
                dt = Timed.once(argv, env=ctx.env, stdout=f, timeout=900)
            got = os.path.getsize(out)
            os.unlink(out)
            if got != size:
                raise BenchError("%s delivered %d of %d bytes" % (shlex.join(argv[:6]), got, size))
            return dt

        async def stream_once():
            ch = ctx.library()
            try:
                t0 = time.perf_counter()
                n = await asyncio.wait_for(_deliver_stream(ch, run_id, out), 900)
                dt = time.perf_counter() - t0
            finally:
                await ch.close()
            os.unlink(out)
            if n != size:
                raise BenchError("the follow stream delivered %d of %d bytes" % (n, size))
            return dt

        logs_t, one_t, stream_t, base_t, gcm_t = [], [], [], [], []
        warm = 1 if size < 64 * MiB and ctx.mode == "full" else 0
        for i in range(reps + warm):
            a = timed_to_file(ctx.cli_argv("logs", run_id, ssh=True))
            o = timed_to_file(ctx.cli_argv("logs", "--stdout", run_id, ssh=True))
            b = asyncio.run(stream_once())
            c = timed_to_file(ctx.sshd.ssh_argv("cat", data))
            g = timed_to_file(_with_gcm(ctx.sshd.ssh_argv("cat", data))) if size == big and gcm else None
            if i >= warm:
                logs_t.append(a)
                one_t.append(o)
                stream_t.append(b)
                base_t.append(c)
                if g is not None:
                    gcm_t.append(g)
        rows[size] = (logs_t, one_t, stream_t, base_t, gcm_t)
        if size == big:
            ctx.reconnect_run = run_id  # finished, with the most output: for `status`
        else:
            async def clean():
                ch = ctx.library()
                try:
                    await ch.clean(run_id)
                finally:
                    await ch.close()

            asyncio.run(clean())
        if size != ctx.p["big"]:
            ctx.drop_data_file(size)

    for size in sizes:
        logs_t, one_t, stream_t, base_t, gcm_t = rows[size]
        mib = size / MiB
        base = mib / median(base_t)
        head = size == big
        label = human_size(size)
        common = "baseline: ssh -F cfg testhost cat FILE > file; %d reps (the HTTPS callback path: " \
                 "delivery_callback)" % len(base_t)
        ctx.results.add(
            "delivery_logs" + ("" if head else "_%d" % size), "delivery %s: chaperone logs ID > file" % label,
            mib / median(logs_t), "MiB/s", baseline=base, target=">= 0.9x" if head else None,
            samples=logs_t, baseline_samples=base_t,
            notes="whole command, a finished run, both streams (its stdout to the file); " + common,
        )
        ctx.results.add(
            "delivery_logs_stdout" + ("" if head else "_%d" % size),
            "delivery %s: chaperone logs --stdout ID > file" % label,
            mib / median(one_t), "MiB/s", baseline=base, target=">= 0.9x" if head else None,
            samples=one_t, baseline_samples=base_t,
            notes="whole command, a finished run, one stream; " + common,
        )
        ctx.results.add(
            "delivery_stream" + ("" if head else "_%d" % size), "delivery %s: follow stream (library)" % label,
            mib / median(stream_t), "MiB/s", baseline=base, target=">= 0.5x" if head else None,
            samples=stream_t, baseline_samples=base_t,
            notes="Chaperone.events() from offset 0 to a file, new connection each time; " + common,
        )
        if gcm_t:
            ctx.results.add(
                "delivery_logs_same_cipher", "delivery %s: chaperone logs ID > file, against ssh with AES-GCM" % label,
                mib / median(logs_t), "MiB/s", baseline=mib / median(gcm_t), samples=logs_t,
                baseline_samples=gcm_t, notes=GCM_NOTE,
            )


def bench_delivery_callback(ctx: Context):
    """The push path: the agent's HTTPS callbacks through the SSH remote
    forward, into the local mirror (``Chaperone(push=True)``)."""
    ctx.require_ssh()
    from chaperone.transports.target import Target

    sizes = ctx.p["delivery_sizes"]
    big = max(sizes)
    out = os.path.join(ctx.tmp, "delivered")
    ssh_client = ctx.library().transports.client_for(Target("testhost"))
    gcm = _gcm_first()
    for size in sizes:
        data = ctx.data_file(size)
        reps = ctx.p["io_reps"] if size >= 64 * MiB else min(ctx.p["reps"], 5)

        async def once():
            async with ctx.library(push=True) as ch:
                t0 = time.perf_counter()
                run = await ch.start("testhost", ["cat", data], id=ctx.run_id("callback"))
                st = await asyncio.wait_for(ch.push.wait(run.id, safety_net=3600), 900)
                dt = time.perf_counter() - t0
                held = ch.push.mirror(run.id).held("stdout")
                await ch.clean(run.id)
                return dt, held, st

        cb_t, base_t, gcm_t = [], [], []
        for _ in range(reps):
            dt, held, st = asyncio.run(once())
            if held != size or st.get("stdout_bytes") != size:
                raise BenchError("the scheduler holds %d of %d bytes" % (held, size))
            cb_t.append(dt)
            with open(out, "wb") as f:
                base_t.append(Timed.once(ctx.sshd.ssh_argv("cat", data), env=ctx.env, stdout=f, timeout=900))
            os.unlink(out)
            if size == big and gcm:
                with open(out, "wb") as f:
                    gcm_t.append(Timed.once(_with_gcm(ctx.sshd.ssh_argv("cat", data)), env=ctx.env, stdout=f,
                                            timeout=900))
                os.unlink(out)
        mib = size / MiB
        head = size == big
        ctx.results.add(
            "delivery_callback" + ("" if head else "_%d" % size),
            "delivery %s: HTTPS callbacks to the scheduler" % human_size(size),
            mib / median(cb_t), "MiB/s", baseline=mib / median(base_t), target=">= 0.8x" if head else None,
            samples=cb_t, baseline_samples=base_t,
            notes="Chaperone(push=True).start(cat FILE) until wait() returns with the mirror holding every byte "
                  "(callbacks only: safety-net catch-up off); default config (output_buffer 16 MiB), the "
                  "scheduler's default SSH client (%s); baseline: "
                  "ssh -F cfg testhost cat FILE > file; %d reps" % (ssh_client, len(cb_t)),
        )
        if gcm_t:
            ctx.results.add(
                "delivery_callback_same_cipher",
                "delivery %s: HTTPS callbacks, against ssh with AES-GCM" % human_size(size),
                mib / median(cb_t), "MiB/s", baseline=mib / median(gcm_t), samples=cb_t, baseline_samples=gcm_t,
                notes=GCM_NOTE,
            )
        if size != ctx.p["big"]:
            ctx.drop_data_file(size)


async def _wait_latency(ctx: Context, n: int, push: bool):
    """``n`` runs that end together (staggered over a second, at a time
    chosen so that every start and wait is in place first); for each, the
    seconds from the end its supervisor recorded (state.json's end_time)
    to its wait() returning.  A run that ended before its wait began
    (the starts took longer than planned) is not counted: how many were
    is returned too."""
    import datetime as _dt

    async with ctx.library(push=push) as ch:
        await ch.start("testhost", ["true"], id=ctx.run_id("waitwarm"))  # connected, shipped (push: tunnel up)
        margin = 2.0 + n * (0.04 if push else 0.02)
        at = int(time.time() + margin) + 1
        runs = await asyncio.gather(*(
            ch.start("testhost", ["sh", "-c", "sleep $((%d - $(date +%%s))); sleep 0.%d" % (at, i % 10)],
                     id=ctx.run_id("wait%d" % n)) for i in range(n)))
        late: List[float] = []
        early = [0]

        async def one(run):
            began = time.time()
            state = await asyncio.wait_for(run.wait(), 120)
            back = time.time()
            ended = _dt.datetime.fromisoformat(state.end_time).timestamp()
            if ended < began:
                early[0] += 1
            else:
                late.append(back - ended)

        await asyncio.gather(*(one(r) for r in runs))
        for run in runs:
            await run.clean()
    return late, early[0]


def bench_wait_latency(ctx: Context):
    """Issue 11 item 4: a run's end reaches wait() within 0.2 s of its
    supervisor recording it, for 1 and for many concurrent runs, by SSH
    (the agent's watch) and by push (the final HTTPS callback)."""
    ctx.require_ssh()
    many = ctx.p["wait_n"]
    for push in (False, True):
        how = "push (HTTPS callbacks)" if push else "SSH (watch)"
        for n in (1, many):
            late, early = [], 0
            for _ in range(ctx.p["wait_reps"] if n == 1 else 1):
                got, skipped = asyncio.run(_wait_latency(ctx, n, push))
                late += got
                early += skipped
            if not late:
                raise BenchError("every run ended before its wait() began")
            key = "wait_latency%s_%s" % ("_push" if push else "", 1 if n == 1 else "many")
            what = "1 run" if n == 1 else "%d concurrent runs" % n
            notes = ("from the end recorded in state.json (end_time) to wait() returning, %d runs%s; "
                     "Chaperone(%s), default SSH client; ends staggered over 1 s"
                     % (len(late), " (%d ended before their wait began: not counted)" % early if early else "",
                        "push=True" if push else ""))
            ctx.results.add(key, "wait() latency, %s, %s: median" % (what, how), median(late), "s",
                            target="<= 0.2 s", samples=late, notes=notes)
            ctx.results.add(key + "_max", "wait() latency, %s, %s: max" % (what, how), max(late), "s",
                            target="<= 0.2 s", notes="the slowest of the above")
#: The scheduler of ``many_outputs``, in a process of its own (argv: home,
#: ssh_config, count, data file, id prefix): starts every run at once with
#: push, waits for all, checks every byte of every mirror and prints JSON
#: with its own peak RSS (ru_maxrss), also before the first start.
MANY_OUTPUTS_SCHEDULER = r"""
import asyncio, hashlib, json, resource, sys, time
from chaperone.api import Chaperone

home, config, count, data_file, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = open(data_file, "rb").read()

async def main():
    async with Chaperone(home, ssh_config=[config], push=True) as ch:
        await ch.start("testhost", ["true"], id=prefix + "-warm")  # connect, ship, the tunnel
        idle_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        ids = ["%s-%d" % (prefix, i) for i in range(count)]
        runs = await asyncio.gather(*(
            ch.start("testhost", ["sh", "-c", 'printf "%s\\n" "$1"; exec cat "$2"', "sh", rid, data_file], id=rid)
            for rid in ids))
        states = await asyncio.gather(*(ch.push.wait(r.id, safety_net=3600) for r in runs))
        dt = time.perf_counter() - t0
        bad = []
        for rid, st in zip(ids, states):
            want = rid.encode() + b"\n" + data
            got = ch.push.mirror(rid).read("stdout")
            if st.get("state") != "done" or got != want:
                bad.append("%s: %s, %d of %d bytes%s" % (rid, st.get("state"), len(got), len(want),
                                                         "" if got == want[:len(got)] else " (different)"))
        callbacks_only = sum(1 for rid in ids if ch.push.server.completed(rid))
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for rid in ids:
            await ch.clean(rid)
    print(json.dumps(dict(seconds=dt, idle_kib=idle_kib, peak_kib=peak_kib, bad=bad, completed=callbacks_only)))

asyncio.run(main())
"""


def bench_many_outputs(ctx: Context):
    """300 programs at once on one host, each writing 1 MiB, pushed to a
    scheduler (``Chaperone(push=True)``) in a process of its own: every
    byte checked, the scheduler's peak RSS."""
    ctx.require_ssh()
    count = ctx.p["many_n"]
    data = make_data_file(os.path.join(ctx.tmp, "many-1mib"), 1 * MiB)
    prefix = ctx.run_id("many")
    try:
        res = subprocess.run([sys.executable, "-c", MANY_OUTPUTS_SCHEDULER, ctx.home, ctx.sshd.config_file,
                              str(count), data, prefix], env=ctx.env, stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise BenchError("the scheduler did not finish %d runs within 900 s" % count) from None
    if res.returncode != 0:
        raise BenchError("the scheduler exited %d: %s" % (res.returncode, tail(res.stderr.decode("utf-8", "replace"))))
    out = json.loads(res.stdout.decode().strip().splitlines()[-1])
    bad = out["bad"]
    ctx.results.add(
        "many_outputs_memory", "scheduler memory: %d programs at once on one host, 1 MiB each" % count,
        out["peak_kib"] * KiB / MiB, "MiB", target="<= 200 MiB", status="error" if bad else None,
        samples=[out["peak_kib"]],
        notes=("error: %d runs not exact, the first: %s; " % (len(bad), bad[0]) if bad else "every byte exact; ")
        + "peak RSS (ru_maxrss) of the scheduler's process: Chaperone(push=True), all started at once with "
          "asyncio.gather, each `printf ID; cat 1MiB-FILE`, waited for (callbacks only) and every mirror "
          "compared; %.1f MiB after the first run (connection, tunnel, endpoint); %d of %d completed by "
          "callback; %.1f s for all" % (out["idle_kib"] * KiB / MiB, out["completed"], count, out["seconds"]),
    )


def bench_reconnect(ctx: Context):
    ctx.require_ssh()
    run_id = getattr(ctx, "reconnect_run", None)
    size = max(ctx.p["delivery_sizes"])
    if run_id is None:
        raise Skip("no finished run with output (the delivery benchmark did not run)")
    reps = ctx.p["reps"]
    chap, base = Timed.pair(ctx.cli_argv("status", run_id, ssh=True), ctx.sshd.ssh_argv("true"), reps,
                            env=ctx.env, timeout=60)
    ctx.results.add(
        "reconnect_status", "reconnect: chaperone status ID (finished, %s output)" % human_size(size),
        median(chap), "s", baseline=median(base), target="<= 1.5x", samples=chap, baseline_samples=base,
        notes="baseline: ssh -F cfg testhost true; %d reps each, interleaved" % reps,
    )


def _echo_latency(argv, env, keys: int) -> List[float]:
    """Seconds from a key written to this terminal (a pty made here, the
    client's controlling terminal) to its echo coming back from the
    program's terminal there (``cat`` on it), ``keys`` times, one at a time."""
    import fcntl
    import select
    import termios

    master, slave = os.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    screen, lat = b"", []
    try:
        end = time.monotonic() + 30
        while b"READY" not in screen:
            if time.monotonic() > end:
                raise BenchError("the program on a terminal did not start: %r" % screen[-200:])
            if select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 65536)
        for i in range(keys):
            key = bytes([ord("a") + i % 26])
            t0 = time.perf_counter()
            os.write(master, key)
            got = b""
            while key not in got:
                if not select.select([master], [], [], 5)[0]:
                    raise BenchError("no echo of a key within 5 s")
                got += os.read(master, 65536)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.05)
        os.write(master, b"\x03")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    return lat


def bench_tty_echo(ctx: Context):
    """`run -t`: a key typed here, echoed by the program's terminal there,
    against `ssh -tt` on the same host (issue 10 item 4)."""
    ctx.require_ssh()
    keys = 10 if ctx.mode == "quick" else 40
    prog = "echo READY; exec cat"
    chap = _echo_latency(ctx.cli_argv("run", "-t", "--id", ctx.run_id("tty"), "testhost", prog, ssh=True),
                         ctx.env, keys)
    base = _echo_latency(["ssh", "-tt"] + ctx.sshd.ssh_argv(prog)[1:], ctx.env, keys)
    ctx.results.add(
        "tty_echo", "run -t: a key's echo from the program's terminal: median", median(chap), "s",
        baseline=median(base), samples=chap, baseline_samples=base,
        notes="baseline: ssh -tt testhost cat; %d keys each, 50 ms apart, from a pty made here" % keys)


#: (group, function, row ids it produces, needs).
BENCHMARKS = [
    ("cli_startup", bench_cli_startup, ["cli_startup", "cli_startup_vs_click"]),
    ("records", bench_records, ["records_ps", "records_ps_unreachable"]),
    ("cold_launch", bench_cold_launch, ["cold_launch", "cold_launch_local", "cold_launch_local_normal"]),
    ("launch", bench_launch, ["launch_throughput", "launch_vs_channel_floor"]),
    ("launch_ssh_nohup", bench_launch_ssh_nohup, ["launch_vs_ssh_nohup"]),
    ("launch_ansible", bench_launch_ansible, ["launch_vs_ansible"]),
    ("spool", bench_spool, ["spool_throughput", "agent_cpu_per_gib", "agent_memory"]),
    ("idle", bench_idle, ["idle_cost"]),
    ("delivery", bench_delivery, ["delivery_logs", "delivery_logs_stdout", "delivery_stream",
                                  "delivery_logs_same_cipher"]),
    ("delivery_callback", bench_delivery_callback, ["delivery_callback", "delivery_callback_same_cipher"]),
    ("many_outputs", bench_many_outputs, ["many_outputs_memory"]),
    ("reconnect", bench_reconnect, ["reconnect_status"]),
    ("tty_echo", bench_tty_echo, ["tty_echo"]),
    ("wait_latency", bench_wait_latency, ["wait_latency_1", "wait_latency_1_max", "wait_latency_many",
                                          "wait_latency_many_max", "wait_latency_push_1", "wait_latency_push_1_max",
                                          "wait_latency_push_many", "wait_latency_push_many_max"]),
]

NAMES = {
    "cli_startup": "CLI start-up: chaperone --help",
    "records_ps": "records: chaperone ps",
    "cold_launch": "cold launch: chaperone run testhost -- true",
    "cold_launch_local": "cold launch, local: chaperone run local -- true",
    "launch_throughput": "warm launch throughput, library, one host",
    "launch_vs_channel_floor": "warm launch vs raw asyncssh, one channel per `true`",
    "launch_vs_ssh_nohup": "warm launch vs one ssh 'nohup CMD &' per program",
    "launch_vs_ansible": "warm launch vs Ansible async (poll: 0)",
    "spool_throughput": "spooling: program writes to stdout",
    "agent_cpu_per_gib": "agent CPU per GiB of output",
    "agent_memory": "agent memory: supervisor peak RSS",
    "idle_cost": "idle cost: supervisor CPU while the program sleeps",
    "delivery_logs": "delivery: chaperone logs ID > file",
    "delivery_logs_stdout": "delivery: chaperone logs --stdout ID > file",
    "delivery_stream": "delivery: follow stream (library)",
    "delivery_callback": "delivery: HTTPS callbacks to the scheduler",
    "delivery_logs_same_cipher": "delivery: chaperone logs ID > file, against ssh with AES-GCM",
    "delivery_callback_same_cipher": "delivery: HTTPS callbacks, against ssh with AES-GCM",
    "reconnect_status": "reconnect: chaperone status ID",
    "tty_echo": "run -t: a key's echo from the program's terminal",
    "many_outputs_memory": "scheduler memory: many programs at once on one host, 1 MiB each",
}
TARGETS = {
    "cli_startup": "<= 3x", "records_ps": "< 0.3 s", "cold_launch_local": "<= 3x", "cold_launch": "<= 1.1x", "launch_throughput": ">= 50/s",
    "launch_vs_channel_floor": ">= 1.0x",
    "launch_vs_ansible": ">= 50x", "spool_throughput": ">= 0.8x", "agent_cpu_per_gib": "<= 3x",
    "agent_memory": "<= 20 MiB", "idle_cost": "<= 0.05 s", "delivery_logs": ">= 0.9x", "delivery_logs_stdout": ">= 0.9x",
    "delivery_stream": ">= 0.5x", "delivery_callback": ">= 0.8x", "reconnect_status": "<= 1.5x",
    "many_outputs_memory": "<= 200 MiB",
}


def run_all(mode: str, only: Optional[Sequence[str]], output: str, verbose: bool = True,
            real_home: bool = False, concurrency: Optional[int] = None) -> dict:
    results = Results()
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="chaperone-bench-")
    ctx = Context(mode, tmp, results, started + 3600, real_home=real_home, concurrency=concurrency)
    groups = [b for b in BENCHMARKS if not only or b[0] in only]
    needs_ssh = any(g[0] in ("cold_launch", "launch", "launch_ssh_nohup", "launch_ansible", "delivery",
                             "delivery_callback", "many_outputs", "reconnect", "wait_latency", "tty_echo") for g in groups)
    meta = dict(machine_info_cache(), mode=mode, params=ctx.p, cli=ctx.cli, loadavg_start=os.getloadavg())
    try:
        if needs_ssh:
            ctx.start_sshd()
            first = ctx.check_ssh_transport()
            meta["ssh"] = {"sshd": ctx.sshd_reason or "ok", "transport": ctx.ssh_reason or "ok",
                           "first_launch_s": first,
                           "remote_home": getattr(ctx.sshd, "remote_home", None) or "the user's real home"}
            if first is not None:
                results.add("first_launch", "first launch on a new host (ships the agent)", first, "s",
                            notes="chaperone run testhost -- true, once, agent not yet on the host; no target")
        for group, fn, ids in groups:
            t0 = time.monotonic()
            if verbose:
                print("[bench] %s ..." % group, file=sys.stderr, flush=True)
            try:
                fn(ctx)
                status, reason = None, None
            except Skip as e:
                status, reason = "skipped", "skipped: %s" % e
            except BenchError as e:
                status, reason = "error", "error: %s" % e
            except Exception as e:  # the harness must go on with the others
                status, reason = "error", "error: %s: %s" % (type(e).__name__, tail(str(e), 300))
                if verbose:
                    traceback.print_exc()
            if status:
                for rid in ids:
                    if rid not in results.ids():
                        results.add(rid, NAMES.get(rid, rid), target=TARGETS.get(rid), status=status,
                                    notes=reason)
            if verbose:
                print("[bench] %s: %.1f s%s" % (group, time.monotonic() - t0, " (%s)" % reason if reason else ""),
                      file=sys.stderr, flush=True)
    finally:
        ctx.close()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = os.getloadavg()
    doc = {"meta": meta, "results": results.rows}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp_out = output + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp_out, output)
    return doc


def ensure_venv(path: Path, verbose: bool) -> str:
    """The Python of a venv at ``path`` holding chaperone from this tree as a
    user installs it (``pip install '.[bench]'``: not editable, with
    ansible-core for the Ansible peer); made on the first run, and on each
    run chaperone itself is reinstalled from the tree (its dependencies
    stay).  A user's chaperone starts without the ``.pth`` hooks of a
    development install, so that is what the figures should measure."""
    py = path / "bin" / "python"
    fresh = not py.exists()
    if fresh:
        if verbose:
            print("[bench] making %s (pip install '.[bench]'; once) ..." % path, file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        cmd = [str(py), "-m", "pip", "install", "-q", "%s[bench]" % REPO]
    else:
        cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace")
    if res.returncode != 0:
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
        raise BenchError("%s failed: %s" % (shlex.join(cmd), tail(res.stdout, 1500)))
    return str(py)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="chaperone benchmarks (ratios against baselines measured here)")
    ap.add_argument("--quick", action="store_true", help="small sizes, under two minutes (CI)")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "latest.json"),
                    help="JSON results file (default: benchmarks/results/latest.json)")
    ap.add_argument("--only", default="", help="comma-separated groups (see --list)")
    ap.add_argument("--list", action="store_true", help="list the benchmark groups and exit")
    ap.add_argument("--table-from", metavar="JSON", help="print the table of an earlier run and exit")
    ap.add_argument("--markdown", action="store_true", help="with --table-from: a Markdown table")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--real-home", action="store_true",
                    help="SSH sessions keep the user's real HOME (its ~/.bashrc runs at every channel); "
                         "default: an empty HOME, so figures measure chaperone, not this machine's shell set-up")
    ap.add_argument("--venv", default=str(DEFAULT_VENV),
                    help="run in this venv, made and kept up to date here: chaperone installed from this tree "
                         "with pip (not editable) plus ansible-core (default: benchmarks/.venv)")
    ap.add_argument("--no-venv", action="store_true",
                    help="measure the chaperone of the Python running this script instead (e.g. an editable "
                         "development install, whose .pth hooks slow every start)")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="bound on concurrent Chaperone.start calls in the launch benchmarks (default 8)")
    args = ap.parse_args(argv)
    if args.list:
        for group, _, ids in BENCHMARKS:
            print("%-18s %s" % (group, ", ".join(ids)))
        return 0
    if args.table_from:
        with open(args.table_from) as f:
            rows = json.load(f)["results"]
        if args.markdown:
            print(markdown_table(rows))
        else:
            print_table(rows)
        return 0
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - {b[0] for b in BENCHMARKS}
    if unknown:
        ap.error("unknown group(s): %s (see --list)" % ", ".join(sorted(unknown)))
    if not args.no_venv and not os.environ.get(VENV_ENV):
        venv = Path(args.venv).resolve()
        try:
            py = ensure_venv(venv, verbose=not args.quiet)
        except (OSError, subprocess.SubprocessError, BenchError) as e:
            print("benchmarks: cannot set up the venv %s: %s\n(--no-venv measures this Python's chaperone)"
                  % (venv, e), file=sys.stderr)
            return 1
        os.environ[VENV_ENV] = str(venv)
        os.execv(py, [py, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv))
    mode = "quick" if args.quick else "full"
    doc = run_all(mode, only, args.output, verbose=not args.quiet, real_home=args.real_home,
                  concurrency=args.concurrency)
    m = doc["meta"]
    print("chaperone benchmarks, %s mode, %s; %s CPUs (%s), %s GiB, Python %s, %s; %.0f s; load average "
          "%.1f at the start, %.1f at the end"
          % (mode, m["date"], m["nproc"], m.get("cpu"), m.get("memory_gib"), m["python"], m.get("openssh"),
             m["duration_s"], m["loadavg_start"][0], m["loadavg_end"][0]))
    print()
    print_table(doc["results"])
    print()
    print("JSON: %s" % args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
