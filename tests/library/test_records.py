"""Local records: an old database is upgraded in place; ps reads it."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from chaperone.records import Records

OLD_SCHEMA = """
CREATE TABLE runs (id TEXT PRIMARY KEY, host TEXT NOT NULL, transport TEXT NOT NULL, argv TEXT NOT NULL,
                   created REAL NOT NULL, state TEXT NOT NULL, return_code INTEGER, signal TEXT,
                   error TEXT, last TEXT);
"""


def cli(home, *args):
    env = dict(os.environ, CHAPERONE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "chaperone.cli", *args], env=env,
                          capture_output=True, timeout=60)


@pytest.mark.timeout(60)
def test_a_database_from_before_the_command_column_is_upgraded(tmp_path):
    db = sqlite3.connect(str(tmp_path / "runs.db"))
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO runs VALUES ('old-1', 'gpu1', ?, ?, 1.0, 'done', 3, NULL, NULL, ?)",
               (json.dumps({"host": "gpu1"}), json.dumps(["python", "a b.py"]),
                json.dumps({"state": "done", "pid": 7})))
    db.commit()
    db.close()

    res = cli(tmp_path, "ps", "-a", "--cached")
    assert res.returncode == 0, res.stderr
    line = res.stdout.decode().splitlines()[1]
    assert line.split()[:4] == ["old-1", "gpu1", "exited", "3"]
    assert line.endswith("python 'a b.py'")

    rec = Records(tmp_path / "runs.db")
    try:
        assert rec.get("old-1").command == "python 'a b.py'"
        rec.add("new-1", "local", {"host": "local"}, ["echo", "hi"])
        assert [r.id for r in rec.all()] == ["old-1", "new-1"]
    finally:
        rec.close()


@pytest.mark.timeout(60)
def test_the_database_is_private(tmp_path):
    Records(tmp_path / "runs.db").close()
    assert os.stat(tmp_path / "runs.db").st_mode & 0o777 == 0o600
