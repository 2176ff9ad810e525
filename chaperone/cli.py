"""The ``chaperone`` command: small click commands over :mod:`chaperone.api`.

Exit status of ``run`` and ``wait``: the program's own; ``128+N`` when it was
killed by signal N; 127 (not found) or 126 (not executable) when it could not
be started; 255 when chaperone itself failed or lost the run; 2 for bad usage.

Heavy modules (asyncio, pydantic, asyncssh) are imported inside the commands,
so ``chaperone --help`` starts fast.
"""

from __future__ import annotations

import os
import sys

import click

EXIT_FAILURE = 255


def _fail(message: str, code: int = EXIT_FAILURE):
    click.echo("chaperone: %s" % message, err=True)
    sys.exit(code)


def _run_async(coro_fn):
    """Run ``coro_fn(ch)`` with a Chaperone, mapping errors to one line."""
    import asyncio

    from .api import Chaperone
    from .errors import ChaperoneError
    from .sshmaster import default_client

    ctx = click.get_current_context()
    opts = ctx.find_root().params

    async def main():
        ch = Chaperone(ssh_config=opts.get("ssh_config") or None, python=ctx.params.get("python"),
                       check_host_keys=not ctx.params.get("no_host_key_check", False),
                       ssh_client=default_client())
        try:
            run_id = ctx.params.get("run_id")
            if run_id and ctx.info_name != "run":
                try:
                    ch.preconnect_run(run_id)  # the handshake overlaps the rest
                except ChaperoneError:
                    pass  # the command itself will say what is wrong
            return await coro_fn(ch)
        finally:
            await ch.close()

    try:
        return asyncio.run(main())
    except ChaperoneError as e:
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError) as e:
        _fail(str(e) or type(e).__name__)
    except Exception as e:  # never a traceback: one line, and how to see more
        _fail("internal error: %s: %s (please report it)" % (type(e).__name__, e))


def _print_json(obj) -> None:
    import json

    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _describe_end(state: dict) -> str:
    if state["state"] == "done" and state.get("signal"):
        why = "timed out; killed by %s" if state.get("timed_out") else "killed by %s"
        return why % state["signal"]
    if state["state"] == "done":
        return "exited %d" % state.get("return_code")
    return "%s: %s" % (state["state"], state.get("error") or "")


def _table(rows, headers) -> None:
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(map(len, col)) for col in zip(headers, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [tuple(headers)] + rows]
    click.echo("\n".join(lines))


class _Group(click.Group):
    def main(self, args=None, **kw):  # one-line usage errors
        try:
            return super().main(args=args, standalone_mode=False, **kw)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            sys.exit(130)
        except click.ClickException as e:
            _fail(e.format_message(), 2 if isinstance(e, click.UsageError) else 1)


@click.group(cls=_Group)
@click.version_option(package_name="chaperone")
@click.option("-F", "ssh_config", multiple=True, metavar="FILE", help="SSH config file (like ssh -F).")
def cli(ssh_config):
    """Run programs on this machine or remote hosts and never lose them."""


def _ssh_options(f):
    f = click.option("-p", "--port", type=int, help="SSH port.")(f)
    f = click.option("-l", "--login", "user", help="SSH user.")(f)
    f = click.option("-i", "--identity", "identity", multiple=True, help="SSH identity file.")(f)
    f = click.option("--python", help="Python on the host (default: python3).")(f)
    f = click.option("--no-host-key-check", is_flag=True, help="Do not check SSH host keys (unsafe).")(f)
    f = click.option("--spool", help="Spool directory on the host (default ~/.chaperone/runs).")(f)
    return f


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("host")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.option("--id", "run_id", help="Run id (default: generated). Starting an existing id re-attaches.")
@click.option("-d", "--detach", is_flag=True, help="Print the run id and return; the run goes on.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", help="Working directory (default: here for local, home for remote).")
@click.option("--timeout", type=float, help="Seconds before SIGTERM, then SIGKILL after the grace.")
@click.option("--kill-grace", type=float, help="Seconds from SIGTERM to SIGKILL on timeout or kill (default 10).")
@click.option("--stdin", "stdin_file", type=click.Path(dir_okay=False), help="Give the program this file as stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print the final state as JSON instead of the output.")
@_ssh_options
def run(host, command, run_id, detach, env, cwd, timeout, kill_grace, stdin_file, as_json, **ssh):
    """Run CMD on HOST ("local" for this machine), streaming its output.

    Ctrl-C sends SIGINT to the program; a second Ctrl-C detaches and leaves
    it running (re-attach with `chaperone logs -f ID`).
    """
    if host == "local" and cwd is None:
        cwd = os.getcwd()
    stdin_data = None
    if stdin_file is not None:
        try:
            with open(stdin_file, "rb") as f:
                stdin_data = f.read()
        except OSError as e:
            _fail("cannot read --stdin %s: %s" % (stdin_file, e.strerror), 2)

    async def go(ch):
        if host != "local":
            ch.preconnect(host, _ssh_settings(ssh))
        from .api import exit_code_for, new_run_id, parse_env

        kw = dict(run_id=run_id or new_run_id(), cwd=cwd, env=parse_env(env), timeout=timeout, stdin=stdin_data,
                  config={"kill_grace": kill_grace} if kill_grace is not None else None,
                  ssh=_ssh_settings(ssh) if host != "local" else None)
        if detach:
            r = await ch.start(host, list(command), **kw)
            click.echo(r.id)
            return _exec_error(r.state) if r.state["state"] == "error" else 0
        return await _foreground(ch, host, list(command), kw, as_json, exit_code_for)

    sys.exit(_run_async(go))


def _ssh_settings(ssh) -> dict:
    """-p/-l/-i from the command line, as connection settings."""
    out = {}
    if ssh.get("port"):
        out["port"] = ssh["port"]
    if ssh.get("user"):
        out["username"] = ssh["user"]
    if ssh.get("identity"):
        out["client_keys"] = tuple(ssh["identity"])
    if ssh.get("spool"):
        out["root"] = ssh["spool"]
    return out


def _exec_error(state) -> int:
    from .api import exit_code_for

    click.echo("chaperone: %s" % state.get("error"), err=True)
    return exit_code_for(state)


async def _foreground(ch, host, argv, kw, as_json, exit_code_for) -> int:
    import asyncio
    import signal

    from .protocol import OutputChunk, StateUpdate

    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    state = {}
    interrupts = []
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    run_id = kw.get("run_id")

    def on_sigint():
        interrupts.append(1)
        if len(interrupts) == 1:
            click.echo("\nchaperone: sending SIGINT to run %s (Ctrl-C again to detach)" % run_id, err=True)
            loop.create_task(ch.signal(run_id, "SIGINT"))
        else:
            task.cancel()

    def on_reconnect(error, delay):
        click.echo("chaperone: %s; reconnecting" % error, err=True)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        async for event in ch.start_stream(host, argv, on_reconnect=on_reconnect, **kw):
            if isinstance(event, OutputChunk):
                if not as_json:
                    out[event.stream].write(event.data)
                    out[event.stream].flush()
            elif isinstance(event, StateUpdate):
                state = event.state
                run_id = state.get("id", run_id)
    except asyncio.CancelledError:
        click.echo("\nchaperone: detached; run %s goes on. Re-attach: chaperone logs -f %s; "
                   "result: chaperone wait %s" % (run_id, run_id, run_id), err=True)
        return 130
    except BrokenPipeError:
        return 141
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if as_json:
        _print_json(state)
    if state.get("state") == "error":
        return _exec_error(state) if not as_json else exit_code_for(state)
    if state.get("state") == "lost":
        click.echo("chaperone: run %s was lost: %s" % (run_id, state.get("error")), err=True)
    elif state.get("timed_out"):
        click.echo("chaperone: run %s timed out; killed by %s" % (run_id, state.get("signal")), err=True)
    return exit_code_for(state)


@cli.command()
@click.argument("run_id", required=False, metavar="[ID]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(run_id, as_json):
    """Show a run's state, re-read from its spool (or all runs)."""

    async def go(ch):
        if run_id:
            st = await ch.status(run_id)
            if as_json:
                _print_json(st)
            else:
                _table([(st["id"], ch.record(run_id).host, st["state"], _describe_end(st)
                         if st["state"] != "running" else "pid %s" % st.get("pid"),
                         st["stdout_bytes"], st["stderr_bytes"])],
                       ("ID", "HOST", "STATE", "RESULT", "STDOUT", "STDERR"))
            return 0
        rows = await ch.refresh_all()
        if as_json:
            _print_json([r["last"] or r for r in rows])
        else:
            _ps_table(ch)
        return 0

    sys.exit(_run_async(go))


PS_HEADERS = ("ID", "HOST", "STATE", "RESULT", "CREATED", "COMMAND")


def _ps_table(ch) -> None:
    _table(ch.records.table(), PS_HEADERS)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ps(as_json):
    """List recorded runs (from local records; `status` refreshes them)."""
    from .records import Records, chaperone_home

    records = Records(chaperone_home() / "runs.db")
    if as_json:
        _print_json([r.as_dict() for r in records.all()])
    else:
        _table(records.table(), PS_HEADERS)


@cli.command()
@click.argument("run_id", metavar="ID")
@click.option("--stderr", "use_stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the run ends.")
def logs(run_id, use_stderr, follow):
    """Print a run's output: the exact bytes it wrote."""
    stream = "stderr" if use_stderr else "stdout"
    out = sys.stdout.buffer

    async def go(ch):
        if not follow:
            try:
                async for data in ch.output_stream(run_id, stream):
                    out.write(data)
                out.flush()
            except BrokenPipeError:
                return 141
            return 0
        from .api import SKIP_OUTPUT
        from .protocol import OutputChunk

        offsets = {"stdout": 0, "stderr": 0}
        offsets["stdout" if use_stderr else "stderr"] = SKIP_OUTPUT["stdout"]

        def on_reconnect(error, delay):
            click.echo("chaperone: %s; reconnecting" % error, err=True)

        try:
            async for event in ch.stream(run_id, offsets, on_reconnect=on_reconnect):
                if isinstance(event, OutputChunk) and event.stream == stream:
                    out.write(event.data)
                    out.flush()
        except BrokenPipeError:
            return 141
        return 0

    sys.exit(_run_async(go))


@cli.command()
@click.argument("run_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the final state as JSON.")
def wait(run_id, as_json):
    """Wait for a run to end; exit with its exit status."""

    async def go(ch):
        from .api import exit_code_for

        st = await ch.wait(run_id)
        if as_json:
            _print_json(st)
        elif st["state"] != "done":
            click.echo("chaperone: run %s: %s" % (run_id, _describe_end(st)), err=True)
        return exit_code_for(st)

    sys.exit(_run_async(go))


@cli.command()
@click.argument("run_id", metavar="ID")
@click.option("-s", "--signal", "sig", default="TERM", show_default=True, help="Signal name or number.")
@click.option("--grace", type=float, help="Then SIGKILL after this many seconds if still running.")
def kill(run_id, sig, grace):
    """Send a signal to a run's whole process tree."""

    async def go(ch):
        from .api import check_signal

        name = check_signal(sig)
        st = await ch.signal(run_id, name, grace)
        click.echo("sent %s to run %s (pid %s)" % (name, run_id, st.get("pid")))
        return 0

    sys.exit(_run_async(go))


@cli.command()
@click.argument("run_id", metavar="ID")
@click.option("--force", is_flag=True, help="Kill the run first if it is still running.")
def clean(run_id, force):
    """Remove a finished run's spool and record."""

    async def go(ch):
        await ch.clean(run_id, force)
        click.echo("cleaned %s" % run_id)
        return 0

    sys.exit(_run_async(go))


from .serve.command import serve as _serve  # noqa: E402 (light: click only)
cli.add_command(_serve)


def main():
    cli.main(prog_name="chaperone")


if __name__ == "__main__":
    main()
