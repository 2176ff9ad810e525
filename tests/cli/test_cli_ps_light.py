"""``chaperone ps`` reads the records in one query, makes the local runs
that are not over current from their spools, and loads neither pydantic
nor asyncio for that (issue 10's speed target: 10,000 runs under 0.3 s,
measured in benchmarks/run.py, never here).  Real runs, real spools."""

import json
import subprocess
import sys

import pytest

from support.helpers import cli, cli_env, kill_marked, marker_number, read_state, spool_root, wait_for

#: ps with pydantic and asyncio unimportable: it must not need them here.
LIGHT = [sys.executable, "-c", "import sys\nfor m in ('pydantic', 'asyncio'): sys.modules[m] = None\n"
         "from chaperone.__main__ import main\nmain()"]


def light(home, *args):
    res = subprocess.run(LIGHT + list(args), env=cli_env(home), cwd=str(home), stdin=subprocess.DEVNULL,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.timeout(60)
def test_ps_current_states_without_pydantic_or_asyncio(tmp_path):
    from chaperone.records import Records

    home = tmp_path / "home"
    home.mkdir()
    m = marker_number()
    try:
        assert cli(home, "run", "-d", "--id", "live", "local", "--", "sleep", m).returncode == 0
        gate = tmp_path / "gate"  # (it ends after run -d recorded it running)
        assert cli(home, "run", "-d", "--id", "ended", "local", "--", "sh", "-c",
                   "while [ ! -e %s ]; do sleep 0.02; done; exit 3" % gate).returncode == 0
        gate.write_text("")
        wait_for(lambda: read_state(spool_root(home), "ended")["state"] == "done", 10, what="ended's end")
        records = Records(home / "runs.db")
        try:
            assert records.get("ended").state == "running"  # (as recorded by run -d)
            records.db.execute("BEGIN")
            for i in range(300):  # runs over, on this machine and a host
                run_id = "old%03d" % i
                records.add(run_id, "local" if i % 2 else "gpu1", {"host": "gpu1"}, ["echo", str(i)])
                records.update(run_id, {"state": "done" if i % 3 else "error", "return_code": 0, "error": None})
            records.db.execute("COMMIT")
        finally:
            records.close()

        out = light(home, "ps")
        lines = out.decode().splitlines()
        assert lines[0].split() == ["ID", "HOST", "STATUS", "CREATED", "DURATION", "COMMAND"]
        assert [l.split()[0] for l in lines[1:]] == ["live"]  # ended is over now: not shown
        assert "running" in lines[1] and "seen" not in lines[1]  # current, read from its spool

        every = json.loads(light(home, "ps", "-a", "--json"))
        assert len(every) == 302
        by_id = {r["id"]: r for r in every}
        assert by_id["ended"]["state"] == "done" and by_id["ended"]["exit_code"] == 3  # refreshed, and recorded:
        cached = {r["id"]: r for r in json.loads(light(home, "ps", "-a", "--json", "--cached"))}
        assert cached["ended"]["state"] == "done"
        assert by_id["old001"]["state"] == "done" and by_id["old003"]["state"] == "error"
        assert [r["id"] for r in every[:2]] == ["old299", "old298"]  # newest first
        assert [r["id"] for r in every[-2:]] == ["ended", "live"]
        assert light(home, "ps", "-q", "--state", "error").split() == sorted(
            (b"old%03d" % i for i in range(300) if not i % 3), reverse=True)
        assert light(home, "ps", "-q", "--host", "gpu1", "-n", "2").split() == [b"old298", b"old296"]
    finally:
        kill_marked(m)
