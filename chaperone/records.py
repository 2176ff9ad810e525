"""Local records of runs, in SQLite under ``$CHAPERONE_HOME``."""

from __future__ import annotations

import os
import sqlite3
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__; typing and
    # pathlib are not imported at start: the fast `run local` path uses this module)
    from pathlib import Path
    from typing import Dict, Iterator, List, Optional

#: ``(dumps, loads)``: json's, imported on first use, unless use_json gave others.
_CODEC: list = []


def use_json(dumps, loads) -> None:
    """Write and read the records' JSON with these (they must give exactly
    json.dumps's text and json.loads's values): the fast ``run local`` path
    gives the agent's, over json's C accelerator, and spares the json
    package, which loads re and enum (~8 ms of a 60 ms command)."""
    _CODEC[:] = [dumps, loads]


def _codec() -> list:
    if not _CODEC:
        import json

        _CODEC[:] = [json.dumps, json.loads]
    return _CODEC


def _dumps(obj) -> str:
    return _codec()[0](obj)


def _loads(text):
    return _codec()[1](text)


#: What shlex.quote leaves unquoted (its pattern: ``[^\w@%+=:,./-]``, ASCII).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")


def shell_join(argv) -> str:
    """``shlex.join(argv)``, the same text, without importing shlex (and
    with it re: the fast ``run local`` path records the command this way)."""
    return " ".join(_quote(a) for a in argv)


def _quote(word: str) -> str:
    if not word:
        return "''"
    if _SAFE.issuperset(word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


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
    command TEXT,
    seen REAL,
    grp TEXT,
    shell INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
"""

#: States a record never leaves for another (see chaperone.models.STATES).
_FINAL_SQL = "('done', 'error', 'lost', 'failed')"


def generated_id(run_id: str) -> bool:
    """Whether ``run_id`` was made by chaperone (``new_run_id``: date, time
    and 6 hex digits, maybe then ``-HOST`` in a group), not chosen with
    ``--id``: only such ids are taken by a prefix.  (No ``re``: the fast
    paths do without it.)"""
    head = run_id[:22]
    return (len(head) == 22 and head[:8].isdigit() and head[8] == "-" and head[9:15].isdigit()
            and head[15] == "-" and all(c in "0123456789abcdef" for c in head[16:22])
            and (len(run_id) == 22 or run_id[22] == "-") and head.isascii())


def printable(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 (surrogate escapes, as
    argv holds them) written as ``\\xNN``: storable and printable anywhere."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def chaperone_home(home: Optional[os.PathLike] = None) -> Path:
    """``$CHAPERONE_HOME``, else ``$XDG_STATE_HOME/chaperone``, else
    ``~/.local/state/chaperone``; created 0700."""
    from pathlib import Path

    return Path(home_dir(home))


def home_dir(home: Optional[os.PathLike] = None) -> str:
    """:func:`chaperone_home` as a string (without importing pathlib)."""
    if home is None:
        home = os.environ.get("CHAPERONE_HOME")
    if not home:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        home = os.path.join(base, "chaperone")
    path = os.fspath(home)
    _makedirs(path)
    return path


def _makedirs(path: str) -> None:
    """``Path.mkdir(mode=0o700, parents=True, exist_ok=True)``."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if parent != path and not os.path.isdir(parent):
            os.makedirs(parent, exist_ok=True)  # (parents: the default mode, as Path.mkdir makes them)
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path) and os.path.isdir(parent):
            from .errors import ChaperoneError

            raise ChaperoneError("chaperone's home %s is a file, not a directory: set CHAPERONE_HOME to a "
                                 "directory (or move the file)" % path) from None
        if not os.path.isdir(path):
            from .errors import ChaperoneError

            raise ChaperoneError("cannot make chaperone's home %s: a part of its path is a file (set "
                                 "CHAPERONE_HOME to a directory you can write)" % path) from None
    except OSError as e:
        from .errors import ChaperoneError

        raise ChaperoneError("cannot make chaperone's home %s: %s (set CHAPERONE_HOME to a directory you can "
                             "write)" % (path, e.strerror or e)) from None


class Record:
    """One row of ``runs``: a run as recorded here."""

    __slots__ = ("id", "host", "transport", "argv", "created", "state", "return_code", "signal", "error", "last",
                 "command", "seen", "group", "shell")

    def __init__(self, row):
        for name, value in zip(self.__slots__, row):
            setattr(self, name, value)
        self.transport = _loads(self.transport)
        self.argv = _loads(self.argv)
        self.last = _loads(self.last) if self.last else None
        self.shell = bool(self.shell)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @property
    def final(self) -> bool:
        return self.state in ("done", "error", "lost", "failed")

    def info(self) -> dict:
        """The run as the one JSON object (chaperone.models.RunInfo), as a dict."""
        return run_info(self)


_COLUMNS = "id, host, transport, argv, created, state, return_code, signal, error, last, command, seen, grp, shell"


def _iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    import datetime

    # (as the agent writes start_time and end_time: one format in one object)
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


def _seconds_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    import datetime

    def parse(text):
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))

    try:
        a = parse(start)
        b = parse(end) if end else datetime.datetime.now(datetime.timezone.utc)
        if a.tzinfo is None:
            a = a.replace(tzinfo=datetime.timezone.utc)
        if b.tzinfo is None:
            b = b.replace(tzinfo=datetime.timezone.utc)
        return max(0.0, round((b - a).total_seconds(), 3))
    except (TypeError, ValueError, AttributeError):
        return None


def run_info(rec: "Record") -> dict:
    """A record as the one JSON object of a run (chaperone.models.RunInfo)."""
    last = dict(rec.last or {})
    from .states import exit_code_for

    for key in ("return_code", "signal"):  # (records of earlier versions kept them in columns only)
        if last.get(key) is None and getattr(rec, key) is not None:
            last[key] = getattr(rec, key)

    state = rec.state
    info = {
        "id": rec.id, "host": rec.host, "command": rec.command or shell_join(rec.argv),
        "argv": None if rec.shell else list(rec.argv), "state": state,
        "exit_code": exit_code_for({**last, "state": state}) if state in ("done", "error", "lost", "failed")
        else None,
        "return_code": last.get("return_code") if state == "done" else None,
        "signal": last.get("signal") if state == "done" else None,
        "timed_out": bool(last.get("timed_out")) if state == "done" else False,
        "error": rec.error if state in ("error", "lost", "failed", "unknown") else None,
        "created": _iso(rec.created), "start_time": last.get("start_time"), "end_time": last.get("end_time"),
        "duration": _seconds_between(last.get("start_time"), last.get("end_time")) if last.get("start_time")
        else None,
        "stdout_bytes": last.get("stdout_bytes", 0), "stderr_bytes": last.get("stderr_bytes", 0),
        "pid": last.get("pid"), "remote_host": last.get("host"), "spool": last.get("spool"),
        "last_seen": _iso(rec.seen), "silent": False, "group": rec.group,
    }
    return info


class Records:
    def __init__(self, path: os.PathLike):
        self._path = os.fspath(path)
        if not os.path.exists(self._path):
            # Create it 0600 before SQLite does.  Only when it does not exist:
            # closing a descriptor of a database this process has open would
            # drop SQLite's POSIX locks on it.
            try:
                os.close(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
        # (an SQLite built serialized, threadsafety 3 as Python's own is, lets
        # other threads use this connection: asyncio.to_thread(ch.get, ...))
        self.db = sqlite3.connect(self._path, timeout=30, isolation_level=None,
                                  check_same_thread=sqlite3.threadsafety != 3)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            from .errors import ChaperoneError

            raise ChaperoneError("the records %s cannot be read (%s): move it aside (mv %s %s.bad) and chaperone "
                                 "starts new ones; the runs' spools on their hosts are untouched"
                                 % (self._path, e, self._path, self._path)) from None

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self._path)

    def _migrate(self) -> None:
        """Bring a database made by an earlier version up to this schema."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for name, decl in (("seen", "REAL"), ("grp", "TEXT"), ("shell", "INTEGER NOT NULL DEFAULT 0")):
            if name not in columns:
                self.db.execute("ALTER TABLE runs ADD COLUMN %s %s" % (name, decl))
        if "command" not in columns:
            self.db.execute("ALTER TABLE runs ADD COLUMN command TEXT")
            rows = self.db.execute("SELECT id, argv FROM runs").fetchall()
            self.db.executemany("UPDATE runs SET command = ? WHERE id = ?",
                                [(shell_join(_loads(argv)), run_id) for run_id, argv in rows])

    def close(self) -> None:
        self.db.close()

    def add(self, run_id: str, host: str, transport: dict, argv: List[str], *, command: Optional[str] = None,
            shell: bool = False, group: Optional[str] = None) -> "Record":
        """Record a new run as ``starting``; if the id is recorded already,
        the record as it is (look-up and insert in one statement: two
        processes adding one id both get the one record)."""
        self.db.execute(
            "INSERT OR IGNORE INTO runs (id, host, transport, argv, created, state, command, shell, grp)"
            " VALUES (?, ?, ?, ?, ?, 'starting', ?, ?, ?)",
            (run_id, host, _dumps(transport), _dumps(argv), time.time(),
             printable(command if command is not None else shell_join(argv)), int(shell), group),
        )
        return self.get(run_id)

    def exists(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None

    def get(self, run_id: str) -> Optional[Record]:
        row = self.db.execute("SELECT %s FROM runs WHERE id = ?" % _COLUMNS, (run_id,)).fetchone()
        return Record(row) if row else None

    def resolve(self, prefix: str) -> List[str]:
        """The ids equal to ``prefix``, else the generated ones starting with
        it (as docker takes a prefix of an id, never of a name: ``job1`` is
        not ``job10``)."""
        if self.exists(prefix):
            return [prefix]
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        return [r[0] for r in self.db.execute("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 200", (like,))
                if generated_id(r[0])][:10]

    def update(self, run_id: str, state: dict) -> None:
        """Store the state the host reported.  A record that is final stays
        as it is unless the new state is final too (a late update never
        turns an ended run back into a running one)."""
        self.db.execute(
            "UPDATE runs SET state = ?, return_code = ?, signal = ?, error = ?, last = ?, seen = ? WHERE id = ?"
            " AND (state NOT IN %s OR ? IN %s)" % (_FINAL_SQL, _FINAL_SQL),
            (state["state"], state.get("return_code"), state.get("signal"), state.get("error"),
             _dumps(state), time.time(), run_id, state["state"]),
        )

    def mark(self, run_id: str, state: str, error: Optional[str] = None) -> None:
        """Set a record's own state (``starting``, ``unknown``, ``failed``)
        with its reason; never over a final state."""
        self.db.execute("UPDATE runs SET state = ?, error = ? WHERE id = ? AND state NOT IN %s" % _FINAL_SQL,
                        (state, error, run_id))

    def restart(self, run_id: str) -> None:
        """A run whose start failed is started again: ``starting`` anew."""
        self.db.execute("UPDATE runs SET state = 'starting', error = NULL, created = ? WHERE id = ? AND state = 'failed'",
                        (time.time(), run_id))

    def remove(self, run_id: str) -> None:
        self.db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def states(self) -> Dict[str, str]:
        """Every recorded run's id and state (one query)."""
        return dict(self.db.execute("SELECT id, state FROM runs"))

    def counts(self) -> List[tuple]:
        """``(host, state, number of runs)`` for every recorded run."""
        return self.db.execute("SELECT host, state, count(*) FROM runs GROUP BY host, state").fetchall()

    def select(self, *, final: bool = True, hosts=(), ids=None, where=None, args=None) -> List[Record]:
        """Records in one query: with ``final=False`` only those not over
        (the final ones are never read nor parsed); ``hosts``: only runs on
        these hosts; ``ids``: only these runs."""
        if where is not None:  # (a part of a look-up by ids)
            sql = "SELECT %s FROM runs WHERE %s" % (_COLUMNS, " AND ".join(where))
            return [Record(row) for row in self.db.execute(sql, args)]
        where, args = [], []
        if not final:
            where.append("state NOT IN %s" % _FINAL_SQL)
        if hosts:
            where.append("host IN (%s)" % ", ".join("?" * len(hosts)))
            args += list(hosts)
        if ids is not None:
            ids, out = list(ids), []
            for at in range(0, len(ids), 900):  # (SQLite's bound on parameters: 999 before 3.32)
                part = ids[at:at + 900]
                out += self.select(final=final, hosts=hosts, where=where + [
                    "id IN (%s)" % ", ".join("?" * len(part))], args=args + part)
            return sorted(out, key=lambda r: r.created)
        sql = "SELECT %s FROM runs%s ORDER BY created" % (_COLUMNS, " WHERE " + " AND ".join(where) if where else "")
        return [Record(row) for row in self.db.execute(sql, args)]

    def all(self) -> Iterator[Record]:
        for row in self.db.execute("SELECT %s FROM runs ORDER BY created" % _COLUMNS):
            yield Record(row)
