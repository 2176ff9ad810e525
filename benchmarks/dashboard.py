#!/usr/bin/env python3
"""The dashboard's time to first paint of the run list with 300 runs, in a
real headless chromium (Playwright, ``executable_path``), as a ratio
against a baseline measured in the same run: the same browser painting a
static page with a table of as many rows (the floor for that DOM).

    python benchmarks/dashboard.py                 # 300 runs, 5 repetitions
    python benchmarks/dashboard.py --runs 1000 --repeat 3 --output /tmp/d.json
    python benchmarks/dashboard.py --screenshot docs/dashboard.png   # a few varied runs, one picture

It starts its own `chaperone serve` (its own CHAPERONE_HOME in a temporary
directory, a free port on 127.0.0.1) and local runs; nothing leaves the
machine.  Results: a table on stdout and JSON in
``benchmarks/results/dashboard.json`` (or ``--output``).  Not a unit test:
a figure to compare, not a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

CHROMIUM = os.environ.get("CHAPERONE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records, in the page, when the table first holds `want` rows and the
# frame after that was painted (requestAnimationFrame twice).
PROBE = """
window.__painted = null;
(function () {
  const want = %d;
  const obs = new MutationObserver(() => {
    const body = document.querySelector('#runs tbody, table tbody');
    if (body && body.rows.length >= want && window.__painted === null) {
      window.__painted = -1;
      requestAnimationFrame(() => requestAnimationFrame(() => { window.__painted = performance.now(); }));
    }
  });
  obs.observe(document, {childList: true, subtree: true});
})();
"""


def static_page(n: int) -> str:
    rows = "".join("<tr><td>run-%d</td><td>local</td><td>python3 -c ...</td><td>done</td><td>exit 0</td>"
                   "<td>2026-01-01 00:00:00</td><td>1.0s</td><td>10 kB / 0 B</td></tr>" % i for i in range(n))
    return ("<!doctype html><html><head><meta charset=utf-8><title>baseline</title></head><body>"
            "<table><thead><tr><th>id</th><th>host</th><th>command</th><th>state</th><th>exit</th><th>start</th>"
            "<th>duration</th><th>bytes</th></tr></thead><tbody>%s</tbody></table></body></html>" % rows)


def measure(browser, url: str, n: int) -> float:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)  # (the probe polls by eval)
    try:
        page = context.new_page()
        page.add_init_script(PROBE % n)
        page.goto(url)
        page.wait_for_function("window.__painted !== null && window.__painted > 0", timeout=60000)
        return page.evaluate("window.__painted") / 1000.0
    finally:
        context.close()


def start_runs(client, n: int) -> None:
    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(lambda i: client.start("local", ["true"], run_id="bench-%04d" % i)["id"], range(n)))
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda rid: client.wait(rid, timeout=300), ids))


def screenshot(browser, server, path: str) -> None:
    c = server.client
    c.start("local", ["python3", "-c", "print('epoch 1 loss 0.91')"], run_id="train-small")
    c.start("local", command="echo building; sleep 600", run_id="build-docs")
    c.start("local", command="echo tests; exit 3", run_id="unit-tests")
    killed = c.start("local", command="sleep 600", run_id="stuck-job")
    c.start("local", ["no-such-program"], run_id="typo-in-argv")
    c.start("local", command="for i in $(seq 1 30); do echo step $i; sleep 1; done", run_id="long-loop")
    c.start("local", ["python3", "-c", "import sys; sys.stdout.buffer.write(b'\\xff' * 5000)"], run_id="binary-out")
    time.sleep(1.0)
    c.signal(killed["id"], "TERM")
    for rid in ("train-small", "unit-tests", "stuck-job", "typo-in-argv", "binary-out"):
        c.wait(rid, timeout=60)
    context = browser.new_context(viewport={"width": 1280, "height": 420}, device_scale_factor=1)
    try:
        page = context.new_page()
        page.goto(server.sign_in_url)
        page.wait_for_selector('#conn[data-state="live"]')
        page.wait_for_function("document.querySelectorAll('#runs tbody tr').length >= 7")
        time.sleep(1.2)
        page.screenshot(path=path)
    finally:
        context.close()
    for rid in ("build-docs", "long-loop"):
        c.signal(rid, "KILL")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "dashboard.json"))
    ap.add_argument("--screenshot", metavar="PNG", help="save a picture of the dashboard with a few runs instead")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright
    from support.servehelpers import Server, kill_runs

    with tempfile.TemporaryDirectory(prefix="chaperone-bench-dashboard-") as tmp:
        server = Server(Path(tmp) / "home", heartbeat=10.0).start()
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                try:
                    if args.screenshot:
                        screenshot(browser, server, args.screenshot)
                        print("saved %s" % args.screenshot)
                        return 0
                    t0 = time.monotonic()
                    start_runs(server.client, args.runs)
                    setup = time.monotonic() - t0
                    baseline_file = Path(tmp) / "baseline.html"
                    baseline_file.write_text(static_page(args.runs))
                    dash, base = [], []
                    for _ in range(args.repeat):
                        dash.append(measure(browser, server.sign_in_url, args.runs))
                        base.append(measure(browser, baseline_file.as_uri(), args.runs))
                finally:
                    browser.close()
        finally:
            server.kill()
            kill_runs(tmp)
    value, baseline = statistics.median(dash), statistics.median(base)
    row = {"id": "dashboard_first_paint", "name": "time to first paint of the run list, %d runs" % args.runs,
           "value": round(value, 4), "unit": "s", "baseline": round(baseline, 4),
           "baseline_unit": "s (a static page with a table of as many rows)",
           "ratio": round(value / baseline, 2) if baseline else None, "status": "info",
           "notes": "sign-in redirect, page, script, /api/events snapshot, %d rows; %d runs started through "
                    "the server in %.1f s" % (args.runs, args.runs, setup),
           "samples": {"dashboard": dash, "baseline": base}}
    print("%-50s %8.3f s   baseline %8.3f s   ratio %s" % (row["name"], value, baseline, row["ratio"]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"results": [row]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
