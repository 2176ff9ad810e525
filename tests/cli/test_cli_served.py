"""The CLI with and without a running `chaperone serve`: the same commands
give the same output, --json objects and exit statuses either way; with
the server up they go through it (ps needs no SSH round trip); without it,
or with options the server does not take, they work directly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support.helpers import CLI, cli_env
from support.servehelpers import Server, kill_runs, raw

VOLATILE = ("last_seen", "duration", "created", "start_time", "end_time", "pid", "spool", "remote_host")


def cli(home, *args, env=None, input=b"", timeout=60):
    e = cli_env(home)
    e.update(env or {})
    return subprocess.run(CLI + [str(a) for a in args], env=e, input=input, capture_output=True,
                          timeout=timeout, cwd=str(home))


def stable(obj):
    """A run object without what differs from one look to the next."""
    if isinstance(obj, list):
        return [stable(o) for o in obj]
    return {k: v for k, v in obj.items() if k not in VOLATILE}


def scenario(home, env):
    """The same commands, as a user types them; what each printed."""
    seen = {}
    r = cli(home, "run", "--id", "fg", "local", "printf 'out\\0put'; printf err >&2; exit 3", env=env)
    seen["run"] = (r.returncode, r.stdout, r.stderr)
    r = cli(home, "run", "--json", "--id", "js", "local", "--", "echo", "$HOME", env=env)
    seen["run --json"] = (r.returncode, stable(json.loads(r.stdout)))
    r = cli(home, "run", "-d", "--id", "bg", "local", "--", "sh", "-c", "trap 'exit 9' TERM; sleep 30 & wait",
            env=env)
    seen["run -d"] = (r.returncode, r.stdout)
    time.sleep(0.5)
    r = cli(home, "ps", "--json", env=env)
    seen["ps"] = (r.returncode, [i["id"] for i in json.loads(r.stdout)])
    r = cli(home, "kill", "b", env=env)  # (a prefix of a name given with --id: never taken, as docker's names)
    seen["kill b"] = (r.returncode, r.stdout, r.stderr)
    r = cli(home, "kill", "bg", env=env)
    seen["kill"] = (r.returncode, r.stdout.split(b"(pid")[0], r.stderr)
    r = cli(home, "wait", "bg", "fg", env=env)
    seen["wait"] = (r.returncode, r.stdout, r.stderr)
    r = cli(home, "status", "--json", "fg", env=env)
    seen["status"] = (r.returncode, stable(json.loads(r.stdout)))
    r = cli(home, "logs", "fg", env=env)
    seen["logs"] = (r.returncode, r.stdout, r.stderr)
    r = cli(home, "logs", "--stderr", "fg", env=env)
    seen["logs --stderr"] = (r.returncode, r.stdout)
    r = cli(home, "ps", "-a", "--json", env=env)
    seen["ps -a"] = (r.returncode, sorted(stable(json.loads(r.stdout)), key=lambda i: i["id"]))
    r = cli(home, "status", "nosuch", env=env)
    seen["status nosuch"] = (r.returncode, r.stderr)
    r = cli(home, "clean", "fg", "js", env=env)
    seen["clean"] = (r.returncode, r.stdout)
    r = cli(home, "ps", "-a", "-q", env=env)
    seen["ps -q"] = (r.returncode, sorted(r.stdout.split()))
    return seen


@pytest.mark.timeout(180)
def test_the_same_results_with_and_without_the_server(tmp_path):
    direct = scenario_home = tmp_path / "direct"
    scenario_home.mkdir()
    without = scenario(direct, {"CHAPERONE_SERVER": "off"})

    served = tmp_path / "served"
    server = Server(served).start()
    try:
        with_server = scenario(served, {})
        # It went through the server: its API was asked (a start each, the
        # rest), and the runs' agents called back to it.
        _, _, metrics = raw(server.port, "GET", "/metrics", {"Host": "127.0.0.1:%d" % server.port,
                                                             "Authorization": "Bearer " + server.token})
        metrics = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
        api_posts = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("chaperone_api_requests_total"))
        callbacks = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("chaperone_callbacks_total"))
        seen_by_server = api_posts >= 10 and callbacks > 0
    finally:
        server.stop()
        kill_runs(served)
    assert with_server == without
    assert without["run"] == (3, b"out\0put", b"err")
    assert without["wait"][0] == 9 and without["ps"][1] == ["bg"]
    assert without["status nosuch"][0] == 4 and without["kill b"][0] == 4
    assert without["ps -q"] == (0, [b"bg"])
    assert seen_by_server


@pytest.mark.timeout(120)
def test_ps_through_the_server_is_current_without_ssh(tmp_path):
    """A run the server watches ends: `ps` shows it ended at once, from the
    server's pushed view; `CHAPERONE_SERVER=off ps --cached` (the records
    alone, before anyone looked) would not know yet; and a server that
    goes away leaves the CLI working directly."""
    home = tmp_path / "home"
    server = Server(home).start()
    try:
        r = cli(home, "run", "-d", "--id", "quick", "local", "--", "sh", "-c", "sleep 0.5; exit 4")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = cli(home, "ps", "-a", "--json")
            views = {v["id"]: v for v in json.loads(r.stdout)}
            if views["quick"]["state"] == "done":
                break
            time.sleep(0.1)
        assert views["quick"]["exit_code"] == 4
        server.kill()  # SIGKILL: its server.json stays behind, stale
        r = cli(home, "wait", "quick")
        assert r.returncode == 4, r.stderr
        r = cli(home, "run", "local", "--", "echo", "direct")
        assert (r.returncode, r.stdout) == (0, b"direct\n"), r.stderr
    finally:
        server.stop()
        kill_runs(home)


def test_docs_cli_has_the_run_objects_schema_and_every_field():
    """docs/cli.md shows the generated JSON Schema of the one run object and
    describes each of its fields."""
    import re
    from pathlib import Path

    from chaperone.models import RunInfo

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    blocks = re.findall(r"<!-- schema: run -->\s*```json\n(.*?)\n```", text, re.S)
    assert len(blocks) == 1 and json.loads(blocks[0]) == RunInfo.model_json_schema(), (
        "docs/cli.md: the run schema is stale")
    prose = text.split("<!-- schema: run -->")[0]
    missing = [f for f in RunInfo.model_fields if "`%s`" % f not in prose]
    assert not missing, missing
