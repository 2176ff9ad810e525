"""Agent commands over any transport: start, status, follow, signal, clean."""

from __future__ import annotations

import json
import secrets
from typing import AsyncIterator, Dict, List, Optional

from .errors import AgentFailed, ChaperoneError, ConnectionLost, ForeignBytes, NoSuchRun
from .protocol import NO_MARKER, AfterMarker, Event, ProtocolError, StateUpdate, StreamDecoder, payload_after_marker
from .transports.base import AgentProcess, Transport, write_all

#: Exit status of the agent for "no such run" (see remote/agent.py).
AGENT_NO_SUCH_RUN = 4
#: ... for ``stdin ID`` of a run whose input is not a stream.
AGENT_NOT_A_STREAM = 5


def _marker() -> str:
    return "CHAPERONE-" + secrets.token_hex(8)


def _end_of(marker: str) -> bytes:
    """What follows a counted reply's bytes (the agent's counted_end)."""
    return b"\n" + marker.encode() + b"\n"


CUT = ("bytes that are not the agent's came in its reply (something else writes to the session's output: a job "
       "the login scripts left running?); what was given out may hold them")


class _Reply:
    """An agent call's stdout past its marker, read as needed."""

    def __init__(self, proc: AgentProcess, marker: str):
        self.proc, self.marker = proc, marker
        self.after = AfterMarker(marker)
        self.buf = b""

    async def _more(self) -> bool:
        chunk = await self.proc.read(1 << 16)
        if not chunk:
            return False
        self.buf += self.after.feed(chunk)
        return True

    async def line(self) -> Optional[bytes]:
        while b"\n" not in self.buf:
            if not await self._more():
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    async def take(self, most: int) -> bytes:
        """Up to ``most`` bytes (b"" at the end)."""
        if not self.buf and not await self._more():
            return b""
        chunk, self.buf = self.buf[:most], self.buf[most:]
        return chunk

    async def end(self, client: "AgentClient", left: int) -> None:
        """After the counted bytes (``left`` of them missing): the end
        marker must follow; the rest is read and dropped; the agent's exit."""
        want = _end_of(self.marker)
        while not left and len(self.buf) < len(want) and await self._more():
            pass
        ok = self.buf.startswith(want)
        while await self.proc.read(1 << 16):  # (what follows the reply: not the run's)
            pass
        await client._ended(self.proc, self.after)
        if left:
            raise ConnectionLost("connection to %s lost: %d bytes short" % (client.transport.host, left))
        if not ok:
            raise ConnectionLost("the agent's reply from %s was cut: %s" % (client.transport.host, CUT))


class AgentClient:
    def __init__(self, transport: Transport):
        self.transport = transport

    async def _run(self, args: List[str], stdin: bytes = b"") -> bytes:
        marker = _marker()
        proc = await self.transport.open(["--marker", marker, *args], stdin)
        chunks = []
        try:
            while True:
                chunk = await proc.read()
                if not chunk:
                    break
                chunks.append(chunk)
            code = await proc.wait()
            if code != 0:
                raise self._failure(code, await proc.stderr())
        finally:
            proc.close()
        data = b"".join(chunks)
        try:
            return payload_after_marker(data, marker)
        except ProtocolError as e:
            raise ChaperoneError(str(e)) from None

    def _failure(self, code: int, stderr: bytes) -> ChaperoneError:
        lines = [l for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
        message = lines[-1] if lines else "the agent exited with status %d" % code
        message = message.replace("chaperone-agent: ", "", 1)
        if code == AGENT_NO_SUCH_RUN:
            return NoSuchRun(message)
        if code in (126, 127) or "python" in message and "not found" in message:
            return ChaperoneError("cannot run the agent on %s: %s" % (self.transport.host, message))
        if code == 255 or code is None or code < 0:
            return ConnectionLost("connection to %s lost: %s" % (self.transport.host, message))
        if not lines:  # (the agent always says why: what exited silently was not the agent)
            return ChaperoneError("cannot run the agent on %s: its interpreter exited with status %d and said "
                                  "nothing (is --python a Python 3 interpreter there?)" % (self.transport.host, code))
        return AgentFailed(message, code)

    async def _json(self, args: List[str], stdin: bytes = b""):
        payload = await self._run(args, stdin)
        try:
            return json.loads(payload.split(b"\n", 1)[0])
        except ValueError as e:
            raise ChaperoneError("the agent sent invalid JSON: %s" % e) from None

    async def start(self, program_json: bytes) -> dict:
        return await self._json(["start"], program_json)

    async def start_many(self, programs: List[bytes]) -> List[dict]:
        """Start several runs with one agent call (one channel, one Python
        start-up on the host).  Each answer is a state, or ``{"id": ...,
        "rejected": message}`` for a program.json the agent refused."""
        return await self._json(["start"], b"[" + b",".join(programs) + b"]")

    async def status(self, run_id: str) -> dict:
        return await self._json(["status", run_id])

    async def list(self) -> List[dict]:
        return await self._json(["list"])

    async def procs(self, run_id: str) -> List[dict]:
        """The run's processes on its host now (the agent's ``procs``)."""
        return await self._json(["procs", run_id])

    async def signal(self, run_id: str, sig: str, grace: Optional[float] = None) -> dict:
        args = ["signal", run_id, str(sig)]
        if grace is not None:
            args += ["--grace", repr(float(grace))]
        return await self._json(args)

    async def clean(self, run_id: str, force: bool = False) -> dict:
        return await self._json(["clean", run_id] + (["--force"] if force else []))

    async def control(self, run_id: str, message: bytes) -> dict:
        return await self._json(["control", run_id], message)

    async def release(self, run_ids: List[str]) -> Dict[str, bool]:
        """Tell the supervisors of these runs to stop calling back (one
        call for all): whether each got it."""
        answer = await self._json(["release"], " ".join(run_ids).encode())
        return answer.get("delivered", {}) if isinstance(answer, dict) else {}

    async def output(self, run_id: str, stream: str, offset: int = 0, length: Optional[int] = None) -> bytes:
        args = ["output", run_id, "--stream", stream, "--offset", str(offset)]
        if length is not None:
            args += ["--length", str(length)]
        return b"".join([chunk async for chunk in self._counted(args + ["--counted"])])

    async def output_stream(self, run_id: str, stream: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The bytes of a spool file from ``offset`` to its current end, as
        they arrive (one agent call, nothing held in memory)."""
        async for chunk in self._counted(["output", run_id, "--stream", stream, "--offset", str(offset),
                                          "--counted"]):
            yield chunk

    async def _counted(self, args: List[str]) -> AsyncIterator[bytes]:
        """A counted reply's bytes as they come: past the marker, a line
        with the count, that many bytes, then the marker again, which must
        follow them at once (else something else wrote into them: a job a
        login script left running; :class:`ConnectionLost`, as the bytes
        given out may not be the run's); what follows it is dropped."""
        marker = _marker()
        reader = _Reply(await self.transport.open(["--marker", marker, *args]), marker)
        try:
            line = await reader.line()
            if line is None or not line.isdigit():
                await self._ended(reader.proc, reader.after)
                raise ChaperoneError("the agent's reply to %s has no count" % " ".join(args[:2]))
            left = int(line)
            while left:
                chunk = await reader.take(left)
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
            await reader.end(self, left)
        finally:
            reader.proc.close()

    async def output_to(self, run_id: str, stream: str, fd: int, offset: int = 0) -> int:
        """:meth:`output_stream` written to ``fd`` (blocking writes): past
        the marker, a line with the count, then that many bytes, from the
        transport's pipe straight to ``fd`` where it can
        (:meth:`AgentProcess.copy_to`); whatever follows them (a job a
        login script left behind, printing late) is not written.  The
        number of bytes written."""
        args = ["output", run_id, "--stream", stream, "--offset", str(offset), "--counted"]
        return (await self._counted_to(args, [fd]))[0]

    async def output_both_to(self, run_id: str, fds: Dict[str, int]) -> Dict[str, int]:
        """Both streams in one call (``output --stream both``), each to its
        file descriptor in ``fds`` (blocking writes; from the transport's
        pipe straight to it where it can); the bytes of each."""
        got = await self._counted_to(["output", run_id, "--stream", "both"], [fds["stdout"], fds["stderr"]])
        return dict(zip(("stdout", "stderr"), got))

    async def _counted_to(self, args: List[str], fds: List[int]) -> List[int]:
        """An agent reply that is a line of counts (one per fd) and then
        that many bytes for each in turn: each part written to its fd, what
        follows them read and dropped; the bytes of each."""
        marker = _marker()
        after = AfterMarker(marker)
        what = "the agent's reply to output %s" % " ".join(args[2:4])
        proc = await self.transport.open(["--marker", marker, *args])
        try:
            head, sizes, rest = b"", None, b""
            while sizes is None:  # (the marker, then the line of counts)
                chunk = await proc.read(1 << 16)
                if not chunk:
                    break
                head += after.feed(chunk)
                line, nl, rest = head.partition(b"\n")
                if nl:
                    fields = line.split()
                    if len(fields) != len(fds) or not all(f.isdigit() for f in fields):
                        raise ChaperoneError("%s has no counts" % what)
                    sizes = [int(f) for f in fields]
            got = []
            for fd, size in zip(fds, sizes or ()):
                first, rest = rest[:size], rest[size:]
                write_all(fd, first)
                n = len(first)
                if n < size:
                    n += await proc.copy_to(fd, size - n)
                got.append(n)
            end = _end_of(marker)
            while sizes is not None and got == sizes and len(rest) < len(end):
                chunk = await proc.read(1 << 16)
                if not chunk:
                    break
                rest += chunk
            while await proc.read(1 << 16):  # (what follows the reply: not the run's)
                pass
            await self._ended(proc, after)
            if sizes is None:
                raise ChaperoneError("%s has no counts" % what)
            if got != sizes:
                raise ConnectionLost("connection to %s lost: %d of %d bytes came"
                                     % (self.transport.host, sum(got), sum(sizes)))
            if not rest.startswith(end):
                raise ConnectionLost("the agent's reply from %s was cut: %s" % (self.transport.host, CUT))
            return got
        finally:
            proc.close()

    async def _ended(self, proc: AgentProcess, after: AfterMarker) -> None:
        """The end of a reply read to its end: the agent's failure, or a
        reply that never had its marker, as errors."""
        code = await proc.wait()
        if code != 0:
            raise self._failure(code, await proc.stderr())
        if not after.found:
            raise ChaperoneError(NO_MARKER)

    async def _events(self, args: List[str], stdin: bytes, json_line: bool) -> AsyncIterator[Event]:
        marker = _marker()
        proc: AgentProcess = await self.transport.open(["--marker", marker, *args], stdin)
        decoder = StreamDecoder(marker, json_line=json_line, framed=True)
        try:
            while not decoder.ended:
                chunk = await proc.read()
                if not chunk:
                    break
                for event in decoder.feed(chunk):
                    yield event
            if decoder.ended:
                return
            code = await proc.wait()
            if code != 0:
                raise self._failure(code, await proc.stderr())
            # The agent exited cleanly without its end frame: not a broken
            # connection (worth retrying) but a broken agent.
            raise ChaperoneError("the agent on %s ended its output stream early" % self.transport.host)
        except ForeignBytes as e:  # (what came before them was whole: read on from the spool)
            raise ConnectionLost("the agent's reply from %s was cut: %s" % (self.transport.host, e)) from None
        except ProtocolError as e:
            raise ChaperoneError(str(e)) from None
        finally:
            proc.close()

    def start_follow(self, program_json: bytes) -> AsyncIterator[Event]:
        """Start a run and stream its events: its state, output, final state."""
        return self._events(["start", "--follow"], program_json, json_line=True)

    async def open_stdin(self, run_id: str) -> "StdinCall":
        """An ``agent.py stdin`` call to append to the input of ``run_id``
        (a run whose stdin is a stream), its stdin kept open for frames."""
        marker = _marker()
        proc = await self.transport.open(["--marker", marker, "stdin", run_id], b"", keep_stdin=True)
        return StdinCall(self, proc, marker)

    def follow(self, run_id: str, offsets: Optional[Dict[str, int]] = None) -> AsyncIterator[Event]:
        """Stream a run's output from ``offsets`` until its final state."""
        offsets = offsets or {}
        args = [
            "follow", run_id,
            "--stdout-offset", str(offsets.get("stdout", 0)),
            "--stderr-offset", str(offsets.get("stderr", 0)),
        ]
        return self._events(args, b"", json_line=False)

    def logs(self, run_id: str, offsets: Optional[Dict[str, int]] = None, *, since: Optional[float] = None,
             follow: bool = False) -> AsyncIterator[Event]:
        """Both streams from ``offsets`` in the order they were written (the
        run's timeline): :class:`~chaperone.protocol.Written` before the
        output written by then, the state, :class:`End`.  ``since``:
        seconds since the epoch; ``follow``: until the run's end."""
        offsets = offsets or {}
        args = ["logs", run_id, "--stdout-offset", str(offsets.get("stdout", 0)),
                "--stderr-offset", str(offsets.get("stderr", 0))]
        if since is not None:
            args += ["--since", repr(float(since))]
        if follow:
            args.append("--follow")
        return self._events(args, b"", json_line=False)

    def watch(self, run_ids: List[str]) -> AsyncIterator[Event]:
        """One call for many runs: each run's final state
        (:class:`StateUpdate`) as it becomes final, or a
        :class:`~chaperone.protocol.RunError` for a run that cannot be read,
        then :class:`End` once every run was answered."""
        return self._events(["watch"], " ".join(run_ids).encode(), json_line=False)


class StdinCall:
    """One ``agent.py stdin`` call: frames out (:meth:`send`), the answers
    (StdinAck: ``held``, ``end``, ``closed``) in, first one and one per
    frame (:meth:`answer`)."""

    def __init__(self, client: AgentClient, proc: AgentProcess, marker: str):
        self.client = client
        self.proc = proc
        self._after = AfterMarker(marker)
        self._buf = b""

    async def answer(self) -> Optional[dict]:
        """The next answer; None when the agent ended without error (it
        does once the run is over, or its stdin closed)."""
        while True:
            line, nl, rest = self._buf.partition(b"\n")
            if nl:
                self._buf = rest
                try:
                    return json.loads(line)
                except ValueError as e:
                    raise ChaperoneError("the agent sent invalid JSON: %s" % e) from None
            chunk = await self.proc.read()
            if not chunk:
                await self.client._ended(self.proc, self._after)
                return None
            self._buf += self._after.feed(chunk)

    async def send(self, kind: bytes, offset: int, data: bytes = b"") -> None:
        from .protocol import FRAME

        await self.proc.write(FRAME.pack(kind, offset, len(data)) + bytes(data))

    async def finish(self) -> None:
        """No more frames: the agent ends once it answered them all."""
        await self.proc.write_eof()

    def close(self) -> None:
        self.proc.close()


__all__ = ["AgentClient", "StateUpdate", "StdinCall"]
