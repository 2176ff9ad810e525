"""Transports: how agent commands reach a host.

One small interface (like httpx's ``BaseTransport``): :meth:`Transport.open`
runs ``agent.py ARGS`` on the host with ``stdin`` bytes and returns an
:class:`AgentProcess` to read its stdout from.  :class:`LocalTransport` runs
the agent as a local subprocess; ``chaperone.ssh.SSHTransport`` runs it over
an SSH channel.  Everything above this module is the same for both.
"""

from __future__ import annotations

import abc
import asyncio
import os
import signal
import sys
from typing import List, Optional

from .agent_source import LOCAL_BOOTSTRAP, agent_path


class AgentProcess(abc.ABC):
    """A running agent command."""

    @abc.abstractmethod
    async def read(self, n: int = 1 << 20) -> bytes:
        """Up to ``n`` bytes of the agent's stdout; ``b""`` at the end."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """The agent's exit status (after its stdout ended)."""

    @abc.abstractmethod
    async def stderr(self) -> bytes:
        """What the agent wrote on stderr (after it exited)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop reading: kill the local process or close the SSH channel."""


class Transport(abc.ABC):
    #: Name of the host as records show it ("local" for this machine).
    host: str = "local"

    @abc.abstractmethod
    async def open(self, args: List[str], stdin: bytes = b"") -> AgentProcess:
        """Run ``agent.py *args`` on the host."""

    async def close(self) -> None:
        return None

    def warm(self) -> None:
        """Start connecting now, in the background, if connecting is slow
        and the transport can (the OpenSSH client's shared connection)."""
        return None

    def describe(self) -> dict:
        """How the host was reached, for the run's record (reconnect later)."""
        return {"host": self.host}


class _LocalProcess(AgentProcess):
    def __init__(self, proc: asyncio.subprocess.Process, owner: "LocalTransport"):
        self.proc = proc
        self.owner = owner
        self._stderr = asyncio.ensure_future(proc.stderr.read())

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


async def spawn(argv: List[str]) -> asyncio.subprocess.Process:
    """``argv`` with pipes for stdin, stdout and stderr, in a session of its
    own: out of the terminal's process group, so a Ctrl-C is for chaperone
    to decide about, never delivered to the agent (or ssh) behind its back."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=1 << 20,
    )


class AttachedProcess:
    """A child started before the event loop ran (a ``sshmaster.Child``,
    or anything with Popen's ``pid``, ``returncode``, ``poll()``,
    ``wait()`` and pipes for stdin, stdout and stderr), with the interface of an
    ``asyncio.subprocess.Process`` that :func:`feed_stdin` and the
    transports use: ``stdin`` (a StreamWriter), ``stdout`` and ``stderr``
    (StreamReaders), ``pid``, ``returncode``, ``wait()``.  asyncio's child
    watcher does not know it; it is reaped here (pidfd), never twice.
    ``on_exit``: called once it is reaped."""

    def __init__(self, popen, on_exit=None):
        self.popen = popen
        self.pid = popen.pid
        self.stdin = self.stdout = self.stderr = None
        self._pipes: list = []
        self._on_exit = on_exit

    @classmethod
    async def attach(cls, popen, on_exit=None) -> "AttachedProcess":
        self = cls(popen, on_exit)
        loop = asyncio.get_running_loop()
        try:
            for name in ("stdout", "stderr"):
                reader = asyncio.StreamReader(limit=1 << 20, loop=loop)
                transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader, loop=loop), getattr(popen, name))
                self._pipes.append(transport)
                setattr(self, name, reader)
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop=loop), popen.stdin)
            self._pipes.append(transport)
            self.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
        except BaseException:
            self.close_pipes()
            raise
        return self

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode

    async def wait(self) -> int:
        from .sshmaster import wait_exited

        code = await wait_exited(self.popen)
        on_exit, self._on_exit = self._on_exit, None
        if on_exit is not None:
            on_exit()
        return code

    def close_pipes(self) -> None:
        for transport in self._pipes:
            transport.close()


async def feed_stdin(proc: asyncio.subprocess.Process, data: bytes) -> None:
    """Write ``data`` to ``proc``'s stdin and close it (an early exit of
    the process is not an error here: its status will say why)."""
    try:
        if data:
            proc.stdin.write(data)
            await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass


class LocalTransport(Transport):
    """Runs the agent on this machine with this Python.

    ``-I -S``: the agent is stdlib-only, so it needs neither site-packages
    (whose ``.pth`` files can cost tens of milliseconds per start) nor the
    ``PYTHON*`` variables; the program still gets the whole environment.
    """

    host = "local"

    def __init__(self, python: Optional[str] = None, root: Optional[str] = None):
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

    async def open(self, args: List[str], stdin: bytes = b"") -> AgentProcess:
        argv = [self.python, "-I", "-S", "-c", _BOOTSTRAP, str(agent_path())]
        if self.root:
            argv += ["--root", self.root]
        proc = await spawn(argv + list(args))
        await feed_stdin(proc, stdin)
        return _LocalProcess(proc, self)

    def describe(self) -> dict:
        return {"host": "local", "root": self.root, "python": self.python}

