"""The benchmark harness works and writes valid JSON.

Never a timing: a missed target, a skipped peer (no Ansible) or an error
row (a product bug the harness reports) does not fail these tests; a harness
that crashes, hangs, or writes malformed results does.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "run.py"
FIELDS = {"id", "name", "value", "unit", "baseline", "ratio", "target", "status", "notes"}
#: Row ids every run reports (measured, skipped or error, never missing).
HEADLINES = {
    "cli_startup", "cold_launch", "launch_throughput", "launch_vs_ansible", "spool_throughput",
    "agent_cpu_per_gib", "agent_memory", "idle_cost", "delivery_logs", "delivery_stream", "delivery_callback",
    "reconnect_status", "records_ps",
}


def load_harness():
    spec = importlib.util.spec_from_file_location("chaperone_bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_doc(doc, statuses):
    assert set(doc) >= {"meta", "results"}
    meta = doc["meta"]
    for key in ("date", "nproc", "python", "mode"):
        assert key in meta, key
    rows = doc["results"]
    assert rows, "no results"
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate row ids: %s" % ids
    for row in rows:
        assert FIELDS <= set(row), row
        assert row["status"] in statuses, row
        for key in ("value", "baseline", "ratio"):
            x = row[key]
            assert x is None or (isinstance(x, (int, float)) and math.isfinite(x)), row
        if row["status"] in ("pass", "fail"):
            assert row["value"] is not None and row["target"], row
        if row["status"] in ("skipped", "error"):
            assert row["notes"].startswith(row["status"] + ":"), row
    return {r["id"]: r for r in rows}


def test_quick_run_writes_valid_json(tmp_path):
    out = tmp_path / "results" / "bench.json"
    res = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-venv", "--output", str(out)],
        cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=280,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    doc = json.loads(out.read_text())
    harness = load_harness()
    rows = check_doc(doc, set(harness.STATUSES))
    assert doc["meta"]["mode"] == "quick"
    assert HEADLINES <= set(rows), sorted(HEADLINES - set(rows))
    # Benchmarks that need nothing but this checkout always measure.
    for rid in ("cli_startup", "records_ps", "spool_throughput", "agent_memory", "idle_cost"):
        assert rows[rid]["status"] in ("pass", "fail"), rows[rid]
    # The table is on stdout, one line per row.
    assert "benchmark" in res.stdout and "status" in res.stdout
    for row in doc["results"]:
        assert row["name"] in res.stdout
    assert not list(tmp_path.glob("chaperone-bench-*")), "temporary files left behind"


def test_only_and_default_output_dir(tmp_path):
    out = tmp_path / "only.json"
    res = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-venv", "--only", "cli_startup", "--output", str(out), "-q"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = check_doc(json.loads(out.read_text()), {"pass", "fail", "info"})
    assert set(rows) == {"cli_startup", "cli_startup_vs_click"}
    assert rows["cli_startup"]["status"] in ("pass", "fail")  # (a target)
    assert rows["cli_startup_vs_click"]["status"] == "info"  # (none)
    for row in rows.values():
        assert row["unit"] == "s" and row["baseline"] > 0 and row["ratio"] > 0
        assert len(row["samples"]) == len(row["baseline_samples"]) >= 3


def test_bad_group_is_a_usage_error():
    res = subprocess.run([sys.executable, str(RUN), "--only", "nosuch"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert "unknown group" in res.stderr


def test_judge_and_table():
    h = load_harness()
    assert h.judge(1.2, 1.2, "<= 1.5x") == "pass"
    assert h.judge(3.0, 2.0, "<= 1.5x") == "fail"
    assert h.judge(60, None, ">= 50/s") == "pass"
    assert h.judge(0.6, None, "< 0.5 s") == "fail"
    assert h.judge(19.9, None, "<= 20 MiB") == "pass"
    assert h.judge(1.0, None, None) == "info"
    assert h.judge(None, None, "<= 3x") == "error"
    r = h.Results()
    r.add("a", "thing a", 2.0, "s", baseline=1.0, target="<= 3x")
    r.add("b", "thing b", target=">= 0.5x", status="skipped", notes="skipped: no sshd")
    assert r.rows[0]["ratio"] == 2.0 and r.rows[0]["status"] == "pass"
    import io

    buf = io.StringIO()
    h.print_table(r.rows, out=buf)
    text = buf.getvalue()
    assert "thing a" in text and "2.00x" in text and "skipped: no sshd" in text


def test_default_output_is_gitignored():
    res = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "benchmarks/results/latest.json"],
                         capture_output=True)
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert res.returncode == 0, "benchmarks/results/ (the default --output) must be gitignored"
