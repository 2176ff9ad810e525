"""``chaperone attach ID``: this terminal attached to a running run again, as
``docker attach`` does: its output from now on, what is typed to its input
(a run on a terminal, ``run -t``: raw, as ``ssh -t``; ``~.`` detaches
again), and its exit status at its end."""

from __future__ import annotations

import sys

import click

from .app import cli, fail, run_async, ssh_options
from .manage import complete_ids


@cli.command()
@click.argument("run_id", metavar="ID", required=False, shell_complete=complete_ids)
@click.option("-t", "--target", "target", metavar="ID", shell_complete=complete_ids,
              help="The run (as tmux attach -t): the same as ID.")
@click.option("--no-stdin", "no_stdin", is_flag=True, help="Only watch: send nothing typed here to the run.")
@click.option("-q", "--quiet", is_flag=True, help="Do not print reconnects on stderr.")
@ssh_options
def attach(run_id, target, no_stdin, quiet, **params):
    """Attach to a running run: its output as it comes, what you type to it.

    \b
    A run on a terminal (run -t, or run -d -t): this terminal becomes its
    terminal again (raw mode, its window size follows; ~. detaches, and
    the run goes on). A run that reads a stream (run with piped input):
    what you type, or pipe, is appended to its input; the end of it
    (Ctrl-D, or the pipe's end) is its end of file. Other runs: their
    output only. Exit status: the run's, at its end (as wait).
    """
    if run_id and target and run_id != target:
        raise click.UsageError("two runs given (%s and -t %s): attach to one" % (run_id, target))
    run_id = run_id or target
    if not run_id:
        raise click.UsageError("Missing argument 'ID' (the run to attach to; chaperone ps lists them)")

    async def go(ch):
        from ..states import FINAL_STATES
        from .display import is_terminal, say_end
        from ..api import window_size
        from .terminal import Attached

        rec = ch.record(run_id)
        state = await ch.status(rec.id)
        if state.state in FINAL_STATES:
            fail("run %s has ended (%s): there is nothing to attach to; its output: chaperone logs %s"
                 % (rec.id, state.state, rec.id), 1)
        info = None if no_stdin else await ch.input_status(rec.id)
        typing = info is not None and not info.end and not info.closed
        here = is_terminal(0)
        # (raw only to type to its terminal: output only, Ctrl-C must detach)
        att = Attached(ch, rec.id, raw=bool(typing and info.tty and here), quiet=quiet)
        if typing:
            from ..feed import read_fd

            ch.send_input(rec.id, att.keys() if here else read_fd(0), on_reconnect=att.notice)
        elif here:
            att.swallow_keys()
        if att.raw is not None:
            size = window_size()
            if size is not None:  # (a redraw: a full-screen program repaints at SIGWINCH)
                await ch.resize(rec.id, max(1, size[0] - 1), size[1])
                await ch.resize(rec.id, *size)
        if not quiet and sys.stderr.isatty():
            how = "~. detaches" if att.raw is not None else "Ctrl-C detaches"
            what = "" if typing else "; its input is not open: output only"
            att.say("chaperone: attached to run %s on %s (%s%s)\n" % (rec.id, rec.host, how, what))
        offsets = {"stdout": state.stdout_bytes, "stderr": state.stderr_bytes}
        events = ch.logs(rec.id, offsets=offsets, follow=True, on_reconnect=att.notice)
        end, detached = await att.drive(events)
        if detached is not None:
            return detached
        return say_end(rec.id, end)

    sys.exit(run_async(params, go))
