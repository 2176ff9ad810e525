"""What a command on many hosts prints: live lines, gathered blocks, JSON
lines, a summary table, and one exit status.  Output is bytes throughout:
a host's bytes (invalid UTF-8, binary, escape sequences) are written as they
came; only the decoration (prefixes, headers, markers) is chaperone's.

**Live** (:class:`LiveOutput`): each complete line of a host, as
``NAME: line`` with the names padded to the longest (``h1:   x`` /
``h100: x``: the colon stays on the name, so ``grep '^h1:'`` works), the
host's stdout on our stdout and its stderr on our stderr.  Partial lines are
buffered per host and stream, so a line never mixes bytes of two hosts and
each line is one write.  A line longer than ``max_line`` (1 MiB) is written
in pieces, the later pieces prefixed ``NAME+`` instead of ``NAME:``.  At a
host's end, a last line without a newline is written with one, followed by
the line ``NAME: \\ No newline at end of output`` (as diff says it).
``color=True`` (the CLI decides: a terminal, no ``NO_COLOR``) colours each
host's prefix (a palette, in host order) and dims the markers.

**Gathered** (``-b/--gather``, :func:`gather`): at the end, hosts with the
same stdout, stderr and exit status (and state) are shown once, under
clush ``-b``'s header: a rule, the folded node set and the host count, a
rule.  A group that did not succeed says why in its header (``h3 (1): exit
2`` / ``h4 (1): unreachable: ssh: ...``).  Groups come in the natural order
of their first host; stdout bytes go to our stdout, stderr bytes to our
stderr, exactly; a block not ending in a newline gets the same "No newline"
marker line.

**JSON lines** (``--json``, :func:`host_json`): one object per host, one
line each, in order of completion::

    {"host": "h01", "hostname": "127.0.0.2", "state": "done", "exit_status": 0,
     "duration": 0.21, "reason": null, "run_id": "...", "final": {...},
     "stdout": "text", "stderr": ""}

``stdout``/``stderr`` are present when valid UTF-8, else
``stdout_base64``/``stderr_base64`` instead (exactly one of the two);
``final`` is the run's final state as single-run ``--json`` prints it
(None when the run never started).  ``host_json`` is the one function to
align with the single-run shape.

**Summary** (:func:`summary_table`): HOST, STATE, EXIT, DURATION, REASON
(and RUN when runs have ids), hosts in natural order; rows equal but for the
host and duration fold into one node-set row (duration: min-max), so 1000
hosts that succeeded are one line.

**Exit status** (:func:`exit_status`, as ``clush -S``): 0 if every host
ran its program and it exited 0; otherwise the largest exit status over the
hosts, where a program's status is the shell's (its code, 128+N for signal
N, 126/127 when it could not be started) and a host whose run chaperone
could not start or follow (unreachable, refused, host key changed, agent
failure: ``failed``/``unreachable``/``lost``) counts as 255, as ssh's own
failures; a fan-out timeout counts 124 (as ``timeout(1)``) and a run never
started because of Ctrl-C 130.  So 255 means at least one host was not
reached; any non-zero status means "look at the summary".
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .fanout import CANCELLED, FAILED, TIMEOUT, HostFailure, HostResult
from .nodeset import fold, natural_key

__all__ = [
    "HostOutcome", "LiveOutput", "gather", "gather_groups", "host_json", "json_line", "summary_table",
    "summary_rows", "exit_status", "outcome_from_result", "progress_line", "NO_NEWLINE",
    "EXIT_UNREACHABLE", "EXIT_TIMEOUT", "EXIT_INTERRUPTED",
]

EXIT_UNREACHABLE = 255
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
NO_NEWLINE = b"\\ No newline at end of output"
#: States where the program ran to its end (exit_status is its own).
PROGRAM_STATES = ("done", "error")
_PALETTE = (b"32", b"33", b"34", b"35", b"36", b"92", b"93", b"94", b"95", b"96")
_RULE = b"-" * 15


@dataclass
class HostOutcome:
    """One host's result, as the output functions see it.

    ``state``: the run's final state (``done``, ``error`` (could not
    exec), ``lost``) or why there is none: ``failed``/``unreachable`` (no
    run), ``timeout`` (the fan-out stopped waiting), ``cancelled``
    (Ctrl-C).  ``exit_status``: the shell-like status (see the module
    docstring); None means "use the state's".  ``final``: the run's final
    state dict when there is one."""

    name: str
    state: str
    exit_status: Optional[int] = None
    duration: Optional[float] = None
    reason: Optional[str] = None
    stdout: bytes = b""
    stderr: bytes = b""
    run_id: Optional[str] = None
    hostname: Optional[str] = None
    final: Optional[Mapping[str, Any]] = field(default=None, repr=False)

    @property
    def status(self) -> int:
        """The exit status this host contributes (never None)."""
        if self.exit_status is not None:
            return self.exit_status
        return {TIMEOUT: EXIT_TIMEOUT, CANCELLED: EXIT_INTERRUPTED}.get(self.state, EXIT_UNREACHABLE)

    @property
    def succeeded(self) -> bool:
        return self.state == "done" and self.status == 0


def outcome_from_result(result: HostResult, name: Optional[str] = None) -> HostOutcome:
    """A :class:`~.fanout.HostResult` as a :class:`HostOutcome`: an ok
    result whose value is a HostOutcome is that (its duration filled in if
    missing); a failed one is ``failed`` with exit 255 (or the
    :class:`~.fanout.HostFailure`'s ``exit_status``); timeout and cancelled
    keep their state."""
    job = result.job
    hostname = getattr(job, "hostname", None)
    name = name or getattr(job, "name", None) or str(job)
    if result.ok:
        v = result.value
        if isinstance(v, HostOutcome):
            if v.duration is None:
                v.duration = result.duration
            return v
        return HostOutcome(name, "done", 0, result.duration, hostname=hostname)
    exit_ = None
    if isinstance(result.error, HostFailure) and result.error.exit_status is not None:
        exit_ = result.error.exit_status
    state = FAILED if result.state == FAILED else result.state
    return HostOutcome(name, state, exit_, result.duration, result.reason, hostname=hostname)


# --- live ------------------------------------------------------------------------------------------


class LiveOutput:
    """Live prefixed lines (see the module docstring).  ``out``/``err`` are
    binary streams (``sys.stdout.buffer``); one ``write`` per line."""

    def __init__(self, names: Sequence[str], out: IO[bytes], err: Optional[IO[bytes]] = None, *,
                 color: bool = False, max_line: int = 1 << 20) -> None:
        self.out = out
        self.err = err if err is not None else out
        self.color = color
        self.max_line = max(1, max_line)
        ordered = sorted(dict.fromkeys(names), key=natural_key)
        self.width = max((len(n.encode("utf-8", "surrogateescape")) for n in ordered), default=0)
        self._prefix: Dict[Tuple[str, bytes], bytes] = {}
        self._colors = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(ordered)}
        self._partial: Dict[Tuple[str, str], bytearray] = {}
        self._continued: Dict[Tuple[str, str], bool] = {}

    def prefix(self, name: str, mark: bytes = b":") -> bytes:
        key = (name, mark)
        p = self._prefix.get(key)
        if p is None:
            raw = name.encode("utf-8", "surrogateescape")
            pad = b" " * (self.width - len(raw) + 1)
            if self.color:
                c = self._colors.get(name, _PALETTE[0])
                p = b"\x1b[" + c + b"m" + raw + mark + b"\x1b[0m" + pad
            else:
                p = raw + mark + pad
            self._prefix[key] = p
        return p

    def _stream(self, stream: str) -> IO[bytes]:
        if stream == "stdout":
            return self.out
        if stream == "stderr":
            return self.err
        raise ValueError("stream is stdout or stderr, not %r" % stream)

    def feed(self, name: str, data: bytes, stream: str = "stdout") -> None:
        """Bytes of one host's stream, any size, cut anywhere."""
        if not data:
            return
        f = self._stream(stream)
        key = (name, stream)
        buf = self._partial.setdefault(key, bytearray())
        buf += data
        start = 0
        nl = buf.find(b"\n")
        if nl >= 0 and self._continued.get(key):  # the end of a line cut before: '+'
            self._whole(f, key, bytes(buf[:nl + 1]))
            start = nl + 1
            nl = buf.find(b"\n", start)
        if nl >= 0:  # whole lines: one write each (the loop kept tight: 1 MiB of short lines is 16k of them)
            write, p, most = f.write, self.prefix(name), self.max_line + 1
            while nl >= 0:
                if nl + 1 - start > most:  # (a line that came in pieces, longer than max_line)
                    self._whole(f, key, bytes(buf[start:nl + 1]))
                else:
                    write(p + buf[start:nl + 1])
                start = nl + 1
                nl = buf.find(b"\n", start)
            self._continued[key] = False
        del buf[:start]
        while len(buf) > self.max_line:  # (exactly max_line may still end the output)
            piece = bytes(buf[:self.max_line])
            del buf[:self.max_line]
            self._line(f, key, piece + b"\n", cut=True)

    def _whole(self, f: IO[bytes], key: Tuple[str, str], line: bytes) -> None:
        """A line with its newline, cut into pieces of max_line ('+' marks
        the pieces after the first)."""
        while len(line) > self.max_line + 1:
            self._line(f, key, line[:self.max_line] + b"\n", cut=True)
            line = line[self.max_line:]
        self._line(f, key, line)

    def _line(self, f: IO[bytes], key: Tuple[str, str], line: bytes, cut: bool = False) -> None:
        mark = b"+" if self._continued.get(key) else b":"
        f.write(self.prefix(key[0], mark) + line)
        self._continued[key] = cut

    def end(self, name: str) -> None:
        """The host is done: write its partial lines with the marker."""
        for stream in ("stdout", "stderr"):
            key = (name, stream)
            buf = self._partial.pop(key, None)
            if buf:
                f = self._stream(stream)
                self._line(f, key, bytes(buf) + b"\n")
                f.write(self.prefix(name) + self._marker() + b"\n")
            self._continued.pop(key, None)

    def _marker(self) -> bytes:
        return b"\x1b[2m" + NO_NEWLINE + b"\x1b[0m" if self.color else NO_NEWLINE

    def close(self) -> None:
        for name in sorted({k[0] for k in self._partial}, key=natural_key):
            self.end(name)
        for f in {id(self.out): self.out, id(self.err): self.err}.values():
            try:
                f.flush()
            except (AttributeError, ValueError, OSError):
                pass


# --- gathered ----------------------------------------------------------------------------------------


def _group_key(o: HostOutcome) -> tuple:
    state = o.state if o.state not in PROGRAM_STATES else "ran"
    return (o.stdout, o.stderr, o.status, state, o.reason if state != "ran" else None)


def gather_groups(outcomes: Iterable[HostOutcome]) -> List[Tuple[str, List[HostOutcome]]]:
    """Hosts with identical stdout, stderr, exit status (and, when their
    program did not run, state and reason), as (folded node set, outcomes),
    in the natural order of each group's first host."""
    groups: Dict[tuple, List[HostOutcome]] = {}
    for o in outcomes:
        groups.setdefault(_group_key(o), []).append(o)
    out = []
    for members in groups.values():
        members.sort(key=lambda o: natural_key(o.name))
        out.append((fold(o.name for o in members), members))
    out.sort(key=lambda g: natural_key(g[1][0].name))
    return out


def gather(outcomes: Iterable[HostOutcome], out: IO[bytes], err: Optional[IO[bytes]] = None, *,
           color: bool = False) -> None:
    """Write the gathered blocks (see the module docstring)."""
    err = err if err is not None else out
    for header, members in gather_groups(outcomes):
        o = members[0]
        title = ("%s (%d)" % (header, len(members))).encode("utf-8", "surrogateescape")
        why = _why(o)
        if why:
            title += b": " + why.encode("utf-8", "surrogateescape")
        if color:
            title = b"\x1b[34m" + title + b"\x1b[0m"
        out.write(_RULE + b"\n" + title + b"\n" + _RULE + b"\n")
        for data, f in ((o.stdout, out), (o.stderr, err)):
            if not data:
                continue
            if f is not out:
                _flush(out)
            f.write(data)
            if not data.endswith(b"\n"):
                f.write(b"\n" + (b"\x1b[2m" + NO_NEWLINE + b"\x1b[0m" if color else NO_NEWLINE) + b"\n")
            if f is not out:
                _flush(f)
    _flush(out)


def _why(o: HostOutcome) -> str:
    if o.succeeded:
        return ""
    if o.state in PROGRAM_STATES:
        sig = (o.final or {}).get("signal") if o.final else None
        return ("killed by %s (exit %d)" % (sig, o.status)) if sig else (
            "exit %d" % o.status if o.state == "done" else "could not start (exit %d)%s"
            % (o.status, ": " + o.reason if o.reason else ""))
    return "%s%s" % (o.state, ": " + o.reason if o.reason else "")


def _flush(f: IO[bytes]) -> None:
    try:
        f.flush()
    except (AttributeError, ValueError, OSError):
        pass


# --- JSON lines --------------------------------------------------------------------------------------------


def _bytes_field(d: Dict[str, Any], key: str, data: bytes) -> None:
    try:
        d[key] = data.decode("utf-8")
    except UnicodeDecodeError:
        d[key + "_base64"] = base64.b64encode(data).decode("ascii")


def host_json(o: HostOutcome, *, output: bool = True) -> Dict[str, Any]:
    """The JSON object of one host (see the module docstring); ``output``
    False leaves stdout/stderr out (when they were streamed already)."""
    d: Dict[str, Any] = {
        "host": o.name, "hostname": o.hostname or o.name, "state": o.state, "exit_status": o.status,
        "duration": None if o.duration is None else round(o.duration, 6), "reason": o.reason,
        "run_id": o.run_id, "final": dict(o.final) if o.final is not None else None,
    }
    if output:
        _bytes_field(d, "stdout", o.stdout)
        _bytes_field(d, "stderr", o.stderr)
    return d


def json_line(o: HostOutcome, *, output: bool = True) -> bytes:
    """:func:`host_json` as one line of bytes, newline included."""
    return json.dumps(host_json(o, output=output), sort_keys=True, ensure_ascii=True,
                      separators=(",", ":")).encode("ascii") + b"\n"


# --- summary and exit status ---------------------------------------------------------------------------------


def _fmt_duration(lo: Optional[float], hi: Optional[float]) -> str:
    if lo is None:
        return "-"
    if hi is None or abs(hi - lo) < 0.005:
        return "%.2f s" % lo
    return "%.2f-%.2f s" % (lo, hi)


def summary_rows(outcomes: Iterable[HostOutcome], *, fold_rows: bool = True) -> List[Tuple[str, ...]]:
    """Rows (host, state, exit, duration, reason[, run]) in natural host
    order; with ``fold_rows`` rows equal but for host/duration/run are one
    row under a folded node set (run: the single id, else ``N runs``)."""
    items = sorted(outcomes, key=lambda o: natural_key(o.name))
    with_runs = any(o.run_id for o in items)
    groups: Dict[tuple, List[HostOutcome]] = {}
    order: List[tuple] = []
    for o in items:
        k = (o.state, o.status, o.reason or "") if fold_rows else (o.name,)
        if k not in groups:
            groups[k] = []
            order.append(k)
        groups[k].append(o)
    rows = []
    for k in order:
        ms = groups[k]
        o = ms[0]
        ds = [m.duration for m in ms if m.duration is not None]
        row = [fold(m.name for m in ms) if len(ms) > 1 else o.name, o.state, str(o.status),
               _fmt_duration(min(ds) if ds else None, max(ds) if len(ds) > 1 else None), o.reason or ""]
        if with_runs:
            ids = [m.run_id for m in ms if m.run_id]
            row.append(ids[0] if len(ids) == 1 else ("%d runs" % len(ids) if ids else "-"))
        rows.append(tuple(row))
    return rows


def summary_table(outcomes: Iterable[HostOutcome], *, fold_rows: bool = True, width: Optional[int] = None) -> str:
    """The summary as aligned text (a header line, then rows), ending with
    a newline.  ``width`` (a terminal's columns): reasons too long for it
    are cut with an ellipsis, so that each row stays one line (the whole
    reason is in the host's output block and in ``--json``)."""
    rows = summary_rows(outcomes, fold_rows=fold_rows)
    headers = ("HOST", "STATE", "EXIT", "DURATION", "REASON", "RUN")[:len(rows[0]) if rows else 5]
    table = [headers] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    if width and sum(widths) + 2 * (len(widths) - 1) > width:
        room = max(12, width - (sum(widths) - widths[4]) - 2 * (len(widths) - 1))
        table = [r[:4] + ((r[4] if len(r[4]) <= room else r[4][:room - 1] + "\u2026"),) + r[5:] for r in table]
        widths[4] = max(len(r[4]) for r in table)
    lines = []
    for r in table:
        cells = [c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def exit_status(outcomes: Iterable[HostOutcome]) -> int:
    """0 if every host succeeded, else the largest status (see the module
    docstring).  No host at all: 0."""
    return max((0 if o.succeeded else (o.status or 1) for o in outcomes), default=0)


def progress_line(done: int, total: int, failed: int = 0, running: int = 0) -> str:
    """``12/50 done, 1 failed, 8 running`` (the CLI draws it on a terminal)."""
    parts = ["%d/%d done" % (done, total)]
    if failed:
        parts.append("%d failed" % failed)
    if running:
        parts.append("%d running" % running)
    return ", ".join(parts)
