"""Run management, as docker users expect it: ``ps``, ``status``
(``inspect``), ``logs``, ``wait``, ``kill`` (``stop``), ``clean`` (``rm``),
``prune``.  Every command that takes an id takes several, and a unique
prefix of each; ``--json`` prints the one object of a run (docs/cli.md)."""

from __future__ import annotations

import os
import sys

import click

from . import served
from .app import cli, fail, guarded, leave_open, run_async, served_call, ssh_options
from .display import (ago, human_duration, parse_duration, parse_time, print_json, result, short_ago, status_table,
                      table)

def complete_ids(ctx, param, incomplete):
    """Shell completion of run ids: the recorded ones starting with what is
    typed, newest first (never an error: a completion prints nothing)."""
    try:
        import sqlite3

        from ..records import chaperone_home

        db = sqlite3.connect("file:%s?mode=ro" % (chaperone_home() / "runs.db"), uri=True, timeout=1)
        try:
            rows = db.execute("SELECT id FROM runs ORDER BY created DESC")
            return [row[0] for row in rows if row[0].startswith(incomplete)][:500]
        finally:
            db.close()
    except Exception:
        return []


IDS = click.argument("run_ids", nargs=-1, required=True, metavar="ID...", shell_complete=complete_ids)


def formatted(template, infos, status):
    """``--format``: chaperone/cli/template.py, over the runs' JSON fields."""
    from ..models import RunInfo
    from .template import formatted as fill

    return fill(template, infos, tuple(RunInfo.model_fields), status)


def _template(template, as_json, command):
    """``--format``'s template, checked before any work; None for the
    default output (no template, an empty one, or ``table`` alone, as
    docker)."""
    if template is None or template.strip() in ("", "table"):
        return None
    if as_json:
        fail("--format and --json do not go together: --format '{{json .}}' prints each run as JSON "
             "(Try 'chaperone %s --help'.)" % command, 2)
    guarded(lambda: formatted(template, [], _format_status))
    return template.lstrip()


def _format_status(info: dict) -> str:
    """``.Status`` for a run as its record has it (a template's check)."""
    return _status_cell(info, True)


#: docker ps's status= values, in chaperone's states.
DOCKER_STATUS = {"created": ("starting",), "restarting": (), "paused": (), "removing": (),
                 "running": ("running",), "exited": ("done", "error"), "dead": ("lost", "failed", "unknown")}


def run_filter(filters):
    """``ps -f KEY=VALUE`` (docker's): a predicate on a run's JSON object.
    The same key given again widens (or), different keys narrow (and):
    ``status=`` (a state, or docker's running/exited/created/dead),
    ``id=`` (a prefix), ``name=`` (a part of the id), ``host=``,
    ``exited=CODE`` (its exit code)."""
    from ..errors import UsageError
    from ..states import STATES

    wanted: dict = {}
    for text in filters:
        key, sep, value = text.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("status", "state", "id", "name", "host", "exited"):
            raise UsageError("bad filter %r: KEY=VALUE with KEY status, id, name, host or exited "
                             "(Try 'chaperone ps --help'.)" % text)
        if key == "state":
            key = "status"
        if key == "status" and value not in STATES and value not in DOCKER_STATUS:
            raise UsageError("bad filter %r: status is one of %s (or docker's %s) (Try 'chaperone ps --help'.)"
                             % (text, ", ".join(STATES), ", ".join(DOCKER_STATUS)))
        if key == "exited" and not value.lstrip("-").isdigit():
            raise UsageError("bad filter %r: exited= takes an exit code (Try 'chaperone ps --help'.)" % text)
        wanted.setdefault(key, []).append(value)

    def one(info, key, value):
        if key == "status":
            return info["state"] == value or info["state"] in DOCKER_STATUS.get(value, ())
        if key == "id":
            return info["id"].startswith(value)
        if key == "name":
            return value in info["id"]
        if key == "host":
            return info["host"] == value
        return info.get("exit_code") == int(value) and info["state"] in ("done", "error")

    return lambda info: all(any(one(info, k, v) for v in vs) for k, vs in wanted.items())


def _status_cell(info: dict, refreshed: bool) -> str:
    state = info["state"]
    if state == "running":
        text = "running %s" % human_duration(info.get("duration")) if info.get("duration") is not None \
            else "running"
        if not refreshed:
            text = "running (seen %s ago)" % short_ago(parse_time(info.get("last_seen")))
        return text
    if state == "done":
        if info.get("signal"):
            return ("timed out: " if info.get("timed_out") else "") + "killed (%s)" % info["signal"]
        return "exited %s" % info.get("return_code")
    if state in ("error", "failed", "lost", "unknown"):
        return "%s: %s" % (state, info.get("error") or "")
    return state


def _rows(infos, refreshed_ids, short=False):
    now = None
    rows = []
    for info in infos:
        stale = info["state"] == "running" and info["id"] not in refreshed_ids  # (its duration is not known now)
        created = parse_time(info["created"])
        rows.append((info["id"], info["host"], _status_cell(info, info["id"] in refreshed_ids),
                     (short_ago(created, now) + " ago" if created is not None else "-") if short else ago(created, now),
                     "-" if stale else human_duration(info.get("duration")), info["command"]))
    return rows


PS_HEADERS = ("ID", "HOST", "STATUS", "CREATED", "DURATION", "COMMAND")


def ps_table(infos, refreshed_ids, width=None) -> str:
    """``ps``'s table, fitted to the terminal: the command, then the status,
    cut first; on a narrow terminal the times short (``5m ago``) and the
    status cut further."""
    from .display import terminal_width

    width = width or terminal_width()
    text = table(_rows(infos, refreshed_ids), PS_HEADERS, flex=(5, 2), width=width)
    if max((len(line) for line in text.splitlines()), default=0) <= width:
        return text
    return table(_rows(infos, refreshed_ids, short=True), PS_HEADERS, flex=(5, 2), width=width, floor=8)


def about(run_id: str, error) -> str:
    """The line that reports ``error`` about run ``run_id`` (whose message
    may already say which run it is about)."""
    message = str(error)
    if message.startswith("run %s " % run_id) or message.startswith("run %s:" % run_id):
        return "chaperone: %s" % message
    return "chaperone: run %s: %s" % (run_id, message)


async def _current(ch, recs, timeout: float, say=None):
    """Make the unfinished ones of ``recs`` current: local ones from their
    spools here, remote ones from their hosts, all hosts at once, each
    within ``timeout``.  Returns the ids made current, and ``{host: why}``
    for the hosts that could not be reached."""
    from ..states import FINAL_STATES

    local, remote = [], []
    for rec in recs:
        if rec.state in FINAL_STATES:
            continue
        (local if is_local(rec.host) else remote).append(rec)
    fresh = set()
    if local:
        fresh |= _refresh_local(ch, local)
    unreachable = {}
    if remote:
        if say:
            hosts = sorted({r.host for r in remote})
            say("chaperone: checking %d run%s on %s" % (len(remote), "" if len(remote) == 1 else "s",
                                                         ", ".join(hosts)))
        made, reached = await ch._refresh([r.id for r in remote], timeout)
        unreachable = {h: why for h, why in reached.items() if why}
        fresh |= made
        if say:
            for host, why in sorted(unreachable.items()):
                say("chaperone: could not reach %s: %s" % (host, why))
    return fresh, unreachable


def is_local(host: str) -> bool:
    from ..transports.target import is_local as local

    return local(host)


def _refresh_local(ch, recs, records=None, home=None):
    """Local runs: their spools are on this machine; read them here with the
    agent's own code (no process, no connection).  ``records``/``home``:
    without a Chaperone (``ch`` None)."""
    import time

    from ..agent_source import agent_module
    from ..states import start_in_flight

    agent = agent_module()
    records = records if ch is None else ch.records
    home = home if ch is None else ch.home
    fresh = set()
    for rec in recs:
        root = (rec.transport or {}).get("root") or str(home / "spool")
        try:
            state = agent.Run(root, rec.id).require().refresh()
        except agent.AgentError as e:
            if getattr(e, "code", None) == 4 and start_in_flight(rec.state, rec.created, time.time()):
                continue  # (its start may still be on its way)
            if getattr(e, "code", None) == 4 and rec.state in ("starting", "unknown"):
                records.mark(rec.id, "failed", "its start never reached this machine's spool")
            elif getattr(e, "code", None) == 4:
                records.mark(rec.id, "lost", "its spool on local was removed")
            continue
        except (OSError, ValueError):
            continue
        records.update(rec.id, state)
        fresh.add(rec.id)
    return fresh


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="All runs (default: those not over).")
@click.option("-q", "--quiet", is_flag=True, help="Only the ids.")
@click.option("-n", "--last", type=click.IntRange(min=0), metavar="N", help="The N newest runs, over or not.")
@click.option("--host", "hosts", multiple=True, metavar="HOST", help="Only runs on HOST (repeatable).")
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only runs in STATE: running, done, error, lost, failed, starting, unknown (repeatable).")
@click.option("--cached", is_flag=True, help="Show what the records hold; contact no host.")
@click.option("--timeout", default="3s", show_default=True, metavar="DURATION",
              help="How long to wait for hosts while refreshing.")
@click.option("-f", "--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only runs matching (as docker ps): status=, id=, name=, host=, exited=CODE (repeatable).")
@click.option("--format", "template", metavar="TEMPLATE",
              help="Each run through a template, as docker's: '{{.ID}} {{.Status}}', 'table {{.ID}}\\t{{.Host}}', "
                   "'{{json .}}'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of runs).")
@ssh_options
def ps(show_all, quiet, last, hosts, states, cached, timeout, as_json, filters, template, **params):
    """List runs, newest first, with their current state.

    Local runs are read from their spools; runs on hosts are refreshed
    from all hosts at once within --timeout, else shown as of when they
    were last seen ("running (seen 5m ago)")."""
    from ..states import STATES

    bad = [s for s in states if s not in STATES]
    if bad:
        fail("unknown state %r: one of %s (Try 'chaperone ps --help'.)" % (bad[0], ", ".join(STATES)), 2)
    wait = parse_duration(timeout, "--timeout")
    matches = guarded(lambda: run_filter(filters))
    template = _template(template, as_json, "ps")

    def show(infos, fresh, newest_first=False):
        from ..states import FINAL_STATES

        if not newest_first:  # (the records' order is finer than "created", whole seconds)
            infos = sorted(infos, key=lambda i: (parse_time(i["created"]) or 0, i["id"]), reverse=True)
        if hosts:
            infos = [i for i in infos if i["host"] in hosts]
        if states:
            infos = [i for i in infos if i["state"] in states]
        elif not show_all and last is None and not filters:
            infos = [i for i in infos if i["state"] not in FINAL_STATES]
        infos = [i for i in infos if matches(i)]
        if last is not None:
            infos = infos[:max(0, last)]
        fresh = set(fresh) | {i["id"] for i in infos if i["state"] in FINAL_STATES}
        if as_json:
            print_json(infos)
        elif template is not None:
            if infos or template.startswith("table"):
                click.echo(formatted(template, infos, lambda i: _status_cell(i, i["id"] in fresh)))
        elif quiet:
            for info in infos:
                click.echo(info["id"])
        else:
            click.echo(ps_table(infos, fresh))
        return 0

    server = served.client(params, "cached")
    if server is not None:  # its view is current: pushed by the agents
        sys.exit(served_call(lambda: show(*(lambda v: (v, {i["id"] for i in v if not i["silent"]}))(
            server.runs()))))

    # One query: without -a/-n/--state, only the runs not over are read (a
    # final record never changes, and is not shown).  Local runs are made
    # current from their spools here; only runs on hosts need asyncio and
    # the library (all hosts at once, within --timeout).
    from ..records import Records, chaperone_home
    from ..states import FINAL_STATES

    def direct():
        home = chaperone_home()
        records = Records(home / "runs.db")
        try:
            return listed(records, home)
        finally:
            leave_open(records)

    def listed(records, home):
        recs = records.select(final=bool(show_all or last is not None or states or filters), hosts=hosts)
        fresh = set()
        if not cached:
            local = [r for r in recs if r.state not in FINAL_STATES and is_local(r.host)]
            remote = [r for r in recs if r.state not in FINAL_STATES and not is_local(r.host)]
            if local:
                fresh |= _refresh_local(None, local, records, home)
            if remote:
                async def go(ch):
                    made, unreachable = await _current(ch, remote, wait)
                    for host, why in sorted(unreachable.items()):  # (its rows say "seen ... ago": say why)
                        click.echo("chaperone: could not reach %s (%s): its runs are shown as last seen"
                                   % (host, why), err=True)
                    return made

                fresh |= run_async(params, go)
            if local or remote:
                now = {r.id: r for r in records.select(ids=[r.id for r in local + remote])}
                recs = [now.get(r.id, r) for r in recs]
        return show([r.info() for r in sorted(recs, key=lambda r: r.created, reverse=True)], fresh, True)

    sys.exit(guarded(direct))


def _records(ch, run_ids, errors):
    """The records of ``run_ids`` (each an id or a unique prefix); a line on
    stderr for each that is not a run."""
    from ..errors import ChaperoneError
    from .fleet import expand_ids  # group ids and patterns: chaperone/cli/fleet.py

    out = []
    for run_id in expand_ids(ch, run_ids):
        try:
            out.append(ch.record(run_id))
        except ChaperoneError as e:
            click.echo("chaperone: %s" % e, err=True)
            errors.append(e.exit_code)
    return out


def _ids_or_errors(run_ids, errors):
    """Run ids from ids and unique prefixes (this machine's records); a
    line on stderr for each that is not a run."""
    from ..errors import ChaperoneError

    out = []
    for run_id in run_ids:
        try:
            out.extend(served.resolve([run_id]))
        except ChaperoneError as e:
            click.echo("chaperone: %s" % e, err=True)
            errors.append(e.exit_code)
    return out


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[ID...]", shell_complete=complete_ids)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one run; a list for several or none).")
@click.option("-f", "--format", "template", metavar="TEMPLATE",
              help="Each run through a template, as docker inspect -f: '{{.State}}', '{{.ExitCode}}'.")
@click.option("--timeout", default="20s", show_default=True, metavar="DURATION",
              help="How long to wait for each host.")
@ssh_options
def status(run_ids, as_json, template, timeout, **params):
    """Show runs' states, re-read from their spools now (no ID: every run
    not over, host by host, saying which hosts could not be reached)."""
    wait = parse_duration(timeout, "--timeout")
    template = _template(template, as_json, "status")

    def show(infos, errors, stale=None):
        if template is not None:
            if infos or template.startswith("table"):
                click.echo(formatted(template, infos,
                                     lambda i: _status_cell(i, i["id"] not in (stale or ()))))
        elif as_json:
            print_json(infos[0] if len(run_ids) == 1 and len(infos) == 1 else infos)
        elif infos:
            click.echo(status_table(infos, stale))
        return max(errors) if errors else 0

    server = served.client(params)
    if server is not None and run_ids:
        def via():
            errors, infos = [], []
            for run_id in _ids_or_errors(run_ids, errors):
                infos.append(server.run(run_id))
            return show(infos, errors)

        sys.exit(served_call(via))

    async def go(ch):
        from ..errors import ChaperoneError, ConnectionLost, StartFailed

        errors = []
        if not run_ids:  # (every run not over as recorded, re-read now: some may have ended since)
            recs = [r for r in ch.records.all() if not r.final]
            recs.reverse()
            fresh, unreachable = await _current(ch, recs, wait, say=lambda line: click.echo(line, err=True))
            infos = [ch.records.get(r.id).info() for r in recs]
            stale = {i["id"] for i in infos if i["id"] not in fresh}  # (as last seen: its host was not reached)
            if template is not None:
                if infos or template.startswith("table"):
                    click.echo(formatted(template, infos,
                                         lambda i: _status_cell(i, i["id"] not in stale)))
            elif as_json:
                print_json(infos)
            elif infos:
                click.echo(status_table(infos, stale))
            return 1 if unreachable else 0
        import asyncio

        infos, stale = [], set()
        for rec in _records(ch, run_ids, errors):
            try:
                await asyncio.wait_for(ch.status(rec.id), wait)
            except StartFailed:
                pass
            except asyncio.TimeoutError:
                click.echo("chaperone: run %s: %s did not answer within %s; shown as last seen"
                           % (rec.id, rec.host, timeout), err=True)
                errors.append(1)  # (docs/cli.md: a host that could not be reached)
                stale.add(rec.id)
            except ChaperoneError as e:
                click.echo(about(rec.id, e), err=True)
                unreachable = getattr(e, "transient", False) or isinstance(e, ConnectionLost)
                errors.append(1 if unreachable else e.exit_code)
                stale.add(rec.id)
            infos.append(ch.records.get(rec.id).info() if ch.records.get(rec.id) else rec.info())
        return show(infos, errors, stale)

    sys.exit(run_async(params, go))


async def tail_of(ch, run_id: str, stream: str, size: int, lines: int) -> bytes:
    """The last ``lines`` lines of the first ``size`` bytes of a run's
    stream, read from the end (more and more of it, only as needed)."""
    start = max(0, size - max(64 << 10, lines * 512))
    while True:
        data = await ch.read(run_id, stream, start, size - start)
        tail_bytes = _tail(data, lines)
        if start == 0 or len(tail_bytes) < len(data) - 1:
            return tail_bytes
        start = max(0, start - (size - start))


async def tail_offsets(ch, run_id: str, streams, lines: "Optional[int]", ends: "Optional[dict]" = None) -> dict:
    """Where each stream's last ``lines`` lines start (``--tail``); 0 for
    each without ``lines``.  ``ends``: filled with each stream's size then
    (the last lines are those of that moment: what a running program
    writes after is not among them)."""
    offsets = {s: 0 for s in streams}
    if lines is not None:
        state = (await ch.status(run_id)).model_dump()
        for stream in streams:
            size = state[stream + "_bytes"]
            offsets[stream] = size - len(await tail_of(ch, run_id, stream, size, lines))
            if ends is not None:
                ends[stream] = size
    return offsets


def _tail(data: bytes, n: int) -> bytes:
    """The last ``n`` lines of ``data`` (a last line without a newline counts)."""
    if n <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    at = end
    for _ in range(n):
        at = data.rfind(b"\n", 0, at)
        if at < 0:
            return data
    return data[at + 1:]


def _since(text: str, option: str = "--since") -> float:
    """``--since``: seconds since the epoch from a duration back from now
    (``10m``, ``90s``), a time (``2026-11-24T21:00:00Z``; the local time zone
    without an offset, as docker), or seconds since the epoch."""
    import datetime
    import time

    from ..errors import UsageError

    try:
        t = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        pass
    else:
        return t.timestamp()  # (naive: local time)
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value >= 0 and value == value:  # (a bare number is a time, as docker takes it: 1732482000; 0: all)
            return value
    try:
        return time.time() - parse_duration(text, option)
    except UsageError:
        raise UsageError("invalid %s %r: a duration back from now (10m, 2h), a time "
                         "(2026-11-24T21:00:00Z), or seconds since the epoch (Try 'chaperone logs --help'.)"
                         % (option, text)) from None


def rfc3339(t: float) -> bytes:
    """A --timestamps prefix, as docker's: ``2026-11-24T21:00:00.123456000Z ``."""
    import datetime

    d = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return ("%s.%06d000Z " % (d.strftime("%Y-%m-%dT%H:%M:%S"), d.microsecond)).encode()


class _Printer:
    """Writes each stream's chunks to its file as they come; with
    ``timestamps``, each line starts with when it was written (the time
    of the chunk its first byte came in).  The bytes are the run's, only
    prefixes are added."""

    def __init__(self, out: dict, timestamps: bool, run_id: str):
        self.out = out
        self.timestamps = timestamps
        self.run_id = run_id
        self.time = None
        self.unknown_said = False
        self.at_start = {s: True for s in out}

    def written(self, t) -> None:
        self.time = t
        if t is None and self.timestamps and not self.unknown_said:
            self.unknown_said = True
            click.echo("chaperone: run %s has no timeline (an older agent started it): its output comes "
                       "without timestamps, stdout then stderr" % self.run_id, err=True)

    def chunk(self, stream: str, data: bytes) -> None:
        f = self.out[stream]
        f.write(self.stamped(stream, data))
        f.flush()

    def stamped(self, stream: str, data: bytes) -> bytes:
        """``data`` of ``stream`` with its prefixes (none without timestamps)."""
        if not self.timestamps or self.time is None:
            self.at_start[stream] = data.endswith(b"\n") if data else self.at_start[stream]
            return data
        prefix = rfc3339(self.time)
        lines = data.split(b"\n")
        parts = []
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if line or not last:
                if self.at_start[stream]:
                    parts.append(prefix)
                parts.append(line)
                if not last:
                    parts.append(b"\n")
            self.at_start[stream] = not last or (not line and self.at_start[stream])
        return b"".join(parts)


def _same_file(a, b) -> bool:
    """Whether two open files are one (``2>&1``, one terminal)."""
    try:
        x, y = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return True
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


@cli.command()
@click.argument("run_id", metavar="ID", shell_complete=complete_ids)
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the run ends.")
@click.option("--stdout", "only_stdout", is_flag=True, help="Only stdout.")
@click.option("--stderr", "only_stderr", is_flag=True, help="Only stderr.")
@click.option("-n", "--tail", "tail", metavar="N", help="Only the last N lines of each stream ('all': everything).")
@click.option("--since", "since", metavar="DURATION|TIME",
              help="Only output written since then: 10m (back from now), 2026-11-24T21:00:00Z, or epoch seconds.")
@click.option("--until", "until", metavar="DURATION|TIME",
              help="Only output written before then (as --since; with -f: follow until then).")
@click.option("-t", "--timestamps", is_flag=True, help="Start each line with when it was written (RFC 3339, UTC).")
@ssh_options
def logs(run_id, follow, only_stdout, only_stderr, tail, since, until, timestamps, **params):
    """Print a run's output: the exact bytes it wrote, in the order it
    wrote them.  By default both streams, interleaved as written, its
    stdout to stdout and its stderr to stderr; --stdout or --stderr: that
    stream alone, on stdout."""
    if only_stdout and only_stderr:
        only_stdout = only_stderr = False
    streams = ["stdout"] if only_stdout else ["stderr"] if only_stderr else ["stdout", "stderr"]
    lines = None
    if tail not in (None, "all"):
        try:
            lines = int(tail)
            if lines < 0:
                raise ValueError(tail)
        except ValueError:
            fail("invalid --tail %r: a number of lines (0 or more), or all (Try 'chaperone logs --help'.)" % tail, 2)
    from ..errors import UsageError

    try:
        since_t = _since(since) if since is not None else None
        until_t = _since(until, "--until") if until is not None else None
    except UsageError as e:
        fail(str(e), 2)
    if until_t is not None and follow:
        import time

        follow = until_t > time.time()  # (an --until already past: nothing more to follow)
    # Both streams: each to its own.  One asked for: to stdout, to be piped.
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer if len(streams) == 2 else sys.stdout.buffer}

    # Plain: each stream as it is, in turn, when the order they were
    # written in cannot show (one stream, or the two to different files);
    # the server's mirror (each stream's bytes, not when they were written)
    # serves that, and without it the fast path below.
    plain = lines is None and since is None and until is None and not timestamps and \
        (len(streams) == 1 or not _same_file(out["stdout"], out["stderr"]))
    server = served.client(params) if plain else None
    if server is not None:
        def via():
            run_id_ = served.resolve([run_id])[0]
            if follow:
                served.follow_both(server, run_id_, streams, out=out)
            else:
                for stream in streams:
                    data, _ = server.output(run_id_, stream)
                    out[stream].write(data)
                    out[stream].flush()
            return 0

        sys.exit(served_call(via))

    async def go(ch):
        from ..protocol import OutputChunk, Written
        from .fleet import logs_many  # a group, or a pattern: lines prefixed with their hosts

        if until_t is None:
            many = await logs_many(ch, run_id, streams, follow, lines, out, since=since_t, timestamps=timestamps)
            if many is not None:
                return many
        rec = ch.record(run_id)
        ends: dict = {}  # (-n N without -f: the last N lines as of now, not what is written meanwhile)
        offsets = await tail_offsets(ch, rec.id, streams, lines, None if follow else ends)

        if plain and not follow:
            # (from the SSH client's pipe straight to the file: as fast as
            # ssh HOST cat FILE > file; one call to the host)
            for f in out.values():
                f.flush()
            if len(streams) == 2:
                await ch.output_both_to(rec.id, {s: out[s].fileno() for s in streams})
            else:
                await ch.output_to(rec.id, streams[0], out[streams[0]].fileno())
            return 0

        from .display import OutageNotice

        on_reconnect = OutageNotice()
        if not follow:
            def on_reconnect(error, delay):  # (logs without -f: what is there now, or one line and 255)
                raise error
            on_reconnect.recovered = lambda: None
        printer = _Printer(out, timestamps, rec.id)

        async def printed():
            events = ch.logs(rec.id, streams, offsets=offsets, since=since_t, follow=follow,
                             on_reconnect=on_reconnect)
            try:
                async for event in events:
                    on_reconnect.recovered()
                    if isinstance(event, Written):
                        if until_t is not None and event.time >= until_t:
                            return  # (what follows was written later)
                        printer.written(event.time)
                    elif isinstance(event, OutputChunk) and event.stream in streams:
                        data = event.data
                        if event.stream in ends:
                            data = data[:max(0, ends[event.stream] - event.offset)]
                        if data:
                            printer.chunk(event.stream, data)
            finally:
                await events.aclose()  # (its agent call ended now, not at the loop's shutdown)

        if until_t is None or not follow:
            await printed()
        else:  # (-f --until: following until then, not past it)
            import asyncio
            import time

            try:
                await asyncio.wait_for(printed(), max(0.0, until_t - time.time()))
            except asyncio.TimeoutError:
                pass
        return 0

    sys.exit(run_async(params, go))


@cli.command()
@IDS
@click.option("--timeout", metavar="DURATION", help="Give up after this long (exit 124).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one run; a list for several).")
@ssh_options
def wait(run_ids, timeout, as_json, **params):
    """Wait for runs to end; exit with the exit status of the run (of
    several: the largest)."""
    limit = parse_duration(timeout, "--timeout") if timeout else None
    after = ("%gs" % limit) if limit is not None and timeout.strip()[-1:].isdigit() else timeout

    def not_over(run_id, state):
        """The line for a run not over when --timeout came."""
        if state == "running":
            return "chaperone: run %s: still running after %s" % (run_id, after)
        return "chaperone: run %s: not over after %s (%s: its host has not said it started)" % (
            run_id, after, state)

    said = set()  # (runs whose error was said already)

    def report(ids, infos, codes, errors):
        for run_id, info, code in zip(ids, infos, codes):
            if not as_json and len(ids) > 1:
                click.echo("%s: %s" % (run_id, result(info) if result(info) != "-" else info["state"]))
            elif not as_json and info["state"] not in ("done", "running") and run_id not in said:
                click.echo("chaperone: run %s: %s" % (run_id, result(info)), err=True)
        if as_json:
            print_json(infos[0] if len(run_ids) == 1 and len(infos) == 1 else infos)
        return max(list(codes) + errors) if (codes or errors) else 0

    server = served.client(params)
    if server is not None:
        def via():
            errors = []
            ids = _ids_or_errors(run_ids, errors)
            infos = [server.wait(run_id, timeout=limit) for run_id in ids]
            codes = []
            for run_id, info in zip(ids, infos):
                if info["state"] in ("starting", "running", "unknown"):
                    click.echo(not_over(run_id, info["state"]), err=True)
                    said.add(run_id)
                    codes.append(124)
                else:
                    codes.append(info["exit_code"])
            return report(ids, infos, codes, errors)

        sys.exit(served_call(via))

    async def go(ch):
        import asyncio

        from ..errors import ChaperoneError

        errors, infos, codes = [], [], []
        recs = _records(ch, run_ids, errors)

        from .display import OutageNotice

        on_reconnect = OutageNotice()  # (one line per outage, not one per attempt: as logs -f)

        async def one(rec):
            try:
                st = await ch.wait(rec.id, timeout=limit, on_reconnect=on_reconnect)
                return st.exit_code
            except asyncio.TimeoutError:
                now = ch.records.get(rec.id)
                click.echo(not_over(rec.id, now.state if now is not None else rec.state), err=True)
                said.add(rec.id)
                return 124
            except ChaperoneError as e:
                click.echo(about(rec.id, e), err=True)
                said.add(rec.id)
                return e.exit_code

        codes = await asyncio.gather(*(one(r) for r in recs))
        for rec in recs:
            infos.append(ch.records.get(rec.id).info() if ch.records.get(rec.id) else rec.info())
        return report([r.id for r in recs], infos, codes, errors)

    sys.exit(run_async(params, go))


@cli.command()
@IDS
@click.option("-s", "--signal", "sig", default="TERM", show_default=True, help="Signal name or number.")
@click.option("--grace", metavar="DURATION", help="Then SIGKILL after this long if still running.")
@click.option("--wait", "wait_end", is_flag=True,
              help="Return once each run has ended (as docker stop: stop is kill --grace 10 --wait).")
@ssh_options
def kill(run_ids, sig, grace, wait_end, **params):
    """Send a signal to runs' whole process trees (each process once); a
    run that ended: to what it left running."""
    from ..api import check_signal

    name = check_signal(sig)
    grace_s = parse_duration(grace, "--grace") if grace else None
    if grace_s is not None and grace_s == float("inf"):
        fail("invalid --grace inf: give a finite duration (or no --grace)", 2)

    server = served.client(params)
    if server is not None:
        def via():
            from ..errors import ChaperoneError

            errors = []
            for run_id in _ids_or_errors(run_ids, errors):
                try:
                    view = server.signal(run_id, name, grace_s)
                except ChaperoneError as e:
                    click.echo(about(run_id, e), err=True)
                    errors.append(e.exit_code)
                    continue
                click.echo("sent %s to run %s (pid %s)" % (name, run_id, view.get("pid")))
                if wait_end:
                    server.wait(run_id, timeout=(grace_s or 0) + 30)
            return max(errors) if errors else 0

        sys.exit(served_call(via))

    async def go(ch):
        from ..errors import ChaperoneError

        errors = []
        for rec in _records(ch, run_ids, errors):
            try:
                st = await ch.signal(rec.id, name, grace_s)
            except ChaperoneError as e:
                click.echo(about(rec.id, e), err=True)
                errors.append(e.exit_code)
                continue
            click.echo("sent %s to run %s (pid %s)" % (name, rec.id, st.pid))
            if wait_end:
                import asyncio

                try:  # (the grace, then SIGKILL: it ends; 30 s more for the host to say so)
                    await ch.wait(rec.id, timeout=(grace_s or 0) + 30)
                except asyncio.TimeoutError:
                    click.echo("chaperone: run %s: still running" % rec.id, err=True)
                    errors.append(1)
                except ChaperoneError as e:
                    click.echo(about(rec.id, e), err=True)
                    errors.append(e.exit_code)
        return max(errors) if errors else 0

    sys.exit(run_async(params, go))


@cli.command()
@IDS
@click.option("-f", "--force", is_flag=True, help="Kill a run that is still running first.")
@ssh_options
def clean(run_ids, force, **params):
    """Remove runs' spools on their hosts and their records (a run that
    never started: only its record)."""
    server = served.client(params)
    if server is not None:
        def via():
            from ..errors import ChaperoneError

            errors = []
            for run_id in _ids_or_errors(run_ids, errors):
                try:
                    server.clean(run_id, force)
                except ChaperoneError as e:
                    click.echo(about(run_id, e), err=True)
                    errors.append(e.exit_code)
                    continue
                click.echo("cleaned %s" % run_id)
            return max(errors) if errors else 0

        sys.exit(served_call(via))

    async def go(ch):
        from ..errors import ChaperoneError, ConnectFailed

        errors = []
        for rec in _records(ch, run_ids, errors):
            try:
                await ch.clean(rec.id, force)
            except ConnectFailed as e:
                if not force:
                    click.echo(about(rec.id, "%s; clean -f forgets it here, its spool there stays" % e), err=True)
                    errors.append(e.exit_code)
                    continue
                ch.forget(rec.id)  # (docker rm -f: a host gone for good must not keep its runs here for ever)
                click.echo(about(rec.id, "%s; forgotten here, its spool on %s stays" % (e, rec.host)), err=True)
                click.echo("forgot %s" % rec.id)
                continue
            except ChaperoneError as e:
                click.echo(about(rec.id, e), err=True)
                errors.append(e.exit_code)
                continue
            click.echo("cleaned %s" % rec.id)
        return max(errors) if errors else 0

    sys.exit(run_async(params, go))


@cli.command()
@click.option("--older-than", "older", default="0s", show_default=True, metavar="DURATION",
              help="Only runs that ended at least this long ago (e.g. 24h, 7d).")
@click.option("--host", "hosts", multiple=True, metavar="HOST", help="Only runs on HOST (repeatable).")
@click.option("-n", "--dry-run", is_flag=True, help="Only list what would be removed.")
@ssh_options
def prune(older, hosts, dry_run, **params):
    """Remove every run that is over (spool and record), as docker prune."""
    import time

    age = parse_duration(older, "--older-than")

    async def go(ch):
        from ..errors import ChaperoneError
        from ..states import FINAL_STATES

        now = time.time()
        chosen = []
        for rec in ch.records.all():
            if rec.state not in FINAL_STATES or (hosts and rec.host not in hosts):
                continue
            info = rec.info()
            ended = parse_time(info.get("end_time")) or rec.seen or rec.created
            if now - ended >= age:
                chosen.append(rec)
        removed, errors = 0, []
        for rec in chosen:
            if dry_run:
                click.echo(rec.id)
                continue
            try:
                await ch.clean(rec.id)
                removed += 1
            except ChaperoneError as e:
                click.echo(about(rec.id, e), err=True)
                errors.append(e.exit_code)
        if not dry_run:
            click.echo("removed %d run%s" % (removed, "" if removed == 1 else "s"))
        return max(errors) if errors else 0

    sys.exit(run_async(params, go))


@cli.command()
@click.argument("run_id", metavar="ID", shell_complete=complete_ids)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of processes).")
@ssh_options
def top(run_id, as_json, **params):
    """The run's processes on its host now, as docker top: the program,
    its children, and those that left its process group (a run that
    ended: what it left running)."""
    async def go(ch):
        rec = ch.record(run_id)
        procs = await ch.processes(rec.id)
        if as_json:
            print_json([p.model_dump() for p in procs])
            return 0
        if not procs:
            state = (await ch.status(rec.id)).state
            click.echo("chaperone: run %s has no process running on %s (%s)" % (rec.id, rec.host, state), err=True)
            return 0
        rows = [(str(p.pid), str(p.ppid), p.state, _clock(p.cpu), _size(p.rss), human_duration(p.elapsed),
                 " ".join(p.argv)) for p in procs]
        click.echo(table(rows, ("PID", "PPID", "S", "TIME", "RSS", "ELAPSED", "COMMAND")))
        return 0

    sys.exit(run_async(params, go))


def _clock(seconds: float) -> str:
    """CPU time as ps shows it: M:SS (H:MM:SS from an hour)."""
    s = int(seconds)
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60) if s >= 3600 else "%d:%02d" % (s // 60, s % 60)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0
    return str(n)
