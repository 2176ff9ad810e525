"""HTTPS callbacks end to end: the agent pushes output and state to the
scheduler through an SSH remote forward, exactly once, across cuts of the
callback path and restarts of the scheduler.  Real sshd, real TLS, real
processes."""

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from support.helpers import run_async

from chaperone.api import Chaperone
from chaperone.push.certs import cert_pem, ensure_certificate

# Writes `blocks` MiB of deterministic bytes to stdout, a little at a time,
# then the sha256 of all of it to stderr.
WRITER = textwrap.dedent("""
    import hashlib, os, sys, time
    blocks, pause = int(sys.argv[1]), float(sys.argv[2])
    h = hashlib.sha256()
    seed = b"chaperone"
    for i in range(blocks):
        block = hashlib.sha256(seed + str(i).encode()).digest() * 32768  # 1 MiB
        h.update(block)
        sys.stdout.buffer.write(block)
        sys.stdout.buffer.flush()
        time.sleep(pause)
    sys.stderr.write(h.hexdigest())
""")

FAST = {"retry_frequency": 0.5, "output_latency": 0.05}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ssh_client", ["openssh", "asyncssh"])
def test_exactly_once_while_the_callback_path_is_cut(sshd, tmp_path, ssh_client):
    """100 MB through the callback path while the SSH connection that
    carries the tunnel is killed server-side three times: the mirror ends
    with exactly the program's bytes (sha256), nothing twice, nothing lost.
    With either SSH client carrying the tunnel."""
    woken = []

    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(sshd.config_file)], config=FAST,
                             heal_interval=0.3, ssh_client=ssh_client) as ch:
            push = ch.push
            wake = push.wake
            push.wake = lambda rid: (woken.append(rid), wake(rid))
            run = await ch.start("testhost", ["python3", "-c", WRITER, "100", "0.03"])
            rid = run.id
            tunnels = []
            for _ in range(3):
                await asyncio.sleep(1.0)
                tunnels.append(push.tunnel(rid))
                killed = sshd.kill_sessions()
                assert killed, "no SSH session to cut"
            st = await run.wait()
            m = push.mirror(rid)
            out = m.read("stdout")
            err = m.read("stderr")
            # The tunnel comes back after the last cut too (the run may
            # have ended before that: its end came by catch-up then).
            for _ in range(200):
                new_tunnel = push.tunnel(rid)
                if not new_tunnel.closed():
                    break
                await asyncio.sleep(0.05)
            return st, out, err, tunnels, new_tunnel, new_tunnel.closed()

    st, out, err, tunnels, new_tunnel, new_closed = run_async(main())
    assert st.state == "done" and st.return_code == 0
    assert len(out) == 100 << 20 == st.stdout_bytes
    assert sha(out) == err.decode()
    # The faults really happened, and the tunnel came back each time.
    assert all(t.closed() for t in tunnels)
    assert not new_closed
    assert len(set(map(id, tunnels))) >= 2
    assert woken  # output arrived through the callbacks, not only by catch-up


SCHEDULER_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from chaperone import Chaperone
    async def main():
        ch = Chaperone(sys.argv[1], push=True, ssh_config=[sys.argv[2]], config={"retry_frequency": 0.5})
        await ch.open()
        run = await ch.start("testhost", ["sh", "-c", "for i in $(seq 1 60); do echo line $i; sleep 0.05; done"],
                             id=sys.argv[3], ssh={"spool": sys.argv[4]})
        print(run.id, flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
""")


@pytest.mark.timeout(120)
def test_scheduler_restarted_mid_run_reattaches(sshd, tmp_path):
    """The scheduler process is SIGKILLed mid-run; a new one re-attaches by
    id from the records and ends with all of the output, once."""
    home = tmp_path / "home"
    rid = "restart-" + uuid.uuid4().hex[:8]
    proc = subprocess.Popen([sys.executable, "-c", SCHEDULER_SCRIPT, str(home), str(sshd.config_file),
                             rid, str(tmp_path / "spool")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == rid
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    updates = []

    async def main():
        async with Chaperone(home, push=True, ssh_config=[str(sshd.config_file)],
                             on_update=lambda rid, st: updates.append((rid, st.state))) as ch:
            ids = await ch.reattach()
            st = await ch.wait(rid)
            return ids, st, ch.push.mirror(rid).read("stdout")

    ids, st, out = run_async(main())
    assert ids == [rid]
    assert st.state == "done" and st.return_code == 0
    assert out == b"".join(b"line %d\n" % i for i in range(1, 61))
    assert (rid, "done") in updates


@pytest.mark.timeout(60)
def test_agent_refuses_a_certificate_other_than_the_pinned_one(tmp_path):
    """The agent is told to pin another certificate: the real server's TLS
    handshake fails on the agent's side, so the server gets no request at
    all; the run is unharmed and catch-up from the spool still has it all."""
    other_cert, _ = ensure_certificate(tmp_path / "other")
    seen = []

    async def main():
        async with Chaperone(tmp_path / "home", push=True, config=FAST) as ch:
            push = ch.push
            token = push.server.register("pin-1", push.mirror("pin-1"),
                                         on_state=lambda *a: seen.append(a),
                                         on_output=lambda *a: seen.append(a))
            callback = {"url": push.server.url, "token": token, "cert": cert_pem(other_cert)}
            run = await ch.start("local", ["sh", "-c", "echo pinned; exit 3"], id="pin-1",
                                 callback=callback, config={**FAST, "callback_timeout": 2})
            st = await ch.wait(run.id)
            await asyncio.sleep(1.5)  # the agent keeps trying for callback_timeout
            held_before = push.mirror("pin-1").held("stdout")
            caught = await push.catch_up("pin-1")
            return st, held_before, caught, push.mirror("pin-1").read("stdout")

    st, held_before, caught, out = run_async(main())
    assert st.state == "done" and st.return_code == 3
    assert seen == [] and held_before == 0
    assert caught["state"] == "done" and out == b"pinned\n"


@pytest.mark.timeout(60)
def test_callbacks_never_slow_or_fail_the_program(tmp_path):
    """An unreachable scheduler (nothing listens) changes nothing for the
    program or the spool: same exit status, all bytes spooled, promptly."""
    cert, _ = ensure_certificate(tmp_path / "tls")
    port = _free_port()

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            callback = {"url": "https://127.0.0.1:%d/api/v1/agent/" % port, "token": "t" * 43,
                        "cert": cert_pem(cert)}
            t0 = time.monotonic()
            run = await ch.start("local", ["sh", "-c", "head -c 5000000 /dev/zero; exit 4"],
                                 callback=callback, config={"retry_frequency": 0.2, "callback_timeout": 1})
            st = await ch.wait(run.id)
            return st, time.monotonic() - t0, await ch.read(run.id, "stdout", 0)

    st, elapsed, out = run_async(main())
    assert st.state == "done" and st.return_code == 4
    assert out == bytes(5000000)
    assert elapsed < 10


@pytest.mark.timeout(60)
def test_on_update_and_output_stream_for_a_local_run(tmp_path):
    """The library API: output chunks as they arrive, on_update on each
    change, wait() for the result."""
    updates = []

    async def main():
        async with Chaperone(tmp_path / "home", push=True, config=FAST,
                             on_update=lambda rid, st: updates.append(st.state)) as ch:
            run = await ch.start("local", "for i in 1 2 3; do echo $i; sleep 0.2; done; exit 2")
            chunks = [c async for c in run.output(follow=True)]
            st = await run.wait()
            return chunks, st

    chunks, st = run_async(main())
    assert b"".join(chunks) == b"1\n2\n3\n"
    assert st.return_code == 2
    assert updates[0] == "running" and updates[-1] == "done"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_a_supervisor_still_owing_callbacks_ends_on_sigterm(tmp_path):
    """Once the program ended (final state on disk) a supervisor retrying
    callbacks to a scheduler that is gone obeys SIGTERM instead of
    forwarding it to nobody: it would otherwise linger for callback_timeout."""
    import psutil

    cert, _ = ensure_certificate(tmp_path / "tls")
    callback = {"url": "https://127.0.0.1:%d/api/v1/agent/" % _free_port(), "token": "t" * 43,
                "cert": cert_pem(cert)}

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            run = await ch.start("local", ["sh", "-c", "echo done"], callback=callback,
                                 config={"retry_frequency": 0.2})  # callback_timeout: a day
            return await ch.wait(run.id)

    st = run_async(main())
    assert st.state == "done" and st.return_code == 0
    sup = psutil.Process(st.agent_pid)
    assert sup.is_running() and sup.status() != psutil.STATUS_ZOMBIE  # still retrying
    sup.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if sup.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        sup.kill()
        raise AssertionError("the supervisor ignored SIGTERM")


@pytest.mark.timeout(60)
def test_agent_batches_output_by_buffer_and_sends_heartbeats(tmp_path):
    """The agent's side of the callbacks: no body over ``output_buffer``
    bytes, all of them in order; and heartbeats (state updates) while the
    program runs quietly, before the one final ``completed``."""
    from chaperone.push.endpoint import CallbackServer
    from chaperone.push.mirror import OutputMirror

    bodies, states = [], []

    async def main():
        server = CallbackServer()
        await server.start(cert_dir=tmp_path / "tls")
        try:
            mirror = OutputMirror(tmp_path / "mirror")
            token = server.register("hb-1", mirror,
                                    on_state=lambda rid, st, final: states.append((st.state, final)),
                                    on_output=lambda rid, stream, held: bodies.append((stream, held)))
            async with Chaperone(tmp_path / "home") as ch:
                run = await ch.start(
                    "local", ["sh", "-c", "head -c 20000 /dev/zero; sleep 1.5; printf end"], run_id="hb-1",
                    callback={"url": server.url, "token": token, "cert": server.cert_pem, "heartbeat": 0.3},
                    config={"output_buffer": 4096, "output_latency": 0.05, "retry_frequency": 0.2})
                await ch.wait(run.id)
            for _ in range(100):
                if states and states[-1][1]:
                    break
                await asyncio.sleep(0.05)
            return mirror.read("stdout")
        finally:
            await server.stop()

    out = run_async(main())
    assert out == bytes(20000) + b"end"
    helds = [held for stream, held in bodies if stream == "stdout"]
    assert helds == sorted(helds) and helds[-1] == 20003
    steps = [b - a for a, b in zip([0] + helds, helds)]
    assert max(steps) <= 4096 and len(helds) >= 5  # never a body over output_buffer
    running = [s for s, final in states if not final]
    assert len(running) >= 3, states  # started + heartbeats during the 1.5 s sleep
    assert [s for s, final in states if final] == ["done"]


def test_callback_bodies_fit_the_endpoint(tmp_path):
    """An output_buffer the endpoint would refuse (413) would have the
    agent retry the same body forever: the scheduler makes room for its own
    default and refuses a larger one per run, before anything starts."""
    from chaperone.errors import UsageError

    async def main():
        async with Chaperone(tmp_path / "home", push=True, config={"output_buffer": 96 << 20}) as ch:
            assert ch.push.server.max_body >= 96 << 20
            with pytest.raises(UsageError, match="output_buffer"):
                await ch.start("local", ["true"], config={"output_buffer": 256 << 20})
            assert list(ch.records.all()) == []
            run = await ch.start("local", ["sh", "-c", "head -c 20000000 /dev/zero"])
            st = await run.wait()
            assert st.stdout_bytes == 20000000 == ch.push.mirror(run.id).held("stdout")

    run_async(main())


def test_a_run_caught_up_from_its_spool_is_released(tmp_path):
    """The callbacks cannot get through (a dead address); wait() ends by
    catching up from the spool, then tells the agent to stop trying: its
    supervisor exits at once instead of retrying for callback_timeout."""
    from support.sshd import free_port

    def dead_url():  # nothing listens there: every callback is refused
        return "https://127.0.0.1:%d/api/v1/agent/" % free_port()

    async def main():
        async with Chaperone(tmp_path / "home", push=True, callback_url=dead_url(), config=FAST) as ch:
            run = await ch.start("local", ["sh", "-c", "echo caught up"])
            st = await ch.push.wait(run.id, safety_net=0.5)
            assert not ch.push.server.completed(run.id)
            return st, ch.push.mirror(run.id).read("stdout")

    st, out = run_async(main(), timeout=60)
    assert (st["state"], st["return_code"], out) == ("done", 0, b"caught up\n")
    pid = st["agent_pid"]
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the released supervisor still runs"
        time.sleep(0.05)


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_large_callback_bodies_are_streamed_not_held(tmp_path):
    """48 MiB bodies (output_buffer): the supervisor reads and sends each a
    MiB at a time, so its peak memory stays far below one body, and the
    mirror gets every byte."""
    size = 150 << 20

    async def main():
        async with Chaperone(tmp_path / "home", push=True,
                             config={"output_buffer": 48 << 20, "output_latency": 0.5}) as ch:
            run = await ch.start("local", [sys.executable, "-c", WRITER, str(size >> 20), "0"])
            pid = run.state.agent_pid
            peak = 0
            waiting = asyncio.ensure_future(run.wait())
            while not waiting.done():
                try:
                    with open("/proc/%d/status" % pid) as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                peak = max(peak, int(line.split()[1]) << 10)
                except OSError:
                    pass
                await asyncio.sleep(0.02)
            st = await waiting
            m = ch.push.mirror(run.id)
            return st, m.read("stdout"), m.read("stderr"), peak

    st, out, err, peak = run_async(main(), timeout=120)
    assert st.state == "done" and st.stdout_bytes == size == len(out)
    assert err.decode() == sha(out)
    assert 0 < peak < 40 << 20, peak


def test_scheduler_is_chaperone_with_push(tmp_path):
    """The earlier name: ``Scheduler(...)`` is ``Chaperone(push=True, ...)``
    and its ``start`` takes ``argv`` or ``command=``."""
    from chaperone.scheduler import Scheduler

    async def main():
        async with Scheduler(tmp_path / "home", config=FAST) as s:
            assert isinstance(s, Chaperone) and s.push is not None
            run = await s.start("local", command="echo $((6 * 7))")
            st = await s.wait(run)
            return st, s.push.mirror(run.id).read("stdout")

    st, out = run_async(main(), timeout=60)
    assert (st.state, st.return_code, out) == ("done", 0, b"42\n")


class _ScriptedServer:
    """A bare HTTPS server (a thread, ssl and sockets: no aiohttp) that
    records what the agent sends and when: which output requests were
    already on the wire before the answer to the one before them went out.
    Output is stored by offset, as the endpoint does; ``first_answer``
    overrides the answer to the first output body."""

    def __init__(self, tmp_path, first_answer=None):
        import socket
        import ssl
        import threading

        cert, key = ensure_certificate(tmp_path / "scripted-tls")
        self.cert = cert_pem(cert)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "https://127.0.0.1:%d/api/v1/agent/" % self.sock.getsockname()[1]
        self.first_answer = first_answer
        self.data = bytearray()
        self.outputs = []  # (connection number, offset, length, pipelined: sent before the last answer)
        self.completed = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        import select

        n = 0
        while not self.completed.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            try:
                conn = self.ctx.wrap_socket(raw, server_side=True)
                self.serve_connection(n, conn, select)
            except (OSError, ValueError, EOFError):
                pass  # the agent closed it: it comes back on a new one
            finally:
                raw.close()

    def serve_connection(self, n, conn, select):
        buf = bytearray()

        def read_until(cut):
            while cut not in buf:
                data = conn.recv(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            i = buf.index(cut) + len(cut)
            out = bytes(buf[:i])
            del buf[:i]
            return out

        def read(size):
            while len(buf) < size:
                data = conn.recv(65536)
                if not data:
                    raise EOFError
                buf.extend(data)
            out = bytes(buf[:size])
            del buf[:size]
            return out

        while True:
            try:
                head = read_until(b"\r\n\r\n").decode().split("\r\n")
            except EOFError:
                return
            path = head[0].split()[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
            body = read(int(headers.get("content-length", 0)))
            if "/output/stdout" in path:
                offset = int(path.split("offset=")[1])
                # Is the next request already here, before this one is answered?
                # (nothing follows the output's last byte: no wait for it)
                wait = 3.0 if offset + len(body) < len(PATTERN_BYTES) else 0
                ready = bool(buf) or conn.pending() > 0 or bool(select.select([conn], [], [], wait)[0])
                self.outputs.append((n, offset, len(body), ready))
                if self.first_answer is not None and len(self.outputs) == 1:
                    status, answer = self.first_answer
                elif offset > len(self.data):
                    status, answer = 409, {"offset": len(self.data)}
                else:
                    self.data += body[len(self.data) - offset:]
                    status, answer = 200, {"offset": len(self.data)}
            else:
                status, answer = 200, {"ok": True}
            text = json.dumps(answer).encode()
            conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(text), text))
            if path.endswith("/completed"):
                self.completed.set()
                return

    def close(self):
        self.completed.set()
        self.sock.close()
        self.thread.join(10)


PATTERN = "import sys, time; sys.stdout.buffer.write(bytes(range(256)) * 12); sys.stdout.flush(); time.sleep(1)"
PATTERN_BYTES = bytes(range(256)) * 12


def _start_scripted(tmp_path, server):
    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            run = await ch.start(
                "local", [sys.executable, "-c", PATTERN], run_id="pipe-1",
                callback={"url": server.url, "token": "t" * 43, "cert": server.cert},
                config={"output_buffer": 1000, "output_latency": 0.05, "retry_frequency": 0.2})
            return await ch.wait(run.id)

    st = run_async(main(), timeout=60)
    assert server.completed.wait(30)
    return st


@pytest.mark.timeout(90)
def test_agent_pipelines_output_bodies(tmp_path):
    """The next output body is on the wire before the answer to the last
    one (HTTP/1.1 pipelining: the bytes never stop at each answer), and
    the scheduler gets every byte once, in order."""
    server = _ScriptedServer(tmp_path)
    try:
        st = _start_scripted(tmp_path, server)
    finally:
        server.close()
    assert st.state == "done" and st.stdout_bytes == 3072
    assert bytes(server.data) == bytes(range(256)) * 12
    assert [(o, n) for _, o, n, _ in server.outputs] == [(0, 1000), (1000, 1000), (2000, 1000), (3000, 72)]
    # Each body but the last had the next one behind it.
    assert [ready for *_, ready in server.outputs[:3]] == [True, True, True], server.outputs


@pytest.mark.timeout(90)
def test_a_short_answer_voids_the_pipelined_bodies_behind_it(tmp_path):
    """The scheduler answers the first body with less than its end held
    (here 500 of 1000): what the agent had pipelined behind it is dropped
    with the connection, and it sends again from byte 500, on a new
    connection: every byte once, in order."""
    server = _ScriptedServer(tmp_path, first_answer=(200, {"offset": 500}))
    server.data += (bytes(range(256)) * 12)[:500]  # what that answer says is held
    try:
        st = _start_scripted(tmp_path, server)
    finally:
        server.close()
    assert st.state == "done"
    assert bytes(server.data) == bytes(range(256)) * 12
    first, *rest = server.outputs
    assert first[:3] == (1, 0, 1000)
    again = [(c, o) for c, o, _, _ in rest if c > 1]
    assert again and again[0][1] == 500, server.outputs


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ssh_client", ["openssh", "asyncssh"])
def test_starts_at_once_share_one_tunnel(sshd, tmp_path, ssh_client):
    """Several push starts to one host at once: one tunnel, its port in
    every run's callback (each start making its own closed the one before,
    under runs already told its port: their callbacks went nowhere until
    wait()'s 30 s safety net)."""
    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(sshd.config_file)],
                             ssh_client=ssh_client) as ch:
            runs = await asyncio.gather(*(ch.start("testhost", ["sh", "-c", "echo hi; sleep 1"]) for _ in range(4)))
            t0 = time.monotonic()
            states = await asyncio.wait_for(asyncio.gather(*(r.wait() for r in runs)), 20)
            took = time.monotonic() - t0
            outputs = [await r.read() for r in runs]
            ports = set()
            for r in runs:
                res = subprocess.run(sshd.ssh_argv("cat", ".chaperone/runs/%s/program.json" % r.id),
                                     capture_output=True, timeout=30, check=True)
                ports.add(json.loads(res.stdout)["callback"]["url"])
                await ch.clean(r.id)
            return states, took, outputs, ports

    states, took, outputs, ports = asyncio.run(main())
    assert [s.state for s in states] == ["done"] * 4 and outputs == [b"hi\n"] * 4
    assert len(ports) == 1, ports
    assert took < 8, took  # (the callbacks brought the ends: not the safety net)


@pytest.mark.timeout(60)
def test_a_failing_on_update_hook_fails_nothing(tmp_path, caplog):
    """The scheduler's on_update raising: the start still returns its run
    (a start that raised after the program ran would be started again by a
    scheduler that retries), the run ends as it does, the failure is logged."""
    calls = []

    def on_update(run_id, state):
        calls.append(state.state)
        raise RuntimeError("a bug in the scheduler's hook")

    async def main():
        async with Chaperone(tmp_path / "home", push=True, config=FAST, on_update=on_update) as ch:
            run = await ch.start("local", ["sh", "-c", "echo ran"])
            st = await run.wait()
            return st, await run.read(), [r.id for r in ch.runs()]

    with caplog.at_level("WARNING", logger="chaperone"):
        st, out, ids = run_async(main())
    assert st.state == "done" and out == b"ran\n" and len(ids) == 1
    assert calls and "on_update hook failed" in caplog.text


@pytest.mark.timeout(90)
def test_push_states_never_go_back(sshd, tmp_path):
    """With push, a run's states come in order: a running state never has
    fewer bytes than the one before (the start's answer, older, came after
    the first callbacks and was given as the latest)."""
    from chaperone.protocol import StateUpdate

    async def main():
        seen = []
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(sshd.config_file)], config=FAST) as ch:
            for _ in range(6):
                run = await ch.start("testhost", ["sh", "-c", "echo a; echo E >&2; sleep 0.3"])
                states = [e.state for e in [e async for e in run.events()] if isinstance(e, StateUpdate)]
                seen.append([(s["state"], s["stdout_bytes"], s["stderr_bytes"]) for s in states])
                await ch.clean(run.id)
        return seen

    for states in asyncio.run(main()):
        assert states[-1][0] == "done", states
        for before, after in zip(states, states[1:]):
            assert after[1] >= before[1] and after[2] >= before[2], states


@pytest.mark.timeout(60)
def test_a_cleaned_run_leaves_no_supervisor_calling_back(sshd, tmp_path):
    """A run started with push whose scheduler went away (its callbacks
    find no one), then ``clean(force=True)``: its supervisor ends within
    seconds (before: it went on trying to deliver the final state, for
    ``callback_timeout``, a day, as nobody could ever take back a run whose
    spool is gone).  And ``clean(force=True)`` with the scheduler there."""
    def alive(pid):
        try:
            with open("/proc/%d/stat" % pid) as f:
                return f.read().split(") ", 1)[1][0] not in "ZX"
        except OSError:
            return False

    async def gone(pid):
        for _ in range(100):
            if not alive(pid):
                return True
            await asyncio.sleep(0.1)
        return False

    async def main():
        home = tmp_path / "home"
        async with Chaperone(home, push=True, ssh_config=[str(sshd.config_file)], config=FAST) as ch:
            first = await ch.start("testhost", ["sleep", "30"], id="cleaned-" + uuid.uuid4().hex[:8])
            second = await ch.start("testhost", ["sleep", "30"], id="cleaned-" + uuid.uuid4().hex[:8])
            sups = [first.state.agent_pid, second.state.agent_pid]
            assert all(map(alive, sups))
            await second.clean(force=True)
            with_scheduler = await gone(sups[1])
        async with Chaperone(home, ssh_config=[str(sshd.config_file)]) as ch:  # (no push: nobody to call back)
            await ch.clean(first.id, force=True)
            without = await gone(sups[0])
        return with_scheduler, without

    assert run_async(main()) == (True, True)


@pytest.mark.timeout(60)
def test_a_start_whose_fate_is_unknown_is_settled_soon_not_after_a_safety_net(sshd, tmp_path, monkeypatch):
    """Push: a start whose connection broke (so: ``unknown``), and the
    first look at the host fails too (the connection is still down): the
    host is asked again within seconds, and a start that never got there
    is ``StartFailed`` (before: only after a whole safety net, two
    heartbeats and 2 s: 32 s by default, so ``wait(timeout=30)`` timed
    out)."""
    from chaperone.client import AgentClient
    from chaperone.errors import ConnectionLost, StartFailed

    async def lost_before_sending(self, program):
        raise ConnectionLost("connection to testhost lost (the test)")

    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[str(sshd.config_file)]) as ch:
            await ch.start("testhost", ["true"], id="warm-" + uuid.uuid4().hex[:8])  # (connected, tunnel up)
            rid = "never-" + uuid.uuid4().hex[:8]
            monkeypatch.setattr(AgentClient, "start", lost_before_sending)
            with pytest.raises(ConnectionLost):
                await ch.start("testhost", ["true"], id=rid)
            monkeypatch.undo()
            assert ch.records.get(rid).state == "unknown"
            real, calls = ch.push.catch_up, []

            async def first_fails(run_id):
                calls.append(run_id)
                if len(calls) == 1:
                    raise ConnectionLost("connection to testhost lost (still, the test)")
                return await real(run_id)

            ch.push.catch_up = first_fails
            began = time.monotonic()
            with pytest.raises(StartFailed):
                await ch.wait(rid, timeout=30)
            return time.monotonic() - began, len(calls)

    took, calls = run_async(main())
    assert took < 8 and calls >= 2, (took, calls)
