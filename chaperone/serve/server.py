"""Running `chaperone serve`: the lock, the files, the sockets, the signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Callable, Optional, Sequence

from aiohttp import web

from . import files
from .app import Api
from .service import Service
from ..errors import CannotServe

log = logging.getLogger("chaperone.serve")

DEFAULT_PORT = 8474


def sign_in_url(url: str, token: str) -> str:
    return "%s?token=%s" % (url, token)


def _url(bind: str, port: int) -> str:
    host = "127.0.0.1" if bind in ("0.0.0.0", "", "localhost") else bind
    host = "[::1]" if host == "::" else host
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return "http://%s:%d/" % (host, port)


async def serve(home=None, *, bind: str = "127.0.0.1", port: int = DEFAULT_PORT, ssh_config: Sequence[str] = (),
                heartbeat: float = 10.0, callback_port: int = 0,
                ready: Optional[Callable[[dict, str], None]] = None,
                stop: Optional[asyncio.Event] = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set).  ``ready(info,
    token)`` is called once the server listens and ``server.json`` is
    written."""
    directory = files.serve_dir(home)
    lock = files.InstanceLock(directory)
    try:
        lock.acquire()
    except files.AlreadyRunning:
        info = files.read_server_info(directory)
        where = " (pid %s, %s)" % (info["pid"], info["url"]) if info else ""
        raise CannotServe("a server is already running for this user%s" % where) from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    service = None
    try:
        token = files.ensure_token(directory)
        service = Service(home, ssh_config=ssh_config, heartbeat=heartbeat, callback_port=callback_port)
        info = {"pid": os.getpid(), "pid_start": files.process_start(os.getpid()), "url": _url(bind, port),
                "bind": bind, "port": port, "started": files.now_iso(), "home": str(service.runs.home)}
        api = Api(service, token, port, bind, info=lambda: dict(info, callback_url=service.runs.callback_url))
        runner = web.AppRunner(api.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, bind, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise CannotServe("cannot listen on %s port %d: %s (choose another with --port)"
                             % (bind, port, e.strerror or e)) from None
        await service.open()
        files.write_server_info(directory, info)
        log.info("serving %s (callbacks at %s)", info["url"], service.runs.callback_url)
        if ready is not None:
            ready(info, token)
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        files.remove_server_info(directory, os.getpid())
        if runner is not None:
            await runner.cleanup()
        if service is not None:
            await service.close()
        lock.release()


def stop_server(home=None, timeout: float = 30.0) -> Optional[int]:
    """SIGTERM to the running server, then wait for it to go; its pid, or
    None when none runs."""
    directory = files.serve_dir(home)
    info = files.read_server_info(directory)
    if info is None:
        return None
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and files.process_start(pid) is not None:
        time.sleep(0.05)
    if files.process_start(pid) is not None:
        raise CannotServe("server pid %d did not stop within %.0f s" % (pid, timeout))
    return pid
