"""Local records of runs, in SQLite under ``$CHAPERONE_HOME``."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import time
from pathlib import Path
from typing import Iterator, List, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    transport TEXT NOT NULL,
    argv TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    return_code INTEGER,
    signal TEXT,
    error TEXT,
    last TEXT,
    command TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""


def chaperone_home(home: Optional[os.PathLike] = None) -> Path:
    """``$CHAPERONE_HOME``, else ``$XDG_STATE_HOME/chaperone``, else
    ``~/.local/state/chaperone``; created 0700."""
    if home is None:
        home = os.environ.get("CHAPERONE_HOME")
    if not home:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        home = os.path.join(base, "chaperone")
    path = Path(home)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class Record:
    __slots__ = ("id", "host", "transport", "argv", "created", "state", "return_code", "signal", "error", "last",
                 "command")

    def __init__(self, row):
        for name, value in zip(self.__slots__, row):
            setattr(self, name, value)
        self.transport = json.loads(self.transport)
        self.argv = json.loads(self.argv)
        self.last = json.loads(self.last) if self.last else None

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


class Records:
    def __init__(self, path: os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            # Create it 0600 before SQLite does.  Only when it does not exist:
            # closing a descriptor of a database this process has open would
            # drop SQLite's POSIX locks on it.
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        if "command" not in columns:
            self.db.execute("ALTER TABLE runs ADD COLUMN command TEXT")
            rows = self.db.execute("SELECT id, argv FROM runs").fetchall()
            self.db.executemany("UPDATE runs SET command = ? WHERE id = ?",
                                [(shlex.join(json.loads(argv)), run_id) for run_id, argv in rows])

    def close(self) -> None:
        self.db.close()

    def add(self, run_id: str, host: str, transport: dict, argv: List[str]) -> None:
        self.db.execute(
            "INSERT INTO runs (id, host, transport, argv, created, state, command)"
            " VALUES (?, ?, ?, ?, ?, 'starting', ?)",
            (run_id, host, json.dumps(transport), json.dumps(argv), time.time(), shlex.join(argv)),
        )

    def exists(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None

    def get(self, run_id: str) -> Optional[Record]:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Record(row) if row else None

    def update(self, run_id: str, state: dict) -> None:
        self.db.execute(
            "UPDATE runs SET state = ?, return_code = ?, signal = ?, error = ?, last = ? WHERE id = ?",
            (state["state"], state.get("return_code"), state.get("signal"), state.get("error"),
             json.dumps(state), run_id),
        )

    def mark(self, run_id: str, state: str, error: Optional[str] = None) -> None:
        self.db.execute("UPDATE runs SET state = ?, error = ? WHERE id = ?", (state, error, run_id))

    def remove(self, run_id: str) -> None:
        self.db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def all(self) -> Iterator[Record]:
        for row in self.db.execute("SELECT * FROM runs ORDER BY created"):
            yield Record(row)

    def table(self) -> List[tuple]:
        """The rows ``ps`` shows, formatted by SQLite (fast for 10,000s)."""
        return self.db.execute(
            "SELECT id, host, state,"
            " CASE WHEN state = 'done' AND signal IS NOT NULL THEN 'signal ' || signal"
            "      WHEN state = 'done' THEN 'exit ' || return_code"
            "      WHEN state IN ('error', 'lost', 'failed') THEN substr(coalesce(error, ''), 1, 40)"
            "      ELSE 'pid ' || coalesce(json_extract(last, '$.pid'), '-') END,"
            " strftime('%Y-%m-%d %H:%M:%S', created, 'unixepoch', 'localtime'),"
            " substr(command, 1, 60)"
            " FROM runs ORDER BY created").fetchall()
