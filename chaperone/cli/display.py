"""How the CLI shows things to people: tables that fit the terminal,
relative times and durations, one-line errors; and ``--json`` (one object
per run: :class:`chaperone.models.RunInfo`, documented in docs/cli.md).

Stdlib only (``ps`` of 10,000 runs must be quick)."""

from __future__ import annotations

import datetime
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Iterable, List, Optional, Sequence

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds from ``30``, ``1.5s``, ``500ms``, ``5m``, ``1h30m``, ``2d``,
    ``inf``; a one-line usage error otherwise."""
    from ..errors import UsageError

    s = str(text).strip().lower()
    try:
        value = float(s)  # plain seconds: 30, 0.5, 1e308, inf
    except ValueError:
        pass
    else:
        if value != value or value < 0:  # nan, negative
            raise UsageError("invalid %s %r: a number of seconds >= 0, or a duration such as 30s, 5m, 1h30m"
                             % (what, text))
        return value
    pos, total, matched = 0, 0.0, False
    while pos < len(s):  # NUMBER [UNIT], again after a unit (without re: the fast `run local` path)
        start = pos
        while pos < len(s) and s[pos].isdigit() and s[pos].isascii():
            pos += 1
        if pos < len(s) and s[pos] == "." and pos > start and s[pos + 1:pos + 2].isdigit():
            pos += 1
            while pos < len(s) and s[pos].isdigit() and s[pos].isascii():
                pos += 1
        if pos == start:
            break
        number = float(s[start:pos])
        while pos < len(s) and s[pos].isspace():
            pos += 1
        unit = next((u for u in ("ms", "s", "m", "h", "d", "w") if s.startswith(u, pos)), None)
        if unit is None:  # ("1h30": 30 what? a bare number stands alone, else each has its unit)
            raise UsageError("invalid %s %r: each number after the first needs its unit, as in 1h30m"
                             % (what, text))
        total += number * _UNITS[unit]
        matched = True
        pos += len(unit)
    if not matched or pos != len(s):
        raise UsageError("invalid %s %r: use seconds or a duration such as 30s, 5m, 1h30m, 2d" % (what, text))
    return total


def run_limits(timeout: Optional[str], kill_grace: Optional[str]) -> "tuple":
    """``--timeout`` and ``--kill-grace`` in seconds (None: not given).  A
    timeout of 0 or ``inf`` is none, as for ``timeout 0 CMD``; a grace
    must be finite."""
    from ..errors import UsageError

    limit = parse_duration(timeout, "--timeout") if timeout else None
    if limit is not None and (limit == 0 or limit == float("inf")):
        limit = None
    grace = parse_duration(kill_grace, "--kill-grace") if kill_grace else None
    if grace == float("inf"):
        raise UsageError("invalid --kill-grace %r: a finite number of seconds (SIGKILL follows SIGTERM after it)"
                         % kill_grace)
    return limit, grace


def human_duration(seconds: Optional[float]) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return "%.1fs" % seconds
    s = int(seconds)
    if s < 60:
        return "%ds" % s
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def parse_time(text: Optional[str]) -> Optional[float]:
    """Epoch seconds of an ISO 8601 time (None for None or junk)."""
    if not text:
        return None
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def ago(epoch: Optional[float], now: Optional[float] = None) -> str:
    """``5 seconds ago``, ``3 minutes ago``, ``2 days ago`` (as docker)."""
    if epoch is None:
        return "-"
    delta = max(0.0, (now or time.time()) - epoch)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= size:
            n = int(delta // size)
            return "%d %s%s ago" % (n, unit, "" if n == 1 else "s")
    n = int(delta)
    return "%d second%s ago" % (n, "" if n == 1 else "s") if n else "just now"


def short_ago(epoch: Optional[float], now: Optional[float] = None) -> str:
    """``5s``, ``3m``, ``2h``, ``4d`` (for "seen 5m ago")."""
    if epoch is None:
        return "?"
    d = max(0.0, (now or time.time()) - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return "%d%s" % (d // size, unit)
    return "%ds" % d


def terminal_width(default: int = 80) -> int:
    if not sys.stdout.isatty():
        return int(os.environ.get("COLUMNS") or 0) or 10 ** 6
    import shutil  # (here: not on the fast run's path)

    return shutil.get_terminal_size((default, 24)).columns


def cut(text: str, width: int) -> str:
    """``text`` in ``width`` columns, cut at a word boundary with an ellipsis."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = text[:width - 1]
    space = head.rfind(" ")
    if space >= width // 2:
        head = head[:space]
    return head.rstrip() + "…"


#: Control characters as escapes (``\n`` for a newline): a table's cell is one line.
_CONTROLS = dict([(c, "\\x%02x" % c) for c in list(range(32)) + [127]] + [(10, "\\n"), (9, "\\t"), (13, "\\r")])


def table(rows: Sequence[Sequence[str]], headers: Sequence[str], *, flex=-1,
          width: Optional[int] = None, floor: int = 12) -> str:
    """Columns padded to their widest cell; when the rows are wider than the
    terminal, column ``flex`` (the last by default; or several, the first
    given shrinking first, none below its header or ``floor`` characters)
    is cut to fit, at a word boundary with an ellipsis."""
    rows = [[str(c).translate(_CONTROLS) for c in row] for row in rows]  # (a newline in a command: one row still)
    cols = len(headers)
    flexes = [f % cols for f in (flex if isinstance(flex, (list, tuple)) else (flex,))]
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows]) for i in range(cols)]
    width = width or terminal_width()
    excess = sum(widths) + 2 * (cols - 1) - width
    for i in flexes:
        if excess <= 0:
            break
        least = max(len(headers[i]), floor) if i != flexes[0] else len(headers[i])
        take = max(0, min(excess, widths[i] - least))
        widths[i] -= take
        excess -= take
    out = []
    for row in [list(headers)] + rows:
        cells = [cut(c, widths[i]) if i in flexes else c for i, c in enumerate(row)]
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip())
    return "\n".join(out)


def result(info: dict) -> str:
    """How a run ended (or where it is), for people."""
    state = info["state"]
    if state == "done":
        if info.get("signal"):
            return ("timed out, " if info.get("timed_out") else "") + "killed by %s" % info["signal"]
        return "exited %s" % info.get("return_code")
    if state in ("error", "lost", "failed", "unknown"):
        return info.get("error") or state
    if state == "running" and info.get("pid"):
        return "pid %s" % info["pid"]
    return "-"


def status_table(infos: Sequence[dict], stale: "Optional[set]" = None) -> str:
    """``chaperone status ID...``'s table (each run as RunInfo, a dict);
    ``stale``: the ids of runs not read from their hosts now, shown as last
    seen (``running (seen 5m ago)``, no duration that goes on growing)."""
    def state(i):
        if stale and i["id"] in stale and i["state"] == "running":
            return "running (seen %s ago)" % short_ago(parse_time(i.get("last_seen")))
        return i["state"]

    rows = [(i["id"], i["host"], state(i), result(i),
             "-" if stale and i["id"] in stale and i["state"] == "running" else human_duration(i.get("duration")),
             str(i["stdout_bytes"]), str(i["stderr_bytes"])) for i in infos]
    return table(rows, ("ID", "HOST", "STATE", "RESULT", "DURATION", "STDOUT", "STDERR"), flex=3)


def print_json(obj) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def infos_json(infos: Iterable[dict]) -> list:
    return list(infos)


class OutageNotice:
    """``on_reconnect`` for a command that streams: one line on stderr per
    outage (its first failed attempt), not one per attempt; the stream's
    next event (``recovered()``) ends the outage."""

    def __init__(self, quiet: bool = False, write=None) -> None:
        self.quiet = quiet
        self.said = False
        self.write = write  # (a terminal in raw mode writes its lines its way)

    def __call__(self, error, delay) -> None:
        if not self.said and not self.quiet:
            line = "chaperone: %s; reconnecting\n" % str(error).rstrip(".")
            if self.write is not None:
                self.write(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
        self.said = True

    def recovered(self) -> None:
        self.said = False


def detached_note(run_id: str) -> str:
    """What a foreground run says when it lets go of a run that goes on."""
    return ("chaperone: detached; run %s goes on. Re-attach: chaperone attach %s (its output alone: chaperone "
            "logs -f %s); result: chaperone wait %s" % (run_id, run_id, run_id, run_id))


def end_note(run_id: str, state: dict) -> "Optional[str]":
    """How a run ended, when its exit status does not say it all (a start
    that failed, a lost run, a timeout): one line for stderr, or None."""
    if state.get("state") == "error":
        return "chaperone: %s" % state.get("error")
    if state.get("state") == "lost":
        return "chaperone: run %s was lost: %s" % (run_id, state.get("error"))
    if state.get("timed_out"):
        return "chaperone: run %s timed out; killed by %s" % (run_id, state.get("signal"))
    return None


def mid_line(last: bytes, fd: int) -> bool:
    """Whether a note on stderr would be glued to the output: the output's
    last bytes ``last`` went to ``fd`` without a final newline, and that and
    stderr are terminals (the same screen; a file or a pipe is left as is)."""
    return bool(last) and not last.endswith(b"\n") and is_terminal(fd) and is_terminal(2)


def say_end(run_id: str, state: dict, after_partial_line: bool = False) -> int:
    """The end of a run watched in the foreground (run, attach, the fast
    run): :func:`end_note` on stderr when there is one (on a line of its
    own: ``after_partial_line``, see :func:`mid_line`); the exit status to
    give (the run's: see ``chaperone.states.exit_code_for``)."""
    from ..states import exit_code_for

    note = end_note(run_id, state)
    if note and after_partial_line:
        note = "\n" + note
    if note:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stderr.buffer.write((note + "\n").encode("utf-8", "surrogateescape"))
            sys.stderr.flush()
        except OSError:
            pass
    return exit_code_for(state)


def is_terminal(fd: int) -> bool:
    """Whether ``fd`` is a terminal (False for a closed descriptor)."""
    try:
        return os.isatty(fd)
    except OSError:
        return False
