"""``chaperone serve``: the click command (registered in chaperone/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click

DEFAULT_PORT = 8474  # (chaperone.serve.server.DEFAULT_PORT; not imported: --help stays fast)


def _fail(message: str, code: int = 1):
    click.echo("chaperone: %s" % message, err=True)
    sys.exit(code)


@click.command()
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Address of the dashboard and the API (plain HTTP: keep it on loopback).")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the dashboard and the API.")
@click.option("--callback-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the agents' HTTPS callbacks (0: any free one).")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=10.0, show_default=True, metavar="SECONDS",
              help="Agents report this often; a host unheard for 3 of them plus 2 s is shown silent.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print the sign-in URL and return.")
@click.option("--url", "print_url", is_flag=True, help="Print the running server's sign-in URL and exit.")
@click.option("--stop", "stop", is_flag=True, help="Stop the running server and exit.")
@click.option("--detached-child", is_flag=True, hidden=True)
@click.pass_context
def serve(ctx, bind, port, callback_port, heartbeat, detach, print_url, stop, detached_child):
    """Serve the dashboard, the local API and the agents' callbacks.

    One per user; its files are in $CHAPERONE_HOME/serve/.  Prints the URL
    that signs a browser in (it holds the secret token: do not share it).
    """
    from . import files

    directory = files.serve_dir()
    if print_url or stop:
        info = files.read_server_info(directory)
        if info is None:
            _fail("no server is running (start one with `chaperone serve`)")
        if print_url:
            token = files.read_token(directory)
            if token is None:
                _fail("cannot read the token in %s" % (directory / "token"))
            click.echo("%s?token=%s" % (info["url"], token))
            return
        from .server import CannotServe, stop_server

        try:
            pid = stop_server()
        except (CannotServe, OSError) as e:
            _fail(str(e))
        click.echo("stopped the server (pid %s)" % pid)
        return
    ssh_config = list(ctx.find_root().params.get("ssh_config") or ())
    if detach:
        _detach(directory, ctx, ssh_config, bind, port, callback_port, heartbeat)
        return
    _foreground(directory, ssh_config, bind, port, callback_port, heartbeat, quiet=detached_child)


def _foreground(directory, ssh_config, bind, port, callback_port, heartbeat, quiet):
    import asyncio
    import logging

    from .server import CannotServe, serve as run_server, sign_in_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s chaperone serve: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("chaperone.callback").setLevel(logging.WARNING)  # (its access log: a line per callback)

    def ready(info, token):
        if not quiet:  # (a detached server's stdout is its log: the secret stays out of it)
            click.echo("chaperone: serving %s; open this URL to sign in (it holds the token):" % info["url"])
            click.echo(sign_in_url(info["url"], token))
            sys.stdout.flush()

    try:
        asyncio.run(run_server(bind=bind, port=port, ssh_config=ssh_config, heartbeat=heartbeat,
                               callback_port=callback_port, ready=ready))
    except CannotServe as e:
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        _fail(str(e))


def _detach(directory, ctx, ssh_config, bind, port, callback_port, heartbeat):
    from . import files

    info = files.read_server_info(directory)
    if info is not None:
        _fail("a server is already running for this user (pid %s, %s)" % (info["pid"], info["url"]))
    argv = [sys.executable, "-m", "chaperone"]
    for f in ssh_config:
        argv += ["-F", f]
    argv += ["serve", "--detached-child", "--bind", bind, "--port", str(port), "--callback-port",
             str(callback_port), "--heartbeat", str(heartbeat)]
    log_path = directory / "log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                 close_fds=True)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = files.read_server_info(directory)
        if info is not None and int(info["pid"]) == child.pid:
            token = files.read_token(directory)
            click.echo("chaperone: serving %s in the background (pid %d, log %s); sign in at:"
                       % (info["url"], child.pid, log_path))
            click.echo("%s?token=%s" % (info["url"], token))
            return
        if child.poll() is not None:
            last = ""
            try:
                lines = log_path.read_text(errors="replace").strip().splitlines()
                last = lines[-1] if lines else ""
            except OSError:
                pass
            _fail(last.replace("chaperone: ", "", 1) or "the server exited (%s); see %s" % (child.returncode, log_path))
        time.sleep(0.05)
    _fail("the server did not start within 60 s; see %s" % log_path)
