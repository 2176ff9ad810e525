"""``chaperone run``: as dependable as ``ssh`` in a person's hands.

How the command line reads is in :mod:`chaperone.cli.options` (ssh's
rule).  A foreground run streams the program's output live, and survives a
dropped connection (it says so in one line, reconnects, and resumes at the
byte it had reached).  Ctrl-C sends SIGINT to the program (its whole tree,
each process once) and keeps streaming; a second Ctrl-C detaches.
"""

from __future__ import annotations

import os
import stat
import sys

import click

from .app import add_options, cli, fail, run_async, served_call
from .options import run_env, ssh_settings
from .display import is_terminal, parse_duration, run_limits, say_end
from ..transports.target import is_local
from .options import RUN, SSH, arity, split_run


class SSHStyleCommand(click.Command):
    """A command whose arguments read as ssh's: options, HOST, options,
    then the command (see :func:`chaperone.cli.options.split_run`)."""

    def parse_args(self, ctx, args):
        if any(a in ("-h", "--help") for a in args[:1]) or args == []:
            return super().parse_args(ctx, args)
        opts, host, words, exact = split_run(list(args), RUN + SSH)
        takes = arity(RUN + SSH)
        for opt in opts:
            # (click reads -host, or -dhost, as a cluster with -h in it: the help, exit 0, nothing run)
            if len(opt) > 2 and opt[0] == "-" and opt[1] != "-" and not takes.get(opt[:2]) and "h" in opt[1:]:
                raise click.UsageError("No such option: %s" % opt, ctx)
        ctx.meta["chaperone.command"] = (words, exact)
        return super().parse_args(ctx, opts + ([host] if host is not None else []))


#: ``run HOST`` without a command: the user's login shell there, as ``ssh HOST``.
LOGIN_SHELL = 'exec "${SHELL:-/bin/sh}" -l'


def _stdin_fd(params: dict):
    """The file descriptor the program's input comes from, or None
    (/dev/null).  ``-n``: none; ``--stdin FILE`` (``-``: this process's
    stdin, a terminal too); else this process's stdin when it is a pipe, a
    socket or a file (as ssh forwards it), not a terminal nor /dev/null,
    and not with ``-d``."""
    from ..errors import UsageError

    source = params.get("stdin_file")
    if params.get("no_stdin") or (source is None and params.get("detach")):
        return None
    if source is None:
        try:
            mode = os.fstat(0).st_mode
        except OSError:
            return None
        if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            return None  # a terminal or /dev/null: nothing piped in
        return 0
    if source == "-":
        return 0
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as e:
        raise UsageError("cannot read --stdin %s: %s" % (source, e.strerror)) from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError("cannot read --stdin %s: it is a directory (give a file, or - for this input)" % source)
    return fd


def _typing(params: dict) -> bool:
    """This process's stdin is a terminal the program does not get (no
    ``-n``, ``-d`` nor ``--stdin``)."""
    if params.get("no_stdin") or params.get("detach") or params.get("stdin_file") is not None:
        return False
    return is_terminal(0)


def _tty(params: dict) -> bool:
    """Whether the program runs on a terminal on the host, as ssh decides:
    ``-t`` when this process's stdin is a terminal (or with ``-d``: it has
    one there, nobody attached), ``-tt`` always, ``-T`` never (the default)."""
    count = params.get("tty") or 0
    if params.get("no_tty") or not count:
        return False
    if count == 1 and not params.get("detach") and not is_terminal(0):
        if not params.get("quiet"):
            click.echo("chaperone: Pseudo-terminal will not be allocated because stdin is not a terminal "
                       "(-tt forces one).", err=True)
        return False
    return True


def _stdin_source(params: dict):
    """What the program gets on stdin (see :func:`_stdin_fd`): None
    (/dev/null), bytes (all of it, small: sent with the start), or a stream
    (sent as it comes, while the program runs; see chaperone.feed)."""
    from ..feed import INLINE

    fd = _stdin_fd(params)
    if fd is None:
        return None
    head, ended = _read_ready(fd, INLINE)
    if ended:
        return head
    return _stream(fd, head)


def _read_ready(fd: int, limit: int):
    """What ``fd`` holds now, up to ``limit`` bytes (and one more), without
    waiting: ``(bytes, whether that is all of it)``.  (``echo hi | ...``:
    all of it, so it goes with the start.)"""
    import select

    mode = os.fstat(fd).st_mode
    regular = stat.S_ISREG(mode)
    if not (regular or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return b"", False  # a terminal, a device: as it comes
    parts, size = [], 0
    while size <= limit:
        if not regular and not select.select([fd], [], [], 0)[0]:
            return b"".join(parts), False
        data = os.read(fd, min(1 << 16, limit + 1 - size))
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False


async def _stream(fd: int, head: bytes):
    from ..feed import read_fd

    if head:
        yield head
    async for data in read_fd(fd):
        yield data


@cli.command(cls=SSHStyleCommand, context_settings={"ignore_unknown_options": False})
@click.argument("host", required=False)
@add_options(RUN + SSH)
def run(host, **params):
    """Run a command on HOST (`local` for this machine), streaming its output.

    \b
      chaperone run gpu1 nvidia-smi -l 1         words after HOST: the command
      chaperone run gpu1 'echo $HOME | wc -c'    one string: a shell command line
      chaperone run gpu1 -- echo '$HOME'         after --: the exact argv
      chaperone run -d --id train gpu1 -- ./job  detached: prints the id
      chaperone run -H 'gpu[1-8]' -- nvidia-smi  many hosts (docs/hosts.md)
      chaperone run -t gpu1 htop                 a terminal there (as ssh -t); ~. detaches
      chaperone run gpu1                         a login shell there that survives a dropped
                                                 connection (chaperone attach ID comes back)

    As with ssh, options go before HOST or right after it; without --, the
    command's words are joined and run by the login shell; after --, they
    are the program's exact argv.  Ctrl-C sends SIGINT to the program; a
    second Ctrl-C detaches (re-attach with `chaperone logs -f ID`).
    """
    ctx = click.get_current_context()
    words, exact = ctx.meta.get("chaperone.command", ([], False))
    if params.get("remove") and params.get("detach"):
        fail("--rm goes with a run in the foreground: a detached run is removed once it has ended with "
             "chaperone rm ID (or chaperone prune) (Try 'chaperone run --help'.)", 2)
    if params.get("hosts") or params.get("hostfiles"):
        if params.get("tty") and not params.get("no_tty"):
            fail("-t goes with one host: many hosts have no terminal to share (Try 'chaperone run --help'.)", 2)
        from .fleet import run_many  # many hosts: chaperone/cli/fleet.py

        sys.exit(run_many(words, exact, params))
    from .fleet import one_host_only
    one_host_only(params)  # (-b, --pick ... without -H: an error)
    tty = _tty(params)
    if host is None:
        fail("run needs a HOST (local for this machine) and a command (Try 'chaperone run --help'.)", 2)
    if words:
        command = list(words) if exact else " ".join(words)
    else:
        # As `ssh HOST`: the login shell, on a terminal when this one is one
        # (reading commands from stdin otherwise); a run like any other, so
        # it survives a dropped connection (~. detaches, attach comes back).
        if params.get("detach") and not tty:
            fail("no command given: chaperone run -d %s CMD... (a shell that runs detached needs a terminal: "
                 "chaperone run -d -t %s, then chaperone attach ID) (Try 'chaperone run --help'.)"
                 % (host, host), 2)
        if not tty and not params.get("no_tty") and not params.get("detach") and _typing(params):
            tty = True
        command = LOGIN_SHELL
    cwd = params.get("cwd")
    if is_local(host):  # (here: the current directory, as for any local command; on a host: the home directory)
        cwd = os.path.join(os.getcwd(), os.path.expanduser(cwd)) if cwd else os.getcwd()
    timeout, grace = run_limits(params.get("timeout"), params.get("kill_grace"))

    from . import served

    attached = tty and _typing(params)  # (this terminal becomes the program's)
    if attached and params.get("as_json"):
        fail("-t and --json do not go together: a terminal shows the program's screen (-d -t --json starts "
             "it with a terminal and prints the run) (Try 'chaperone run --help'.)", 2)
    stdin = None if attached else _stdin_source(params)
    server = served.client(params) if stdin is None and not tty else None  # (the server takes no input)
    if server is not None:
        sys.exit(served_call(lambda: served.run(server, host, command, params, run_env(params), cwd, timeout)))

    async def go(ch):
        from ..errors import ChaperoneError

        ran = []
        try:
            return await started(ch, ran)
        except ChaperoneError:
            # --json: the run's object at the end, as documented, also for a
            # start that failed (its record says failed and why)
            rec = ch.records.get(ran[0]) if ran else None
            if rec is not None and params.get("as_json"):
                from .display import print_json

                print_json(rec.info())
            if rec is not None and params.get("remove") and rec.state == "failed":
                ch.forget(rec.id)  # (--rm: a start that never happened leaves nothing, as with -H)
            raise

    async def started(ch, ran):
        from ..api import new_run_id

        settings = ssh_settings(params)
        target = ch.target(host, **settings)
        if not target.local:
            ch.preconnect(target)
        if params.get("run_id") == "":
            fail("invalid run id '': use 1-128 letters, digits, '.', '_' or '-' (or no --id: a new id)", 2)
        run_id = params.get("run_id") or new_run_id()
        if params.get("remove") and ch.records.exists(run_id):
            fail("--rm with the id of a run already recorded (%s): it would remove a run this command did not "
                 "start; choose another id (Try 'chaperone run --help'.)" % run_id, 2)
        ran.append(run_id)
        kw = dict(id=run_id, cwd=cwd, env=run_env(params), timeout=timeout, stdin=stdin,
                  config={"kill_grace": grace} if grace is not None else None, tty=bool(tty) or None)
        if params.get("detach"):
            r = await ch.start(target, command, **kw)
            if params.get("as_json"):
                from .display import print_json

                print_json(r.info().model_dump())
            else:
                click.echo(r.id)
            if r.state is not None and r.state.state == "error":
                click.echo("chaperone: %s" % r.state.error, err=True)
                return r.state.exit_code
            await r.stdin_sent()  # (-d --stdin FILE: it is all on the host before this returns)
            return 0
        if not params.get("quiet") and not params.get("as_json") and sys.stderr.isatty():
            # (on a terminal only: piped, stderr is exactly the program's)
            hint = ""
            if attached:
                hint = " (a terminal there: ~. detaches)"
            elif stdin is None and _typing(params):  # (top, a REPL ... would meet /dev/null in silence)
                from .fastrun import NO_TERMINAL

                hint = NO_TERMINAL
            click.echo("chaperone: run %s on %s%s" % (run_id, target.name, hint), err=True)
        if attached:
            code = await _attached(ch, target, command, kw, params)
        else:
            code = await _foreground(ch, target, command, kw, params)
        if params.get("remove"):
            await _remove(ch, run_id)
        return code

    sys.exit(run_async(params, go))


async def _remove(ch, run_id) -> None:
    """``--rm``: the run removed, once it has ended (a run detached from,
    still running, stays: it is said how to remove it later)."""
    from ..states import FINAL_STATES

    rec = ch.records.get(run_id)
    if rec is None:
        return
    if rec.state not in FINAL_STATES:
        click.echo("chaperone: run %s goes on, so it is kept (--rm): chaperone rm %s once it has ended"
                   % (run_id, run_id), err=True)
        return
    from ..errors import ChaperoneError

    try:
        await ch.clean(run_id)
    except ChaperoneError as e:  # (the run's result stands; only its removal failed)
        click.echo("chaperone: run %s is kept (--rm): %s" % (run_id, e), err=True)


async def _foreground(ch, target, command, kw, params) -> int:
    import asyncio
    import signal

    from ..states import exit_code_for
    from ..protocol import OutputChunk, StateUpdate

    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    as_json, quiet = params.get("as_json"), params.get("quiet")
    state = {}
    interrupts = []
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    run_id = kw["id"]

    def on_sigint():
        interrupts.append(1)
        if not state and len(interrupts) == 1:
            # Not started yet (still connecting, say): as ssh, Ctrl-C gives
            # up; there is no program to send SIGINT to.
            task.cancel()
        elif len(interrupts) == 1:
            click.echo("\nchaperone: sending SIGINT to run %s (Ctrl-C again to detach)" % run_id, err=True)
            loop.create_task(_signal_quietly(ch, run_id, "SIGINT"))
        else:
            task.cancel()

    from .display import OutageNotice

    on_reconnect = OutageNotice(quiet)
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    last = [b"", 1]  # (the output's last bytes, and where they went)
    try:
        async for event in ch.run(target, command, on_reconnect=on_reconnect, **kw):
            on_reconnect.recovered()
            if isinstance(event, OutputChunk):
                if not as_json and event.data:
                    out[event.stream].write(event.data)
                    out[event.stream].flush()
                    last[:] = [event.data[-1:], 1 if event.stream == "stdout" else 2]
            elif isinstance(event, StateUpdate):
                state = event.state
    except asyncio.CancelledError:
        from .display import detached_note

        if not state:
            click.echo("\nchaperone: interrupted before %s answered the start of run %s; if the start got there, "
                       "the run goes on: chaperone status %s" % (target.name, run_id, run_id), err=True)
            return 130
        click.echo("\n" + detached_note(run_id), err=True)
        return 130
    except BrokenPipeError:
        # Nothing reads the output here any more (``| head``): chaperone
        # lets go, as Ctrl-C twice does; the run goes on (it never depends
        # on this process), and says so (ssh's remote command would get
        # SIGPIPE and die).
        from .display import detached_note

        try:
            sys.stderr.write("chaperone: nothing reads the output here any more; %s\n"
                             % detached_note(run_id)[len("chaperone: "):])
            sys.stderr.flush()
        except OSError:
            pass
        return 141
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if as_json:
        from .display import print_json

        print_json(ch.get(run_id).info().model_dump())
        return exit_code_for(state)
    from .display import mid_line

    return say_end(run_id, state, mid_line(last[0], last[1]))


async def _signal_quietly(ch, run_id, sig):
    from ..errors import ChaperoneError

    try:
        await ch.signal(run_id, sig)
    except ChaperoneError as e:
        click.echo("chaperone: could not send %s: %s" % (sig, e), err=True)


async def _attached(ch, target, command, kw, params) -> int:
    """``run -t`` with this terminal: raw mode, what is typed to the
    program, the window's size followed, the terminal restored at the end
    whatever happens (see :mod:`chaperone.cli.terminal`)."""
    from .terminal import Attached

    run_id = kw["id"]
    att = Attached(ch, run_id, raw=True, quiet=params.get("quiet"))
    events = ch.run(target, command, on_reconnect=att.notice, stdin=att.keys(),
                    **{k: v for k, v in kw.items() if k != "stdin"})
    state, detached = await att.drive(events)
    if detached is not None:
        return detached
    return say_end(run_id, state)


