"""The local transport: the agent runs as a subprocess of this Python."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import List, Optional

from ..agent_source import LOCAL_BOOTSTRAP, agent_path
from .base import AgentProcess, PipeStdin, Transport, feed_stdin, spawn
from .ssh.common import command_of


class _LocalProcess(AgentProcess):
    def __init__(self, proc: asyncio.subprocess.Process, owner: "LocalTransport", feeder=None):
        self.proc = proc
        self.owner = owner
        self._stderr = asyncio.ensure_future(proc.stderr.read())
        self._stdin = PipeStdin(proc.stdin, feeder, "local")

    async def write(self, data: bytes) -> None:
        await self._stdin.write(data)

    async def write_eof(self) -> None:
        await self._stdin.write_eof()

    async def read(self, n: int = 1 << 20) -> bytes:
        return await self.proc.stdout.read(n)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def stderr(self) -> bytes:
        return await self._stderr

    def close(self) -> None:
        self._stderr.cancel()
        self.owner._finish(self.proc)


#: Runs the agent file named by ``argv[1]`` (see agent_source.LOCAL_BOOTSTRAP).
_BOOTSTRAP = LOCAL_BOOTSTRAP




def caller_environ() -> dict:
    """This process's environment as its caller gave it, for the local
    agent to hand on to programs: ``os.environ`` (with what this process
    set itself), but ``LC_CTYPE`` as it was at this process's start (from
    /proc/self/environ): Python coerces a C locale to ``C.UTF-8`` in its
    own environment (PEP 538), which a program started through ``ssh`` or
    the user's shell would never see."""
    env = dict(os.environ)
    try:
        with open("/proc/self/environ", "rb") as f:
            first = f.read()
    except OSError:
        return env
    original = None
    for item in first.split(b"\0"):
        if item.startswith(b"LC_CTYPE="):
            original = os.fsdecode(item[len(b"LC_CTYPE="):])
            break
    if original is None:
        env.pop("LC_CTYPE", None)
    else:
        env["LC_CTYPE"] = original
    return env


class LocalTransport(Transport):
    """Runs the agent on this machine with this Python.

    ``-I -S``: the agent is stdlib-only, so it needs neither site-packages
    (whose ``.pth`` files can cost tens of milliseconds per start) nor the
    ``PYTHON*`` variables; the program still gets the whole environment:
    this process's, as its caller gave it (:func:`caller_environ`).
    """

    host = "local"

    def __init__(self, python: Optional[str] = None, root: Optional[str] = None):
        self._python = python
        self.python = python or sys.executable
        self.root = root
        self._reaping: set = set()

    def _finish(self, proc: asyncio.subprocess.Process) -> None:
        """Kill ``proc`` if it still runs; close its pipes once it is reaped.

        ``os.kill``, not ``proc.kill()``, and no transport ``close()``
        before the exit: both poll the child first, which can reap it
        behind asyncio's child watcher (it then reports status 255 and
        warns).  :meth:`close` waits for the reaping, so no child exits
        after the event loop closed ("Loop ... that handles pid ... is
        closed")."""
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        async def reap():
            try:
                await proc.wait()
            finally:
                transport = getattr(proc, "_transport", None)
                if transport is not None:
                    transport.close()

        task = asyncio.ensure_future(reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def close(self) -> None:
        if self._reaping:
            await asyncio.wait(list(self._reaping), timeout=5.0)

    async def open(self, args: List[str], stdin: bytes = b"", *, keep_stdin: bool = False) -> AgentProcess:
        argv = [self.python, "-I", "-S", "-c", _BOOTSTRAP, str(agent_path())]
        if self.root:
            argv += ["--root", self.root]
        proc = await spawn(argv + list(args), env=caller_environ() if command_of(list(args)) == "start" else None)
        await feed_stdin(proc, stdin, close=not keep_stdin)
        return _LocalProcess(proc, self)

    def describe(self) -> dict:
        return {"host": "local", "root": self.root, "python": self._python}

