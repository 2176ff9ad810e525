"""The CLI through a running ``chaperone serve``.

When the server runs (``$CHAPERONE_HOME/serve/server.json``, its process
alive), ``run``, ``ps``, ``status``, ``logs``, ``wait``, ``kill`` and
``clean`` go through its local API: runs get push updates, and ``ps`` is
current with no SSH round trip.  When it does not, or when the command
line asks for what the server does not do (SSH options, ``--stdin``,
``--kill-grace``, ``--cached`` ...), the CLI works directly, as always.
Either way the output, the ``--json`` objects and the exit statuses are
the same (tests/cli/test_cli_served.py runs the same commands both ways).
``CHAPERONE_SERVER=off`` never uses it.
"""

from __future__ import annotations

import os
import sys
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Dict, List, Optional

    from ..serve.client import ServeClient

#: Options that the server's API does not take: given, the CLI goes direct.
DIRECT_ONLY = ("ssh_config", "port", "user", "identity", "ssh_option", "jump", "no_host_key_check", "python",
               "stdin_file", "no_stdin", "kill_grace", "tty", "cached", "spool_local", "run_id_exact", "remove",
               "verbose")


def client(params: dict, *also_direct: str) -> "Optional[ServeClient]":
    """The running server, if this command line can go through it."""
    if os.environ.get("CHAPERONE_SERVER", "").lower() in ("0", "off", "no", "false"):
        return None
    for name in DIRECT_ONLY + also_direct:
        if params.get(name):
            return None
    try:
        import click

        if click.get_current_context().find_root().params.get("ssh_config"):
            return None
    except RuntimeError:
        pass
    try:
        from ..records import chaperone_home

        if not (chaperone_home() / "serve" / "server.json").exists():
            return None  # (no server: not even its client is loaded)
        from ..serve.client import connect

        return connect(timeout=30.0)
    except Exception:  # a damaged server.json, a dead server: work directly
        return None


def resolve(ids: "List[str]") -> "List[str]":
    """Run ids from ids and unique prefixes, as the direct path resolves them
    (the records are this machine's either way)."""
    from ..api import Chaperone

    ch = Chaperone()
    try:
        out = []
        for run_id in ids:
            out.append(ch.record(run_id).id)
        return out
    finally:
        ch.records.close()


def follow_both(server: "ServeClient", run_id: str, streams=("stdout", "stderr"), offsets=None,
                out=None) -> None:
    """Copy the run's streams as they arrive, each to its own file, until the
    run's end (a thread per stream: the server serves them apart)."""
    out = out or {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    offsets = offsets or {}
    errors: List[BaseException] = []
    lock = threading.Lock()

    def copy(stream):
        try:
            for _, data in server.follow(run_id, stream, offsets.get(stream, 0)):
                with lock:
                    out[stream].write(data)
                    out[stream].flush()
        except BaseException as e:  # noqa: B036 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=copy, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    if errors:
        raise errors[0]


def run(server: "ServeClient", host: str, command, params: dict, env: "Dict[str, str]", cwd, timeout) -> int:
    """``chaperone run`` through the server: start, stream both outputs,
    end with the run's exit status.  Ctrl-C: SIGINT to the run; twice:
    detach."""
    import signal

    import click

    argv = command if isinstance(command, list) else None
    view = server.start(host, argv, command=None if argv is not None else command, run_id=params.get("run_id"),
                        env=env or None, cwd=cwd, timeout=timeout)
    run_id = view["id"]
    if params.get("detach"):
        if params.get("as_json"):
            from .display import print_json

            print_json(server.run(run_id))
        else:
            click.echo(run_id)
        if view["state"] == "error":
            click.echo("chaperone: %s" % view.get("error"), err=True)
            return view["exit_code"]
        return 0
    if not params.get("quiet") and not params.get("as_json") and sys.stderr.isatty():
        click.echo("chaperone: run %s on %s" % (run_id, view["host"]), err=True)
    interrupts = []

    def on_sigint(signum, frame):
        interrupts.append(1)
        if len(interrupts) == 1:
            click.echo("\nchaperone: sending SIGINT to run %s (Ctrl-C again to detach)" % run_id, err=True)
            try:
                server.signal(run_id, "INT")
            except Exception as e:
                click.echo("chaperone: could not send SIGINT: %s" % e, err=True)
        else:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        if params.get("as_json"):
            end = server.wait(run_id)
        else:
            follow_both(server, run_id)
            end = server.wait(run_id)
    except KeyboardInterrupt:
        from .display import detached_note

        click.echo("\n" + detached_note(run_id), err=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, old)
    if params.get("as_json"):
        from .display import print_json

        print_json(end)
        return end["exit_code"]
    if end["state"] == "error":
        click.echo("chaperone: %s" % end.get("error"), err=True)
    elif end["state"] == "lost":
        click.echo("chaperone: run %s was lost: %s" % (run_id, end.get("error")), err=True)
    elif end.get("timed_out"):
        click.echo("chaperone: run %s timed out; killed by %s" % (run_id, end.get("signal")), err=True)
    return end["exit_code"]
