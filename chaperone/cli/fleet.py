"""Many hosts from the command line: ``run -H PATTERN``, and group ids and
patterns wherever run ids are taken.  Built on :mod:`chaperone.fleet.runs`
(the library's fan-out) and :mod:`chaperone.fleet.output` (what is
printed); docs/hosts.md has the whole story.

``chaperone run -H PATTERN [-H ...] [--hostfile FILE] -- CMD``: one run per
host, all in one group (its id is printed on stderr on a terminal, on
stdout with ``-d``).  Output:

* live (default): each line of each host as it comes, ``NAME: line``
  (stdout to stdout, stderr to stderr); on a terminal a progress line
  below it;
* ``-b/--gather``: at the end, each distinct output once under its hosts;
* ``--json``: one object per host as each ends: the run's object
  (``RunInfo``, as ``run --json`` prints it) plus ``reason`` and its output
  (``stdout``/``stderr``, or ``stdout_base64``/``stderr_base64`` when not
  UTF-8).

Then a summary table (stderr; folded: hosts alike are one row) and the
exit status of :func:`chaperone.fleet.output.exit_status`: 0 if every host
ran the command and it exited 0, else the largest status (255: a host was
not reached or its run lost, 124 timed out, 130 interrupted).  Ctrl-C
once sends SIGINT to every run; twice detaches from them all (exit 130 at
least; they run on).

Group ids and patterns (:func:`expand_ids`), for ``status``, ``logs``,
``wait``, ``kill``, ``clean``: a group id (or a unique prefix of one)
means all its runs, in host order; ``GROUP/PATTERN`` the runs of GROUP on
the hosts of a host pattern (``G/h[01-05]``, ``G/!h03``, ``G/@gpu`` with
an inventory; ``all`` is the group's hosts); a glob over run ids
(``'*-gpu1'``) the runs it matches.  ``kill`` skips a group's runs that
never started (nothing to signal).  ``logs`` of several runs prefixes
each line with its host (:func:`logs_many`).

Light to import: the single-host ``run`` imports this module too.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Dict, Iterable, List, Optional

from .options import MANY_ONLY

_FLAGS = {"inventory": "--inventory", "exclude": "-x/--exclude", "pick": "--pick", "forks": "-f/--forks",
          "gather": "-b/--gather"}


def one_host_only(params: dict) -> None:
    """A single-host ``run`` with options of many hosts: a usage error."""
    used = [_FLAGS[k] for k in MANY_ONLY if params.get(k)]
    if used:
        from .app import fail

        fail("%s only go%s with -H PATTERN or --hostfile FILE (Try 'chaperone run --help'.)"
             % (", ".join(used), "es" if len(used) == 1 else ""), 2)


def _count(params: dict, key: str, flag: str) -> Optional[int]:
    value = params.get(key)
    if value is None:
        return None
    if not str(value).isdigit() or int(value) < 1:
        from .app import fail

        fail("invalid %s %r: a number, 1 or more (Try 'chaperone run --help'.)" % (flag, value), 2)
    return int(value)


# --- run -H ------------------------------------------------------------------------------------------------


class _Screen:
    """The progress line on a terminal (stderr): cleared before any other
    output is written, drawn again a moment later."""

    def __init__(self, many, enabled: bool) -> None:
        self.many = many
        self.enabled = enabled
        self.shown = False
        self.err = sys.stderr.buffer

    def clear(self) -> None:
        if self.shown:
            self.err.write(b"\r\x1b[K")
            self.err.flush()
            self.shown = False

    def draw(self) -> None:
        if not self.enabled:
            return
        from ..fleet.output import progress_line
        from .display import terminal_width

        m = self.many
        text = progress_line(m.done, m.total, m.failed, m.running + m.starting)
        self.err.write(b"\r\x1b[K" + text[:max(10, terminal_width() - 1)].encode())
        self.err.flush()
        self.shown = True

    def say(self, line: str) -> None:
        self.clear()
        self.err.write(("chaperone: %s\n" % line).encode("utf-8", "replace"))
        self.err.flush()


def run_many(words, exact, params) -> int:
    """``chaperone run -H PATTERN ... CMD`` (see the module docstring)."""
    from .app import fail, run_async
    from .display import parse_duration

    if not words:
        fail("no command given: chaperone run -H PATTERN CMD... (Try 'chaperone run --help'.)", 2)
    command = list(words) if exact else " ".join(words)
    forks = _count(params, "forks", "-f/--forks")
    pick = _count(params, "pick", "--pick")
    timeout = parse_duration(params["timeout"], "--timeout") if params.get("timeout") else None
    grace = parse_duration(params["kill_grace"], "--kill-grace") if params.get("kill_grace") else None
    detach, as_json, gather = params.get("detach"), params.get("as_json"), params.get("gather")
    if detach and gather:
        fail("-d and -b do not go together: a detached run has no output yet (Try 'chaperone run --help'.)", 2)
    if as_json and gather:
        fail("--json and -b do not go together: --json gives each host's output (Try 'chaperone run --help'.)", 2)

    async def go(ch) -> int:
        from ..errors import UsageError
        from .options import run_env, ssh_settings
        from .run import _stdin_source

        live = []  # what writes a piece of output, once the hosts are known

        def on_output(name, stream, data):
            live[0](name, stream, data)

        def on_reconnect(name, error):
            live[1](name, error)

        streaming = not (detach or as_json or gather)
        kw = dict(group=params.get("run_id"), ssh=ssh_settings(params), env=run_env(params),
                  cwd=params.get("cwd"), timeout=timeout, stdin=_stdin_source(params),
                  config={"kill_grace": grace} if grace is not None else None,
                  inventory=list(params.get("inventory") or ()), exclude=list(params.get("exclude") or ()),
                  hostfiles=list(params.get("hostfiles") or ()), pick=pick, forks=forks,
                  collect=not (streaming or detach), on_output=on_output if streaming else None,
                  on_reconnect=on_reconnect if streaming and not params.get("quiet") else None)
        try:
            many = (ch.start_many if detach else ch.run_many)(list(params.get("hosts") or ()), command, **kw)
        except ValueError as e:  # a bad pattern, inventory, host file (one line each)
            raise UsageError(str(e)) from None
        code = await _drive(ch, many, params, live)
        if detach:
            code = max(code, await _inputs_sent(ch, many))
        elif params.get("remove"):
            from .run import _remove

            for run_id in many.run_ids.values():
                await _remove(ch, run_id)
        return code

    return run_async(params, go)


async def _inputs_sent(ch, many) -> int:
    """``run -d -H`` with input: it is all on every host that started
    before this returns (the hosts read it from this process); 255 when it
    could not be sent to one (said on stderr)."""
    import asyncio

    import click

    from ..errors import ChaperoneError

    async def sent(run_id):
        try:
            await ch.get(run_id).stdin_sent()
            return 0
        except ChaperoneError as e:
            click.echo("chaperone: %s: %s" % (run_id, e), err=True)
            return 255

    codes = await asyncio.gather(*(sent(rid) for rid in many.run_ids.values() if ch.records.exists(rid)))
    return max(codes, default=0)


async def _drive(ch, many, params, live) -> int:
    import asyncio
    import signal

    from ..fleet.output import LiveOutput, exit_status, gather, summary_table

    detach, as_json, quiet = params.get("detach"), params.get("as_json"), params.get("quiet")
    tty = sys.stderr.isatty()
    screen = _Screen(many, enabled=tty and not quiet)
    # Buffered (whatever PYTHONUNBUFFERED says), flushed after each piece:
    # one write per line to LiveOutput, one system call per piece.
    sys.stdout.flush()
    sys.stderr.flush()
    out = open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)
    err = open(sys.stderr.fileno(), "wb", buffering=1 << 16, closefd=False)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    lines = LiveOutput([h.name for h in many.hosts], out, err, color=color)

    def feed(name, stream, data):
        screen.clear()
        lines.feed(name, data, stream)
        (out if stream == "stdout" else err).flush()

    def lost(name, error):  # (as one run says it: a line on stderr, the host's prefix, the output goes on after)
        screen.clear()
        out.flush()
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        err.write(lines.prefix(name) + ("chaperone: %s; reconnecting\n" % why).encode("utf-8", "replace"))
        err.flush()

    live.extend([feed, lost])
    hint = "chaperone logs %s, wait %s, kill %s" % (many.group, many.group, many.group)
    if detach:
        if not as_json:
            sys.stdout.write(many.group + "\n")
            sys.stdout.flush()
    elif tty and not quiet and not as_json:
        screen.say("group %s: %d host%s (%s)" % (many.group, many.total, "" if many.total == 1 else "s", hint))

    loop = asyncio.get_running_loop()

    def on_sigint():
        n = many.interrupt()
        if n == 1:
            screen.say("sending SIGINT to every run (Ctrl-C again to detach)")
        elif n == 2:
            screen.say("detaching; the runs go on")

    async def redraw():
        while True:
            screen.draw()
            await asyncio.sleep(0.1)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    drawer = asyncio.ensure_future(redraw()) if screen.enabled else None
    outcomes = []
    try:
        async with many:
            async for r in many:
                outcomes.append(r)
                if as_json:
                    screen.clear()
                    out.write(_json_line(r, output=not detach))
                    out.flush()
                elif not detach and not params.get("gather"):
                    screen.clear()
                    lines.end(r.name)
                    if r.state in ("failed", "unreachable", "lost", "timeout", "error"):
                        out.flush()
                        err.write(lines.prefix(r.name) + ("chaperone: %s: %s\n" % (r.state, r.reason)).encode(
                            "utf-8", "replace"))
                    out.flush()
                    err.flush()
                elif detach and r.state not in ("running", "done"):
                    screen.say("%s: %s: %s" % (r.name, r.state, r.reason))
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if drawer is not None:
            drawer.cancel()
            await asyncio.gather(drawer, return_exceptions=True)
        screen.clear()
        out.flush()
        err.flush()
    if params.get("gather"):
        gather(outcomes, sys.stdout.buffer, sys.stderr.buffer, color=color)
    if detach:
        bad = [o for o in outcomes if o.state not in ("running", "done") or o.status != 0]
        if bad and not quiet and not as_json:
            sys.stderr.write(summary_table(bad, width=_columns()))
        return max((o.status or 255 for o in bad), default=0)
    if not quiet and (not as_json or tty):
        sys.stderr.write(summary_table(outcomes, width=_columns()))
    if many.interrupts >= 2:
        sys.stderr.write("chaperone: detached from group %s; its runs go on (%s)\n" % (many.group, hint))
    elif outcomes and not quiet and not as_json and tty:
        sys.stderr.write("chaperone: group %s\n" % many.group)
    sys.stderr.flush()
    return exit_status(outcomes)


def _columns() -> Optional[int]:
    """The terminal's width when stderr is one (the summary fits it)."""
    import shutil

    return shutil.get_terminal_size((0, 0)).columns or None if sys.stderr.isatty() else None


def _json_line(r, output: bool = True) -> bytes:
    """One host as one JSON line: the run's object (RunInfo, as ``run
    --json`` prints it), ``reason``, and (unless detached) its output."""
    import base64
    import json

    if r.run is not None:
        d = r.run.info().model_dump()
    else:  # never recorded (not started: Ctrl-C, a bad host name)
        d = {"id": None, "host": r.name, "state": r.state, "exit_code": None, "error": r.reason}
    d["reason"] = r.reason
    for key, data in (("stdout", r.stdout), ("stderr", r.stderr)) if output else ():
        try:
            d[key] = data.decode("utf-8")
        except UnicodeDecodeError:
            d[key + "_base64"] = base64.b64encode(data).decode("ascii")
    return json.dumps(d, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


# --- group ids and patterns where run ids are taken ---------------------------------------------------------


def _is_pattern(word: str) -> bool:
    return "/" in word or any(c in word for c in "*?[")


def expand_ids(ch, run_ids: Iterable[str]) -> List[str]:
    """The run ids meant by ``run_ids``: each a run id or a unique prefix
    of one (kept as it is: the caller resolves it), a group id or a unique
    prefix of one (its runs, in host order), ``GROUP/PATTERN`` (its runs on
    the hosts of PATTERN), or a glob over run ids.  Each run once."""
    out: List[str] = []
    seen = set()
    many = False
    for word in run_ids:
        ids = _expand(ch, word)
        many = many or ids != [word]
        for rid in ids:
            if rid not in seen:
                seen.add(rid)
                out.append(rid)
    if many and len(out) > 1:
        _warm(ch, out)
    return out


def _warm(ch, run_ids: List[str]) -> None:
    """Start connecting to the hosts of these runs now, all at once (at
    most ``-f``'s default): the commands then go run by run without a
    handshake each.  Only hosts the command will contact: not for runs
    that never started, nor (``wait``) for runs already over."""
    from ..fleet.limits import default_forks

    command = _command()
    if command not in ("status", "logs", "kill", "clean", "wait"):
        return
    hosts = set()
    for rid in run_ids:
        rec = ch.records.get(rid)
        if rec is None or rec.state == "failed" or rec.host == "local" or (command == "wait" and rec.final):
            continue
        key = (rec.host, str(rec.transport))
        if key in hosts:
            continue
        hosts.add(key)
        if len(hosts) > default_forks():
            break
        try:
            ch.preconnect_run(rid)
        except Exception:  # (a guess: the command itself says what is wrong)
            pass


def _command() -> str:
    try:
        import click

        ctx = click.get_current_context(silent=True)
        return ctx.info_name if ctx is not None else ""
    except ImportError:  # pragma: no cover
        return ""


def _group_of(ch, word: str) -> Optional[str]:
    """The group ``word`` names (its id or a unique prefix of it, matching
    no run outside it), or None."""
    from ..fleet.runs import group_ids_like

    groups = group_ids_like(ch, word)
    if len(groups) != 1:
        return None
    if groups[0] == word:
        return word
    outside = [r for r in ch.records.resolve(word) if (ch.records.get(r).group or None) != groups[0]]
    return None if outside else groups[0]


def _expand(ch, word: str) -> List[str]:
    from ..errors import NoSuchRun

    if "/" in word:
        group, _, pattern = word.partition("/")
        group = _group_of(ch, group) if group else None
        # (not a group's: the word is what it was before, an invalid run id)
        return _group_pattern(ch, group, pattern, word) if group else [word]
    if any(c in word for c in "*?["):
        import fnmatch

        hits = [r[0] for r in ch.records.db.execute("SELECT id FROM runs ORDER BY created")
                if fnmatch.fnmatchcase(r[0], word)]
        if not hits:
            raise NoSuchRun("no run id matches %s (chaperone ps -a lists the runs recorded here)" % word)
        return hits
    if ch.records.exists(word):
        return [word]  # (a run id: fleet.runs, 30 ms of imports, is not needed)
    from ..fleet.runs import group_run_ids

    group = _group_of(ch, word)
    if group is None:
        return [word]
    ids = group_run_ids(ch, group)
    if _command() == "kill":  # a run that never started has nothing to signal
        ids = [i for i in ids if (ch.records.get(i) is None or ch.records.get(i).state != "failed")]
    return ids


class _GroupHosts:
    """A group's hosts as the source of a host pattern: ``all`` is them;
    ``@name`` and group names come from the inventory (if there is one)."""

    def __init__(self, hosts: List[str], inventory) -> None:
        self.hosts = hosts
        self.inv = inventory

    def host_names(self) -> List[str]:
        return list(self.hosts)

    def group_members(self, name: str):
        return self.inv.group_members(name) if self.inv is not None else None

    def group_names(self) -> List[str]:
        return self.inv.group_names() if self.inv is not None else []

    def label_members(self, name: str):
        return self.inv.label_members(name) if self.inv is not None else None


def _group_pattern(ch, group: str, pattern: str, word: str) -> List[str]:
    from ..errors import NoSuchRun, UsageError
    from ..fleet.nodeset import NodeSetError
    from ..fleet.patterns import select
    from ..fleet.runs import group_run_ids

    if not pattern:
        raise UsageError("%s: give a host pattern after the '/' (e.g. %sh[01-05])" % (word, word))
    by_host: Dict[str, List[str]] = {}
    for rid in group_run_ids(ch, group):
        by_host.setdefault(ch.records.get(rid).host, []).append(rid)
    inv = None
    if "@" in pattern:
        from ..fleet.inventory import load_inventory

        try:
            inv = load_inventory()
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        names = select(pattern, _GroupHosts(list(by_host), inv))
    except NodeSetError as e:
        raise UsageError(str(e)) from None
    ids = [rid for n in names for rid in by_host.get(n, ())]
    if not ids:
        raise NoSuchRun("no run of group %s is on a host of %s" % (group, pattern))
    return ids


# --- logs of several runs -----------------------------------------------------------------------------------


async def logs_many(ch, word: str, streams, follow: bool, lines: Optional[int], out, since: Optional[float] = None,
                    timestamps: bool = False) -> Optional[int]:
    """``chaperone logs GROUP`` (or a pattern): each run's output with each
    line prefixed by its host (one run after the other; with ``-f`` all at
    once, as they come); ``since``: what each wrote since then;
    ``timestamps``: each line then starts with when it was written (what
    ``-f`` follows, when it arrives here).  None when ``word`` is one run
    (the usual ``logs`` then)."""
    if not _is_pattern(word) and (ch.records.exists(word) or _group_of(ch, word) is None):
        return None
    import asyncio

    from ..api import SKIP_OUTPUT
    from ..errors import ChaperoneError
    from ..fleet.limits import default_forks
    from ..fleet.output import LiveOutput
    from ..fleet.runs import follow_runs
    from ..protocol import OutputChunk, StateUpdate, Written
    from .manage import _Printer, tail_of, tail_offsets

    ids = expand_ids(ch, [word])
    if ids == [word]:  # (names no group: the usual logs says what is wrong with it)
        return None
    recs = [ch.record(rid) for rid in ids]
    hosts = [r.host for r in recs]
    names = {r.id: (r.host if hosts.count(r.host) == 1 else r.id) for r in recs}
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for f in set(out.values()):
        f.flush()
    buffered = {}  # (one system call per piece, not per line; whatever PYTHONUNBUFFERED says)
    for f in out.values():
        buffered.setdefault(f.fileno(), open(f.fileno(), "wb", buffering=1 << 16, closefd=False))
    live = LiveOutput(list(names.values()), buffered[out["stdout"].fileno()], buffered[out["stderr"].fileno()],
                      color=color)
    errors: List[int] = []
    offsets: Dict[str, Dict[str, int]] = {}

    def note(name: str, text: str) -> None:  # (on stderr, even when the output goes to stdout)
        live.out.flush()
        sys.stderr.buffer.write(live.prefix(name) + ("chaperone: %s\n" % text).encode("utf-8", "replace"))
        sys.stderr.buffer.flush()

    limit = asyncio.Semaphore(default_forks())
    stampers = {rec.id: _Printer(dict.fromkeys(streams), timestamps, rec.id) for rec in recs}

    async def fetch(rec):
        """Its output so far (all hosts at once; printed in host order)."""
        async with limit:
            got = {}
            if since is not None or timestamps:  # (from its timeline: when each piece was written)
                parts: Dict[str, list] = {s: [] for s in streams}
                ends = {s: 0 for s in streams}
                stamper = stampers[rec.id]
                offs = await tail_offsets(ch, rec.id, streams, lines)
                async for event in ch.logs(rec.id, streams, offsets=offs, since=since):
                    if isinstance(event, Written):
                        stamper.written(event.time)
                    elif isinstance(event, OutputChunk) and event.stream in streams:
                        parts[event.stream].append(stamper.stamped(event.stream, event.data))
                        ends[event.stream] = event.offset + len(event.data)
                    elif isinstance(event, StateUpdate):  # (the end of what it read: -f goes on from there)
                        for stream in streams:
                            ends[stream] = max(ends[stream], event.state.get(stream + "_bytes") or 0)
                return {s: (b"".join(parts[s]), max(ends[s], offs[s])) for s in streams}
            sizes = (await ch.status(rec.id)).model_dump() if lines is not None else {}
            for stream in streams:
                if lines is None:
                    got[stream] = (b"".join([chunk async for chunk in ch.output(rec.id, stream)]), None)
                    continue
                size = sizes[stream + "_bytes"]  # (the last lines only: read from the end, as logs ID does)
                got[stream] = (await tail_of(ch, rec.id, stream, size, lines), size)
            return got

    fetching = {}
    for rec in recs:
        if rec.state != "failed":
            offsets[rec.id] = {s: (0 if s in streams else SKIP_OUTPUT[s]) for s in ("stdout", "stderr")}
            if not (follow and lines is None and since is None and not timestamps):
                fetching[rec.id] = asyncio.ensure_future(fetch(rec))
    try:
        for rec in recs:
            name = names[rec.id]
            if rec.state == "failed":
                note(name, "never started: %s" % (rec.error or ""))
                continue
            if rec.id in fetching:
                try:
                    got = await fetching[rec.id]
                except ChaperoneError as e:
                    note(name, str(e))
                    errors.append(e.exit_code)
                    offsets.pop(rec.id, None)
                    continue
                for stream in streams:
                    data, size = got[stream]
                    if size is not None:
                        offsets[rec.id][stream] = size
                    live.feed(name, data, stream)
            if not follow:
                live.end(name)
            live.out.flush()
            live.err.flush()
    finally:
        for t in fetching.values():
            t.cancel()
        await asyncio.gather(*fetching.values(), return_exceptions=True)
    if follow and offsets:
        by_name = {name: rid for rid, name in names.items()}

        def on_output(name, stream, data):
            if timestamps:
                stamper = stampers[by_name[name]]
                stamper.written(time.time())
                data = stamper.stamped(stream, data)
            live.feed(name, data, stream)
            (live.out if stream == "stdout" else live.err).flush()

        async for r in follow_runs(ch, list(offsets), on_output=on_output, offsets=offsets, names=names):
            live.end(r.name)
            if r.state in ("unreachable", "lost", "failed"):
                note(r.name, "%s: %s" % (r.state, r.reason))
                errors.append(255)
            live.out.flush()
            live.err.flush()
    live.close()
    return max(errors) if errors else 0
