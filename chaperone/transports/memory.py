"""An in-memory host, for tests: :class:`MemoryTransport` is to chaperone
what httpx's ``MockTransport`` is to httpx.

A :class:`MemoryHost` answers the agent's command lines exactly as
``remote/agent.py`` does on the wire (the ``--marker`` line, the one JSON
line, the ``!cQI`` follow frames, the exit statuses and their one-line
errors; docs/protocol.md), from runs held in memory.  It reuses the agent's
own argument parser, program.json validator, JSON and signal names, so bad
input is refused with the agent's very words.  Programs are not executed:
they are scripted, as async functions registered by name::

    from chaperone import Chaperone
    from chaperone.transports.memory import MemoryHost, MemoryTransport, run_virtual

    host = MemoryHost("gpu1")

    @host.program("train")
    async def train(p):                      # p: the MemoryRun
        p.write("stdout", b"epoch 1\\n")
        await p.sleep(60)                    # a minute of the loop's clock
        p.write("stderr", b"done\\n")
        return 0                             # the exit status (or p.exit(0))

    async def main():
        async with Chaperone(tmp_path, transports={"gpu1": MemoryTransport(host)}) as ch:
            run = await ch.start("gpu1", ["train", "--lr", "3e-4"])
            host.break_after(100, command="follow")   # a dropped SSH connection
            state = await run.wait()                  # reconnects by itself
            assert state.return_code == 0
            assert host.runs[run.id].stdout == b"epoch 1\\n"

    run_virtual(main())   # the loop's clock jumps over idle time: no real minute

What the host models, its faults, its clock and what it leaves out:
docs/protocol.md, "Testing without SSH".  Programs, latency, graces and
timeouts use the event loop's clock; :func:`run_virtual` runs a coroutine
on :class:`VirtualClockLoop`, whose clock jumps over idle time (as trio's
autojump clock), so that hours of a program's time, reconnect backoff and
timeouts take no real time, in a deterministic order.

Stdlib and chaperone only (no asyncssh, aiohttp or pydantic is imported).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import errno as _errno
import itertools
import os
import selectors
import signal as _signal
import time
import traceback
from typing import Awaitable, Callable, Deque, Dict, List, Optional, Union

from ..agent_source import agent_module
from ..errors import ConnectionLost
from .base import AgentProcess, Transport
from .ssh.common import command_of, connect_error
from .target import Target

__all__ = ["MemoryHost", "MemoryRun", "MemoryTransport", "VirtualClockLoop", "run_virtual"]

Program = Callable[["MemoryRun"], Awaitable[Optional[int]]]

#: Signals whose default action is not to end the program (signal(7)).
#: (Stop signals are not modeled: they are ignored too.)
DEFAULT_IGNORED = frozenset(("SIGCHLD", "SIGURG", "SIGWINCH", "SIGCONT", "SIGSTOP", "SIGTSTP", "SIGTTIN",
                             "SIGTTOU"))
#: Signals a program cannot trap.
UNTRAPPABLE = frozenset(("SIGKILL", "SIGSTOP"))
#: Output a follow holds for a reader that does not read, before it waits.
HIGH_WATER = 4 << 20


def _agent():
    return agent_module()


class _Exit(BaseException):
    """Unwinds a program that called :meth:`MemoryRun.exit` or :meth:`MemoryRun.kill`."""


class MemoryRun:
    """A run on a :class:`MemoryHost`: what its spool holds, and the
    handle its scripted program gets.

    What the host holds: :attr:`state` (the ``state.json`` document,
    its byte counts current), :attr:`stdout`, :attr:`stderr`, :attr:`spec`
    (program.json, defaults filled in), :attr:`signals` (every signal
    delivered to the program, by name), :attr:`controls` (the ``control``
    messages it was sent).

    For the program: :attr:`argv`, :attr:`env`, :attr:`cwd`,
    :attr:`stdin`, :meth:`write`, :meth:`sleep`, :meth:`exit`,
    :meth:`kill`, :meth:`trap` and :meth:`received`.  A signal the
    program did not trap ends it (``state: done``, ``signal``), except
    those whose default action is to ignore them; SIGKILL cannot be
    trapped.  An exception raised by the program ends it with status 1,
    its traceback in :attr:`stderr` (as Python would)."""

    def __init__(self, host: "MemoryHost", root: str, spec: dict):
        self.host = host
        self.id: str = spec["id"]
        self.spec = spec
        prog = spec["program"]
        #: What runs: the argv, or for a shell command line the host's
        #: login shell, as the agent execs it (``[sh, "-c", LINE]``).
        self.executable: str = host.shell if prog.get("shell") else prog["argv"][0]
        self.argv: List[str] = ([os.path.basename(host.shell), "-c", prog["argv"][0]] if prog.get("shell")
                                else list(prog["argv"]))
        self.cwd: str = spec["program"]["cwd"] or host.home
        self.env: Dict[str, str] = host._environment(spec["program"])
        self.stdin = b""
        #: With a stdin stream: where its input ends, once the client said so (else None).
        self.stdin_end: Optional[int] = None
        self._stdin_read = 0
        self.signals: List[str] = []
        self.controls: List[dict] = []
        self.exception: Optional[BaseException] = None
        self._data = {"stdout": bytearray(), "stderr": bytearray()}
        #: The spool's timeline: (microseconds since the epoch, stream, size reached), a record per write.
        self.timeline: List[tuple] = []
        self._trapped: set = set()
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._timers: Dict[str, asyncio.TimerHandle] = {}
        self._timed_out = False
        self._removed = False
        self._changed = asyncio.Event()
        self.state = {  # (the agent's keys, in its order: Supervisor.base_state)
            "version": 1, "id": self.id, "host": host.name, "state": "running",
            "agent_pid": next(host._pids), "agent_start": next(host._ticks), "boot_id": host.boot_id,
            "host_id": "%s/%s/4026531836" % (host.boot_id.replace("-", ""), host.name),
            "pid": None, "pgid": None, "pid_start": None, "return_code": None, "signal": None, "timed_out": False,
            "error": None, "errno": None, "rusage": None, "start_time": host._now(), "end_time": None,
            "end_ticks": None, "stdout_bytes": 0, "stderr_bytes": 0, "spool": root.rstrip("/") + "/" + self.id,
            "note": None,
        }

    # What the host holds ---------------------------------------------------

    @property
    def stdout(self) -> bytes:
        return bytes(self._data["stdout"])

    @property
    def stderr(self) -> bytes:
        return bytes(self._data["stderr"])

    @property
    def running(self) -> bool:
        return self.state["state"] == "running"

    def _status(self) -> dict:
        return dict(self.state)

    def _touch(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_change(self, since: asyncio.Event) -> None:
        if since is self._changed:
            await since.wait()

    # The program's side --------------------------------------------------------

    def write(self, stream: str, data: bytes) -> None:
        """Append ``data`` to ``stream`` (``"stdout"`` or ``"stderr"``)."""
        if stream not in self._data:
            raise ValueError("unknown stream %r: stdout or stderr" % (stream,))
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("output is bytes, not %s" % type(data).__name__)
        if not self.running or self._task is None:
            return  # (the program is gone: nobody reads its pipe)
        self._data[stream] += data
        self.state[stream + "_bytes"] = len(self._data[stream])
        if data:
            self.timeline.append((self.host._now_us(), stream, len(self._data[stream])))
            self._touch()

    async def read(self) -> bytes:
        """The program reads its stdin: what came since its last read (a
        stream's input as the client sends it, waiting for more), ``b""``
        at its end."""
        while True:
            if self._stdin_read < len(self.stdin):
                data, self._stdin_read = self.stdin[self._stdin_read:], len(self.stdin)
                return data
            if self.stdin_end is not None or self.spec["program"]["stdin"] != {"stream": True}:
                return b""
            await self._wait_change(self._changed)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on the event loop's clock."""
        await asyncio.sleep(seconds)

    def exit(self, code: int = 0) -> None:
        """End the program now with exit status ``code`` (0-255, as the OS keeps it)."""
        self._end(return_code=int(code) & 0xFF)
        raise _Exit()

    def kill(self, sig: Union[str, int] = "SIGKILL") -> None:
        """End the program now, killed by ``sig`` (as by a crash: SIGSEGV ...)."""
        self._end(signal=_signal_name(sig))
        raise _Exit()

    def trap(self, *sigs: Union[str, int]) -> None:
        """Handle these signals in the program (see :meth:`received`)
        instead of their default action."""
        for sig in sigs:
            name = _signal_name(sig)
            if name in UNTRAPPABLE:
                raise ValueError("%s cannot be trapped" % name)
            self._trapped.add(name)

    async def received(self) -> str:
        """The next trapped signal delivered to the program (its name)."""
        return await self._signal_queue().get()

    def _signal_queue(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    # The supervisor's side -----------------------------------------------------

    def _launch(self) -> None:
        """Start the program, as the supervisor does: or record why it could not."""
        prog = self.spec["program"]
        stdin = prog["stdin"]
        if stdin is not None and "path" in stdin:
            if stdin["path"] not in self.host.files:
                return self._failed("stdin %s" % stdin["path"], _errno.ENOENT)
            self.stdin = bytes(self.host.files[stdin["path"]])
        elif stdin is not None and "data" in stdin:
            self.stdin = base64.b64decode(stdin["data"])
        func = self.host.programs.get(self.executable) or self.host.programs.get(os.path.basename(self.executable))
        if func is None:
            return self._failed(self.executable, _errno.ENOENT)
        pid = next(self.host._pids)
        self.state.update(pid=pid, pgid=pid, pid_start=next(self.host._ticks))
        self._task = asyncio.ensure_future(self._main(func))
        timeout = self.spec["config"]["timeout"]
        if timeout is not None:
            self._timers["timeout"] = asyncio.get_running_loop().call_later(timeout, self._time_out)

    def _append_stdin(self, offset: int, data: bytes) -> None:
        """``agent.py stdin``'s ``D`` frame: idempotent by offset (as StdinSpool.append)."""
        agent = _agent()
        held = len(self.stdin)
        if offset > held:
            raise agent.AgentError("stdin of run %s: a gap: it holds %d bytes, the data starts at %d"
                                   % (self.id, held, offset), 1)
        if self.stdin_end is not None and offset + len(data) > self.stdin_end:
            raise agent.AgentError("stdin of run %s ended at %d bytes: no more is taken" % (self.id, self.stdin_end), 1)
        if offset + len(data) > held:
            self.stdin += bytes(data[held - offset:])
            self._touch()

    def _end_stdin(self, offset: int) -> None:
        """``agent.py stdin``'s ``E`` frame (as StdinSpool.end)."""
        agent = _agent()
        held = len(self.stdin)
        if self.stdin_end is not None and self.stdin_end != offset:
            raise agent.AgentError("stdin of run %s ended at %d bytes, not %d" % (self.id, self.stdin_end, offset), 1)
        if held != offset:
            raise agent.AgentError("stdin of run %s holds %d bytes: it cannot end at %d" % (self.id, held, offset), 1)
        self.stdin_end = offset
        self._touch()

    def _failed(self, what: str, code: int) -> None:
        self.state.update(state="error", errno=code, error="%s: %s" % (what, os.strerror(code)),
                          end_time=self.host._now(), end_ticks=next(self.host._ticks))

    async def _main(self, func: Program) -> None:
        try:
            code = await func(self)
        except _Exit:
            return
        except asyncio.CancelledError:
            if self.running:  # (not by a signal: the loop is closing)
                raise
            return
        except Exception as e:
            self.exception = e
            self._data["stderr"] += traceback.format_exc().encode()
            self.state["stderr_bytes"] = len(self._data["stderr"])
            self.timeline.append((self.host._now_us(), "stderr", len(self._data["stderr"])))
            code = 1
        if self.running:
            self._end(return_code=int(code or 0) & 0xFF)

    def _end(self, **how) -> None:
        """Record the program's end (``return_code`` or ``signal``)."""
        if not self.running:
            return
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        rusage = {f: (0.0 if f in ("ru_utime", "ru_stime") else 0) for f in _agent().RUSAGE_FIELDS}
        self.state.update(state="done", end_time=self.host._now(), end_ticks=next(self.host._ticks), timed_out=self._timed_out, rusage=rusage,
                          **how)
        task, self._task = self._task, None
        if task is not None and task is not _current_task():
            task.cancel()
        self._touch()

    def _lose(self) -> None:
        why = "the supervisor (pid %s) is gone without a result" % self.state["agent_pid"]
        if self._task is not None:
            why += "; killed what was left of the program's process group"
            task, self._task = self._task, None
            task.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.state.update(state="lost", error=why, end_time=self.host._now(), end_ticks=next(self.host._ticks))
        self._touch()

    def _deliver(self, name: str) -> None:
        """A signal reaches the program (its process group)."""
        if not self.running or self._task is None:
            return
        self.signals.append(name)
        if name in self._trapped:
            self._signal_queue().put_nowait(name)
        elif name not in DEFAULT_IGNORED:
            self._end(signal=name)

    def _control(self, msg: dict) -> None:
        """What the supervisor does with a line from its control FIFO."""
        if msg.get("op") != "signal":
            self.controls.append(msg)
            return
        agent = _agent()
        sig, grace = msg["signal"], msg.get("grace")
        if grace is None and sig == _signal.SIGTERM:
            grace = self.spec["config"]["kill_grace"]  # like `docker stop`
        self._deliver(agent.signal_name(sig))
        if grace is not None and sig != _signal.SIGKILL and self.running:
            loop = asyncio.get_running_loop()
            old = self._timers.get("kill")
            if old is None or loop.time() + grace < old.when():
                if old is not None:
                    old.cancel()
                self._timers["kill"] = loop.call_later(grace, self._deliver, "SIGKILL")

    def _time_out(self) -> None:
        self._timers.pop("timeout", None)
        self._timed_out = True
        self._control({"op": "signal", "signal": int(_signal.SIGTERM), "grace": None})

    def __repr__(self) -> str:
        return "<MemoryRun %s on %s: %s>" % (self.id, self.host.name, self.state["state"])


def _signal_name(sig: Union[str, int]) -> str:
    agent = _agent()
    try:
        return agent.signal_name(agent.parse_signal(sig))
    except agent.AgentError as e:
        raise ValueError(str(e)) from None


def _current_task():
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


class _Process(AgentProcess):
    """One agent command on a :class:`MemoryHost`, as a connection shows it."""

    def __init__(self, host: "MemoryHost", limit: Optional[int]):
        self.host = host
        self.code: Optional[int] = None
        self._out = bytearray()
        self._err = bytearray()
        self._limit = limit  # bytes of stdout before the connection drops
        self._delivered = 0
        self._broken: Optional[ConnectionLost] = None
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._in = bytearray()  # the agent's stdin, written by the client, not read yet
        self._in_eof = True
        self._in_more = asyncio.Event()

    # The agent's side --------------------------------------------------------

    def emit(self, data: bytes) -> None:
        self._out += data
        self._wake.set()

    def marker(self, marker: Optional[str]) -> None:
        if marker:
            self.emit(("\n%s\n" % marker).encode())

    def json(self, obj) -> None:
        self.emit((_agent().dumps(obj, sort_keys=True) + "\n").encode())

    def frame(self, kind: bytes, offset: int, data: bytes = b"") -> None:
        self.emit(_agent().FRAME.pack(kind, offset, len(data)) + bytes(data))
        self._open = kind in (b"1", b"2")

    def seal(self) -> None:
        """Before going idle after an output frame: the agent's seal."""
        if getattr(self, "_open", False):
            self.emit(_agent().SEAL)
            self._open = False

    async def take(self, n: int) -> bytes:
        """``n`` bytes of what the client writes on the agent's stdin
        (fewer only at its end)."""
        while len(self._in) < n and not self._in_eof:
            self._in_more.clear()
            await self._in_more.wait()
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def finish(self, code: int, error: Optional[str] = None) -> None:
        if error is not None:
            self._err += ("chaperone-agent: %s\n" % error).encode()
        self.code = code
        self._wake.set()

    async def drain(self) -> None:
        while len(self._out) > HIGH_WATER and self._broken is None:
            self._room.clear()
            await self._room.wait()

    def stream(self, follow: Callable[[], Awaitable[None]]) -> None:
        """Go on with ``follow()`` (the frames), until it returns or the reader is gone."""
        async def serve():
            try:
                await follow()
            except asyncio.CancelledError:
                self.finish(141)  # (the reader is gone)
                raise
            except _agent().AgentError as e:
                self.finish(e.code, str(e))
                return
            except Exception as e:  # pragma: no cover - a bug of this module
                self.finish(3, "%s: %s" % (type(e).__name__, e))
                raise
            self.finish(0)

        self._task = asyncio.ensure_future(serve())

    # The connection's side ---------------------------------------------------

    def drop(self, why: str) -> None:
        if self._broken is None:
            self._broken = ConnectionLost("connection to %s lost: %s" % (self.host.name, why))
        self._stop()
        self._wake.set()
        self._room.set()

    def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    async def read(self, n: int = 1 << 20) -> bytes:
        while True:
            if self._broken is not None:
                raise self._broken
            if self._out:
                take = min(n, len(self._out))
                if self._limit is not None:
                    if self._delivered >= self._limit:
                        self.drop("broken after %d bytes" % self._limit)
                        continue
                    take = min(take, self._limit - self._delivered)
                data = bytes(self._out[:take])
                del self._out[:take]
                self._delivered += take
                self._room.set()
                return data
            if self.code is not None:
                return b""
            self._wake.clear()
            await self._wake.wait()

    async def wait(self) -> int:
        while self.code is None and self._broken is None:
            self._wake.clear()
            await self._wake.wait()
        if self._broken is not None:
            raise self._broken
        return self.code

    async def stderr(self) -> bytes:
        return bytes(self._err)

    async def write(self, data: bytes) -> None:
        if self._broken is not None:
            raise self._broken
        if self._in_eof or self.code is not None:
            raise ConnectionLost("connection to %s lost: the agent's stdin is closed" % self.host.name)
        self._in += data
        self._in_more.set()
        await asyncio.sleep(0)

    async def write_eof(self) -> None:
        self._in_eof = True
        self._in_more.set()

    def close(self) -> None:
        self._stop()
        self.host._open.discard(self)


class MemoryHost:
    """A host held in memory: its runs (by spool root and id), its
    programs, and the faults to inject.  See the module's docstring.

    ``name``: the host's own name (``state.json``'s ``host``, and the
    transport's name in errors); ``home``: its home directory (the
    default spool root is ``HOME/.chaperone/runs``, and a run's ``cwd``);
    ``environ``: the environment a program inherits; ``files``: files
    ``stdin.path`` may name (path -> bytes); ``chunk``: the largest
    output frame payload (the agent's 1 MiB; smaller splits output into
    more frames); ``latency``: seconds each agent call takes to connect;
    ``banner``: bytes every call prints before the agent runs (a login
    script's noise: the marker skips it); ``shell``: the login shell that
    runs shell command lines (a string command runs the program
    registered under this path or its base name, with ``argv`` ``[sh,
    "-c", LINE]``)."""

    def __init__(self, name: str = "memory", *, home: str = "/home/user", environ: Optional[Dict[str, str]] = None,
                 files: Optional[Dict[str, bytes]] = None, chunk: int = 1 << 20, latency: float = 0.0,
                 banner: bytes = b"", shell: str = "/bin/sh"):
        self.name = name
        self.home = home
        self.shell = shell
        self.root = home.rstrip("/") + "/.chaperone/runs"
        self.environ = dict(environ if environ is not None else
                            {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
        self.files = dict(files or {})
        self.chunk = chunk
        self.latency = latency
        self.banner = banner
        #: Scripted programs by name (``argv[0]``, or its base name).
        self.programs: Dict[str, Program] = {}
        #: Runs by spool root, then id (:attr:`runs`: the default root's).
        self.spools: Dict[str, Dict[str, MemoryRun]] = {}
        #: The argv of every agent call that reached the host, in order.
        self.calls: List[List[str]] = []
        self.boot_id = "%s-%s-%s-%s-%s" % tuple(os.urandom(n).hex() for n in (4, 2, 2, 2, 6))
        self._pids = itertools.count(1000)
        self._ticks = itertools.count(500000, 37)
        self._refusals: Deque[Exception] = collections.deque()
        self._breaks: List[list] = []
        self._open: set = set()
        self._clock: Optional[tuple] = None

    @property
    def runs(self) -> Dict[str, MemoryRun]:
        """The runs in the default spool root, by id."""
        return self.spools.setdefault(self.root, {})

    def program(self, name: str, func: Optional[Program] = None):
        """Register ``func`` (an async function of a :class:`MemoryRun`,
        returning the exit status or None for 0) as the program ``name``;
        without ``func``, a decorator."""
        if func is None:
            return lambda f: self.program(name, f)
        self.programs[name] = func
        return func

    # Faults ------------------------------------------------------------------

    def refuse(self, count: int = 1, kind: str = "dropped", detail: str = "") -> None:
        """Refuse the next ``count`` connections with the error the SSH
        transports raise for ``kind``: ``dropped`` (before login, as past
        sshd's MaxStartups: ``retry_safe``), ``refused``, ``timeout``,
        ``closed``, ``unreachable`` (``transient``), ``host_key``,
        ``auth``, ``unknown_host`` (neither); or ``lost``: the connection
        drops after login, before the agent ran (:class:`ConnectionLost`:
        the caller cannot tell whether it ran)."""
        for _ in range(count):
            if kind == "lost":
                error: Exception = ConnectionLost("connection to %s lost: %s" % (
                    self.name, detail or "dropped before the agent ran"))
            else:
                error = connect_error(Target(self.name), kind, detail or "memory host")
            self._refusals.append(error)

    def break_after(self, *sizes: int, command: Optional[str] = None) -> None:
        """The next ``len(sizes)`` agent calls (of ``command`` only, if
        given: ``start``, ``follow``, ``status`` ...) lose their connection
        after delivering that many bytes of the agent's stdout (marker
        and frame headers included): :class:`ConnectionLost`, as a
        dropped SSH connection.  What the call did on the host stays
        done (a start started); a reply no longer than its size arrives
        whole."""
        for size in sizes:
            self._breaks.append([command, int(size)])

    def disconnect(self) -> None:
        """Drop every open connection now (their reads and waits raise
        :class:`ConnectionLost`); runs go on."""
        for proc in list(self._open):
            proc.drop("the memory host dropped the connection")
        self._open.clear()

    def remove(self, run_id: str, root: Optional[str] = None) -> None:
        """Remove a run's spool, as ``rm -rf`` on the host would (its
        program, if running, is stopped with it)."""
        run = self.spools.get(root or self.root, {}).pop(run_id)
        run._removed = True
        run._touch()
        if run._task is not None:
            run._task.cancel()
            run._task = None
        for timer in run._timers.values():
            timer.cancel()

    def lose(self, run_id: str, root: Optional[str] = None) -> MemoryRun:
        """Kill a run's supervisor (the OOM killer, a crash): the run is
        ``lost``, as the agent records it at its next look."""
        run = self.spools[root or self.root][run_id]
        if run.running:
            run._lose()
        return run

    # The agent's command line ---------------------------------------------------

    async def open(self, args: List[str], stdin: bytes = b"", *, keep_stdin: bool = False) -> _Process:
        """Run ``agent.py ARGS`` here: what :class:`MemoryTransport` does."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._refusals:
            raise self._refusals.popleft()
        args = [str(a) for a in args]
        self.calls.append(args)
        proc = _Process(self, self._break_for(command_of(args)))
        proc._in += stdin
        proc._in_eof = not keep_stdin
        self._open.add(proc)
        if self.banner:
            proc.emit(self.banner)
        agent = _agent()
        try:
            parsed = agent.parse_args(["--root", self.root] + args)
            getattr(self, "_cmd_" + parsed.command)(parsed, proc, bytes(stdin))
        except agent._Help:
            proc.emit(agent.USAGE.encode())
            proc.finish(0)
        except agent.AgentError as e:
            proc.finish(e.code, str(e))
        else:
            if proc._task is None:
                proc.finish(0)
        return proc

    def _break_for(self, command: Optional[str]) -> Optional[int]:
        for i, (only, size) in enumerate(self._breaks):
            if only is None or only == command:
                del self._breaks[i]
                return size
        return None

    def _run(self, args) -> MemoryRun:
        run = self.spools.get(args.root, {}).get(args.id)
        if run is None:
            raise _agent().AgentError("no such run: %s" % args.id, 4)
        return run

    def _start(self, root: str, spec: dict) -> MemoryRun:
        runs = self.spools.setdefault(root, {})
        run = runs.get(spec["id"])
        if run is None:  # (an existing id: that run, its program.json not compared)
            run = runs[spec["id"]] = MemoryRun(self, root, spec)
            run._launch()
        return run

    def _cmd_start(self, args, proc: _Process, stdin: bytes) -> None:
        agent = _agent()
        doc = _program_json(stdin)
        if isinstance(doc, list):
            if not doc:
                raise agent.AgentError("program.json: expected a JSON object, or a non-empty list of them")
            if args.follow:
                raise agent.AgentError("start --follow takes one program.json, not a list")
            answers = []
            for item in doc:
                try:
                    answers.append(self._start(args.root, agent.validate_spec(item))._status())
                except agent.AgentError as e:
                    answers.append({"id": item.get("id") if isinstance(item, dict) else None, "rejected": str(e)})
            proc.marker(args.marker)
            proc.json(answers)
            return
        run = self._start(args.root, agent.validate_spec(doc))
        state = run._status()
        proc.marker(args.marker)
        proc.json(state)
        if args.follow:
            shown = (state["state"], state["pid"])
            proc.stream(lambda: self._follow(run, proc, {"stdout": 0, "stderr": 0}, shown))

    def _cmd_status(self, args, proc: _Process, stdin: bytes) -> None:
        state = self._run(args)._status()
        proc.marker(args.marker)
        proc.json(state)

    def _cmd_follow(self, args, proc: _Process, stdin: bytes) -> None:
        run = self._run(args)
        offsets = {"stdout": args.stdout_offset, "stderr": args.stderr_offset}
        if min(offsets.values()) < 0:
            raise _agent().AgentError("offsets must not be negative")
        proc.marker(args.marker)
        proc.stream(lambda: self._follow(run, proc, offsets, None))

    async def _follow(self, run: MemoryRun, proc: _Process, offsets: Dict[str, int], shown) -> None:
        """The agent's ``follow``: output from ``offsets``, never past the
        state's counts; a state frame when the state or pid changed; once
        final and all sent, the final state and the end."""
        agent = _agent()
        kinds = {"stdout": b"1", "stderr": b"2"}
        while True:
            if run._removed:  # (state.json is gone: the agent's OSError, exit 3)
                raise agent.AgentError("[Errno 2] No such file or directory: %r" % (run.state["spool"] + "/state.json"), 3)
            since = run._changed
            st = run._status()
            for name in agent.STREAMS:
                size = st[name + "_bytes"]
                while offsets[name] < size:
                    data = run._data[name][offsets[name]:min(size, offsets[name] + self.chunk)]
                    proc.frame(kinds[name], offsets[name], data)
                    offsets[name] += len(data)
                    await proc.drain()
            if st["state"] in agent.FINAL_STATES and all(offsets[n] >= st[n + "_bytes"] for n in agent.STREAMS):
                proc.frame(b"S", 0, agent.dumps(st, sort_keys=True).encode())
                proc.frame(b"E", 0)
                return
            if st["state"] not in agent.FINAL_STATES and (st["state"], st["pid"]) != shown:
                proc.frame(b"S", 0, agent.dumps(st, sort_keys=True).encode())
                shown = (st["state"], st["pid"])
            proc.seal()
            await run._wait_change(since)

    def _cmd_watch(self, args, proc: _Process, stdin: bytes) -> None:
        ids = _agent().read_watch_ids(stdin)  # (the agent's own parser, bounds and errors)
        proc.marker(args.marker)
        proc.stream(lambda: self._watch(args.root, ids, proc))

    async def _watch(self, root: str, ids: List[str], proc: _Process) -> None:
        """The agent's ``watch``: each run's final state as it becomes final
        (an ``X`` frame for a run that is not there), in the order given
        for those final at once; then the end."""
        agent = _agent()
        pending = list(ids)
        while pending:
            changes = []
            for run_id in list(pending):
                run = self.spools.get(root, {}).get(run_id)
                if run is None:
                    error = {"id": run_id, "error": "no such run: %s" % run_id, "code": 4}
                    proc.frame(b"X", 0, agent.dumps(error, sort_keys=True).encode())
                elif run.state["state"] in agent.FINAL_STATES:
                    proc.frame(b"S", 0, agent.dumps(run._status(), sort_keys=True).encode())
                else:
                    changes.append(run._changed)
                    continue
                pending.remove(run_id)
            if changes:
                waits = [asyncio.ensure_future(change.wait()) for change in changes]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        proc.frame(b"E", 0)

    def _cmd_logs(self, args, proc: _Process, stdin: bytes) -> None:
        agent = _agent()
        run = self._run(args)
        offsets = {"stdout": args.stdout_offset, "stderr": args.stderr_offset}
        if min(offsets.values()) < 0:
            raise agent.AgentError("offsets must not be negative")
        since = None
        if args.since is not None:
            if not (agent._is_num(args.since) and args.since >= 0):
                raise agent.AgentError("--since must be a time in seconds since the epoch, not negative")
            since = int(args.since * 1e6)
        proc.marker(args.marker)
        proc.stream(lambda: self._logs(run, proc, offsets, since, args.follow))

    async def _logs(self, run: MemoryRun, proc: _Process, sent: Dict[str, int], since: Optional[int],
                    follow: bool) -> None:
        """The agent's ``logs``: by the run's timeline, a ``T`` frame (when)
        before the output written by then; the state and the end; with
        ``follow``, until the run's end."""
        agent = _agent()
        kinds = {"stdout": b"1", "stderr": b"2"}
        at, last, shown = 0, [None], None
        if since is not None:
            while at < len(run.timeline) and run.timeline[at][0] < since:
                _, name, end = run.timeline[at]
                sent[name] = max(sent[name], end)
                at += 1
        while True:
            if run._removed:
                raise agent.AgentError("[Errno 2] No such file or directory: %r" % (run.state["spool"] + "/state.json"), 3)
            changed = run._changed
            st = run._status()
            for us, name, end in run.timeline[at:]:
                upto = min(end, st[name + "_bytes"])
                if sent[name] < upto:
                    us = max(us, last[0] or 0)
                    if us != last[0]:
                        proc.frame(b"T", us)
                        last[0] = us
                    while sent[name] < upto:
                        data = run._data[name][sent[name]:min(upto, sent[name] + self.chunk)]
                        proc.frame(kinds[name], sent[name], data)
                        sent[name] += len(data)
                        await proc.drain()
                at += 1
            if st["state"] in agent.FINAL_STATES or not follow:
                proc.frame(b"S", 0, agent.dumps(st, sort_keys=True).encode())
                proc.frame(b"E", 0)
                return
            if (st["state"], st["pid"]) != shown:
                proc.frame(b"S", 0, agent.dumps(st, sort_keys=True).encode())
                shown = (st["state"], st["pid"])
            proc.seal()
            await run._wait_change(changed)

    def _cmd_output(self, args, proc: _Process, stdin: bytes) -> None:
        run = self._run(args)
        if args.offset < 0 or (args.length is not None and args.length < 0):
            raise _agent().AgentError("offset and length must not be negative")
        if args.stream == "both":
            if args.offset or args.length is not None:
                raise _agent().AgentError("--stream both takes no --offset or --length")
            proc.marker(args.marker)
            st = run._status()
            data = [bytes(run._data[n][:st[n + "_bytes"]]) for n in ("stdout", "stderr")]
            proc.emit(b"%d %d\n" % tuple(len(d) for d in data) + b"".join(data) + _agent().counted_end(args.marker))
            return
        proc.marker(args.marker)
        upto = run._status()[args.stream + "_bytes"]
        end = upto if args.length is None else min(upto, args.offset + args.length)
        data = bytes(run._data[args.stream][args.offset:max(args.offset, end)])
        counted = getattr(args, "counted", False)
        proc.emit((b"%d\n" % len(data) if counted else b"") + data + (_agent().counted_end(args.marker) if counted else b""))

    def _cmd_signal(self, args, proc: _Process, stdin: bytes) -> None:
        agent = _agent()
        sig = agent.parse_signal(args.signal)
        if args.grace is not None and not (agent._is_num(args.grace) and args.grace >= 0):
            raise agent.AgentError("--grace must be a finite number of seconds, not negative")
        run = self._run(args)
        if not run.running or run._task is None:
            # (as the agent: nothing a memory program leaves behind runs on)
            why = "; its process group was not signalled: nothing of it runs any more" \
                if run.state["state"] in ("done", "lost") else ""
            raise agent.AgentError("run %s is not running (%s)%s" % (run.id, run.state["state"], why), 1)
        # Written to the FIFO now, acted on by the supervisor a moment later.
        asyncio.get_running_loop().call_soon(run._control, {"op": "signal", "signal": sig, "grace": args.grace})
        proc.marker(args.marker)
        proc.json(run._status())

    def _cmd_control(self, args, proc: _Process, stdin: bytes) -> None:
        agent = _agent()
        run = self._run(args)
        if len(stdin) > agent.MAX_CONTROL:
            raise agent.AgentError("control message is too large (over %d bytes)" % agent.MAX_CONTROL)
        msg = agent.parse_json(stdin, "control message")  # (the agent's own parser, bounds and errors)
        if not isinstance(msg, dict) or msg.get("op") not in ("callback", "release"):
            raise agent.AgentError("control message: unknown op")
        if msg["op"] == "callback" and not all(isinstance(msg.get(k), str) for k in ("url", "token", "cert")
                                               if k in msg):
            raise agent.AgentError("control message: url, token and cert must be strings")
        delivered = run.running and run._task is not None
        if delivered:
            run._control(msg)
        proc.marker(args.marker)
        proc.json({"delivered": delivered})

    def _cmd_release(self, args, proc: _Process, stdin: bytes) -> None:
        delivered = {}
        for run_id in _agent().read_watch_ids(stdin):
            run = self.spools.get(args.root, {}).get(run_id)
            delivered[run_id] = run is not None and run.running and run._task is not None
            if delivered[run_id]:
                run._control({"op": "release"})
        proc.marker(args.marker)
        proc.json({"delivered": delivered})

    def _cmd_stdin(self, args, proc: _Process, stdin: bytes) -> None:
        run = self._run(args)
        if run.spec["program"]["stdin"] != {"stream": True}:
            raise _agent().AgentError("run %s does not read its stdin from a stream (program.stdin is not "
                                      "{\"stream\": true})" % run.id, _agent().NOT_A_STREAM)
        proc.marker(args.marker)
        proc.stream(lambda: self._stdin(run, proc))

    async def _stdin(self, run: MemoryRun, proc: _Process) -> None:
        """The agent's ``stdin``: frames appended by offset, an answer
        (StdinAck) first and after each."""
        agent = _agent()

        def answer():
            return {"held": len(run.stdin), "end": run.stdin_end is not None,
                    "closed": not run.running or run._task is None, "tty": run.spec["program"].get("tty") is not None}

        last = answer()
        proc.json(last)
        while not last["closed"]:
            head = await proc.take(agent.FRAME.size)
            if len(head) < agent.FRAME.size:
                return
            kind, offset, length = agent.FRAME.unpack(head)
            if kind not in agent.STDIN_KINDS or length > agent.MAX_STDIN_FRAME:
                raise agent.AgentError("stdin of run %s: not a frame (kind %r, %d bytes)" % (run.id, kind, length))
            data = await proc.take(length)
            if len(data) < length:
                return
            if kind == b"D":
                run._append_stdin(offset, data)
            else:
                run._end_stdin(offset)
            last = answer()
            proc.json(last)

    def _cmd_list(self, args, proc: _Process, stdin: bytes) -> None:
        runs = self.spools.get(args.root, {})
        proc.marker(args.marker)
        proc.json([runs[run_id]._status() for run_id in sorted(runs)])

    def _cmd_procs(self, args, proc: _Process, stdin: bytes) -> None:
        """The agent's ``procs``: a running program is one process (its
        children are not modelled here)."""
        run = self._run(args)
        st = run._status()
        proc.marker(args.marker)
        procs = []
        if run.running:
            procs.append({"pid": st.get("pid") or 0, "ppid": st.get("agent_pid") or 0, "pgid": st.get("pgid") or 0,
                          "state": "S", "cpu": 0.0, "rss": 0, "elapsed": 0.0,
                          "argv": list(run.spec["program"]["argv"])})
        proc.json(procs)

    def _cmd_clean(self, args, proc: _Process, stdin: bytes) -> None:
        run = self._run(args)
        if run.running:
            if not args.force:
                raise _agent().AgentError("run %s is running: kill it first, or clean --force (force=True in the "
                                          "library)" % run.id, 1)
            run._deliver("SIGKILL")
        state = run.state["state"]
        self.remove(run.id, args.root)
        proc.marker(args.marker)
        proc.json({"id": run.id, "cleaned": True, "state": state})

    # The host's clock and environment ---------------------------------------------

    def _time(self) -> float:
        """Seconds since the epoch on the event loop's clock."""
        loop = asyncio.get_running_loop()
        if self._clock is None:
            self._clock = (time.time(), loop.time())
        return self._clock[0] + loop.time() - self._clock[1]

    def _now_us(self) -> int:
        return int(self._time() * 1e6)

    def _now(self) -> str:
        """ISO 8601 UTC as the agent writes it, on the event loop's clock
        (so a virtual clock's hours show in start and end times)."""
        t = self._time()
        secs = int(t // 1)
        micros = int(round((t - secs) * 1e6))
        if micros >= 1000000:
            secs, micros = secs + 1, micros - 1000000
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        return text + (".%06d" % micros if micros else "") + "+00:00"

    def _environment(self, prog: dict) -> Dict[str, str]:
        """The program's environment, as the agent's ``build_env`` makes it
        from this host's :attr:`environ`."""
        inherit = prog["env_inherit"]
        if inherit is True:
            env = dict(self.environ)
        elif inherit is False:
            env = {}
        else:
            env = {k: self.environ[k] for k in inherit if k in self.environ}
        env.pop("CHAPERONE_SPOOL", None)
        for k, v in prog["env"].items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def __repr__(self) -> str:
        return "<MemoryHost %s: %d runs>" % (self.name, sum(len(r) for r in self.spools.values()))


def _program_json(data: bytes):
    """What the agent's ``read_program_json`` makes of its stdin."""
    agent = _agent()
    if len(data) > agent.MAX_PROGRAM_JSON:
        raise agent.AgentError("program.json is too large (over %d bytes)" % agent.MAX_PROGRAM_JSON)
    if not data.strip():
        raise agent.AgentError("program.json is empty")
    try:
        return agent.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise agent.AgentError("program.json is not valid JSON: %s" % str(e).splitlines()[0])


class MemoryTransport(Transport):
    """The transport to a :class:`MemoryHost`: pass it to
    ``Chaperone(transports={"NAME": MemoryTransport(host)})`` and every
    agent call to host ``NAME`` is answered by ``host``."""

    def __init__(self, host: MemoryHost):
        self.memory = host
        self.host = host.name

    async def open(self, args: List[str], stdin: bytes = b"", *, keep_stdin: bool = False) -> AgentProcess:
        return await self.memory.open(args, stdin, keep_stdin=keep_stdin)

    def describe(self) -> dict:
        return {"host": self.host, "memory": True}


# A clock that jumps over idle time ----------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never waits for a timer: it moves the loop's clock instead."""

    #: Real seconds to wait for I/O (threads, subprocesses) when no timer
    #: is due, before the loop is declared stuck.
    STUCK = 10.0

    def __init__(self, advance: Callable[[float], None]):
        super().__init__()
        self._advance = advance

    def select(self, timeout: Optional[float] = None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timer at all: only real I/O can wake the loop
            ready = super().select(self.STUCK)
            if not ready:
                raise RuntimeError("the event loop is stuck: every task waits for something that never comes "
                                   "and no timer is due")
            return ready
        self._advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose :meth:`time` is virtual: it starts at 0 and,
    whenever no callback is ready, jumps to the next timer at once (as
    trio's ``MockClock(autojump_threshold=0)``).  Sleeps, timeouts and
    backoffs cost no real time; real I/O still works."""

    def __init__(self) -> None:
        self._virtual = 0.0
        super().__init__(_JumpingSelector(self._jump))

    def _jump(self, seconds: float) -> None:
        self._virtual += seconds

    def time(self) -> float:
        return self._virtual


def run_virtual(main: Awaitable, *, timeout: Optional[float] = None):
    """Run ``main`` to completion on a new :class:`VirtualClockLoop` (as
    :func:`asyncio.run`; ``timeout``: virtual seconds, then
    :class:`asyncio.TimeoutError`)."""
    loop = VirtualClockLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main if timeout is None else asyncio.wait_for(main, timeout))
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
