"""Fuzzers: property-based (hypothesis) and seeded random, each with a
small budget in CI (a few seconds) and a larger one by hand:

    CHAPERONE_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/faults/test_fuzz.py -s

(each fuzzer then runs that many examples; ``-s`` shows the counts).  The
bar (issue 12): 0 tracebacks, 0 500/503 for a client error, 0 programs
started from invalid input, 0 leftover spool directories, 0 signals to
processes that are not the run's, bounded memory and time per call.

What is fuzzed: program.json and batch starts into the agent; every agent
subcommand's arguments (in the agent's own process: many cases a second);
control messages into a running supervisor's FIFO; callback requests
against chaperone/push/endpoint.py over real HTTPS (headers, tokens, bodies,
offsets, stream names, methods, malformed HTTP); spool entries replaced by
FIFOs, symbolic links and directories.
"""

import base64
import copy
import io
import json
import logging
import os
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.helpers import AGENT, agent, agent_start, kill_marked, marker_number, pid_alive, procs_with, program, \
    read_state, wait_for, wait_state

sys.path.insert(0, str(AGENT.parent))
import agent as ag  # noqa: E402

#: CHAPERONE_FUZZ_EXAMPLES: examples per fuzzer (default: each one's CI budget).
BUDGET = int(os.environ.get("CHAPERONE_FUZZ_EXAMPLES", "0") or 0)


def long_marker():
    """A unique number of seconds for ``sleep`` that outlasts a long run
    of the fuzzers (an hour and more), findable in ps."""
    return "3600.%d" % (uuid.uuid4().int % 10 ** 9)


def budget(ci):
    return BUDGET or ci


def fuzz_settings(ci):
    return settings(max_examples=budget(ci), deadline=None, database=None, derandomize=not BUDGET,
                    suppress_health_check=list(HealthCheck))


def report(name, count):
    sys.stdout.write("\n[fuzz] %s: %d cases\n" % (name, count))


def bounded():
    """For agent processes: 1 GiB of address space, 64 MiB files."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))


def run_agent(root, args, stdin=b"", timeout=20):
    res = subprocess.run([sys.executable, str(AGENT), "--root", str(root)] + list(args), input=stdin,
                         capture_output=True, timeout=timeout, preexec_fn=bounded)
    assert b"Traceback" not in res.stderr, res
    assert res.returncode in (0, 1, 2, 3, 4), res
    if res.returncode:
        lines = [l for l in res.stderr.decode("utf-8", "replace").splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("chaperone-agent: "), res
    return res


# --- values ---------------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=()), max_size=12)  # (surrogates too)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    _text, st.sampled_from(["", "\0", "/", "/dev/zero", "/etc/passwd", "https://127.0.0.1:9/", "x" * 40,
                            "aGk=", "\udcff", "..", "a..b", "file", "pipe"]),
)
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4),
                     max_leaves=12)
_deep = st.integers(30, 3000).map(lambda n: json.loads("[" * min(n, 900) + "]" * min(n, 900)) if n < 900 else "DEEP")

PATHS = [
    ("id",), ("version",), ("program",), ("program", "argv"), ("program", "argv", 0), ("program", "argv", 1),
    ("program", "cwd"), ("program", "env"), ("program", "env", "K"), ("program", "env_inherit"),
    ("program", "stdin"), ("program", "stdin", "path"), ("program", "stdin", "data"), ("program", "umask"),
    ("callback",), ("callback", "url"), ("callback", "token"), ("callback", "cert"), ("callback", "heartbeat"),
    ("config",), ("config", "timeout"), ("config", "output_buffer"), ("config", "output_latency"),
    ("config", "retry_frequency"), ("config", "kill_grace"), ("config", "callback_timeout"),
    ("config", "capture"), ("extra",), ("program", "extra"),
]
_DELETE = object()
_mutation = st.tuples(st.sampled_from(PATHS), st.one_of(_json, st.just(_DELETE), _deep))
#: What a valid program.json may run: harmless programs only (any other
#: program name is made a path that does not exist).
SAFE = ("/bin/true", "/bin/echo")


def base_doc(uid, kind):
    doc = {"id": uid, "program": {"argv": ["/bin/echo", "fuzz"]}}
    if kind == 1:
        doc["program"].update(stdin={"data": base64.b64encode(b"x").decode()}, env={"A": "b"}, umask=18)
        doc["config"] = {"capture": "pipe", "timeout": 5}
    elif kind == 2:
        doc["callback"] = {"url": "https://127.0.0.1:9/", "token": "t" * 43, "cert": "CERT"}
    return doc


def apply(doc, path, value):
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value


def make_safe(doc):
    """Whatever the fuzzer did: nothing but SAFE programs can start, and
    no callback is tried for long."""
    prog = doc.get("program") if isinstance(doc, dict) else None
    argv = prog.get("argv") if isinstance(prog, dict) else None
    if isinstance(argv, list) and argv and isinstance(argv[0], str) and argv[0] not in SAFE:
        argv[0] = "/nonexistent-fuzz/p%d" % (abs(hash(argv[0])) % 1000)
    if isinstance(doc, dict) and isinstance(doc.get("callback"), dict):
        cfg = doc.setdefault("config", {})
        if isinstance(cfg, dict):
            cfg["callback_timeout"], cfg["retry_frequency"] = 0.2, 0.1
    return doc


def verdict(doc):
    try:
        ag.validate_spec(copy.deepcopy(doc))
        return True
    except ag.AgentError:
        return False


def nesting(obj):
    """How deep ``obj`` nests lists and dicts ("DEEP": 5000)."""
    if obj == "DEEP":
        return 5000
    if isinstance(obj, dict):
        return 1 + max([nesting(v) for v in obj.values()] or [0])
    if isinstance(obj, list):
        return 1 + max([nesting(v) for v in obj] or [0])
    return 0


def encode(doc):
    text = json.dumps(doc)
    return text.replace('"DEEP"', "[" * 5000 + "]" * 5000).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def fuzz_root():
    d = tempfile.mkdtemp(prefix="chaperone-fuzz-")
    yield os.path.join(d, "spool")
    for name in os.listdir(d):
        pass
    subprocess.run(["rm", "-rf", d])


_docs = st.lists(st.tuples(st.integers(0, 2), st.lists(_mutation, max_size=4)), min_size=1, max_size=6)


def test_fuzz_program_json_and_batches(fuzz_root):
    root = fuzz_root
    seen = {"cases": 0, "docs": 0, "valid": 0}

    @fuzz_settings(40)
    @given(_docs, st.booleans())
    def check(specs, as_batch):
        docs, expect = [], []
        for kind, mutations in specs:
            uid = "f" + uuid.uuid4().hex[:12]
            doc = base_doc(uid, kind)
            for path, value in mutations:
                apply(doc, path, value)
            if isinstance(doc, dict) and isinstance(doc.get("id"), str) and ag.valid_id(doc["id"]):
                doc["id"] = uid  # (one run per document)
            docs.append(make_safe(doc))
        batch = as_batch or len(docs) > 1
        data = encode(docs if batch else docs[0])
        top_ok = nesting(docs if batch else docs[0]) <= 32 and len(data) <= 16 << 20
        res = run_agent(root, ["start"], stdin=data)
        seen["cases"] += 1
        for i, doc in enumerate(docs):
            seen["docs"] += 1
            ok = top_ok and verdict(doc)
            uid = doc.get("id") if isinstance(doc, dict) else None
            there = isinstance(uid, str) and ag.valid_id(uid) and os.path.lexists(os.path.join(root, uid))
            if ok:
                seen["valid"] += 1
                assert there, (doc, res)
                assert res.returncode == 0, res
                answer = json.loads(res.stdout)[i] if batch else json.loads(res.stdout)
                assert answer["state"] in ("running", "done", "error"), answer
            else:
                assert not there or uid in seen, (doc, res)  # 0 programs from invalid input
                if not batch:
                    assert res.returncode == 2, (doc, res)
                elif res.returncode == 0:
                    assert "rejected" in json.loads(res.stdout)[i], res

    check()
    report("program.json and batch starts (%d documents, %d valid)" % (seen["docs"], seen["valid"]), seen["cases"])
    # Nothing left half made; every run finishes (only harmless programs ran).
    assert not [n for n in os.listdir(root) if n.startswith(".")], os.listdir(root)
    for name in os.listdir(root):
        wait_state(root, name, timeout=30)
    wait_for(lambda: not procs_with(root, exact=False), 30, what="the fuzzed runs' supervisors to end")


# --- the command line, in the agent's own process ----------------------------------------------

_WORDS = ["start", "status", "follow", "output", "signal", "list", "clean", "control", "--root", "--marker",
          "--expect-hash", "--follow", "--stdout-offset", "--stderr-offset", "--stream", "--offset", "--length",
          "--grace", "--force", "--", "-h", "--help", "stdout", "stderr", "TERM", "KILL", "0", "-1", "1e400",
          "nan", "inf", "9" * 30, "done", "running", "nope", "../x", "d\n", "-", "--stream=stdout",
          "--offset=-5", "--grace=x", "--follow=1", "\udcff", "é", ""]
_PAIRS = [["--marker", "\udcff"], ["--marker", "a\nb"], ["--marker", ""], ["--root", "/tmp/\udcff/x"],
          ["--root", "relative"], ["--stream", "\udcff"], ["--grace", "1e400"], ["--offset", "-0"],
          ["--stdout-offset", "\u0661"], ["--length", "99999999999999999999999"], ["--expect-hash", "x"]]
#: Well-formed command lines, each then changed in a few places.
_BASES = [["status", "done"], ["status", "bad"], ["follow", "done"], ["follow", "done", "--stdout-offset", "1"],
          ["output", "done", "--stream", "stdout"], ["output", "done", "--stream", "stderr", "--offset", "2",
                                                      "--length", "3"],
          ["list"], ["signal", "done", "TERM"], ["signal", "nope", "KILL", "--grace", "1"], ["clean", "nope"],
          ["clean", "bad"], ["control", "nope"], ["start"], ["start", "--follow"], ["--help"]]
_chunk = st.one_of(st.sampled_from(_WORDS).map(lambda w: [w]), _text.map(lambda t: [t]), st.sampled_from(_PAIRS))


def _mutate(base, changes):
    argv = list(base)
    for where, replace, chunk in changes:
        at = where % (len(argv) + 1)
        if replace and at < len(argv):
            argv[at:at + 1] = chunk
        else:
            argv[at:at] = chunk
    return argv


_argv = st.builds(_mutate, st.sampled_from(_BASES),
                  st.lists(st.tuples(st.integers(0, 8), st.booleans(), _chunk), max_size=3))


class Captured(object):
    """fds 0, 1 and 2 of this process to files, for the agent's main()."""

    def __enter__(self):
        self.saved = [os.dup(fd) for fd in (0, 1, 2)]
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(self.out.fileno(), 1)
        os.dup2(self.err.fileno(), 2)
        self.stdin, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(b""))
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((0, 1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        sys.stdin = self.stdin
        self.err.seek(0)
        self.stderr = self.err.read()
        self.out.close()
        self.err.close()
        return False


def test_fuzz_agent_command_lines(tmp_path):
    """Any argv: an exit status, at most one line on stderr, no exception
    out of main() (run in this process, against a spool with a finished
    run, a running one and a damaged one)."""
    root = tmp_path / "spool"
    m = long_marker()
    try:
        agent_start(root, program("done", ["true"]))
        wait_state(root, "done")
        running = agent_start(root, program("running", ["sleep", m]))
        agent_start(root, program("bad", ["true"]))
        wait_state(root, "bad")
        (root / "bad" / "state.json").write_text('{"state": "done", "pgid": "x"}')
        count = [0]

        @fuzz_settings(400)
        @given(_argv)
        def check(argv):
            if "running" in argv and any(c in argv for c in ("signal", "clean", "control", "follow")):
                # (not the run itself; and a follow of it rightly goes on while it runs)
                argv = [a if a != "running" else "nope" for a in argv]
            argv = ["--root", str(root)] + argv
            with Captured() as cap:
                code = ag.main(argv)
            count[0] += 1
            assert code in (0, 1, 2, 3, 4) or code == 97 and "--expect-hash" in argv, (argv, code)  # (97: ship again)
            assert b"Traceback" not in cap.stderr
            assert len([l for l in cap.stderr.splitlines() if l.strip()]) <= 1 or "list" in argv, (argv, cap.stderr)

        check()
        # signal, clean and control too, with arguments that never name a valid run+signal pair
        rnd = random.Random(12)
        for i in range(budget(40)):
            argv = [rnd.choice(["signal", "clean", "control", "start"])] + \
                [rnd.choice(_WORDS[8:]) for _ in range(rnd.randint(0, 4))]
            if argv[0] in ("signal", "clean") and len(argv) > 1 and argv[1] in ("running", "done"):
                argv[1] = "nope"
            with Captured() as cap:
                code = ag.main(["--root", str(root)] + argv)
            count[0] += 1
            assert code in (0, 1, 2, 3, 4) and b"Traceback" not in cap.stderr, (argv, code, cap.stderr)
        report("agent command lines (in process)", count[0])
        assert pid_alive(running["pid"]) and read_state(root, "running")["state"] == "running"
    finally:
        kill_marked(m)


# --- control messages ------------------------------------------------------------------------


def _is_real_signal(line):
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("op") == "signal" and type(msg.get("signal")) is int \
        and msg["signal"] in ag.SIGNAL_NAMES


_line = st.one_of(
    _json.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.fixed_dictionaries({"op": st.sampled_from(["signal", "callback", "release", "bogus"])},
                          optional={"signal": _json, "grace": _json, "url": _json, "token": _json, "cert": _json}
                          ).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.integers(30, 50000).map(lambda n: b"[" * n + b"]" * n),
)


def test_fuzz_control_messages(tmp_path):
    """Anything written to a running supervisor's FIFO (but a real signal
    request): the run keeps running, its supervisor alive, nothing logged."""
    root = tmp_path / "spool"
    m = long_marker()
    try:
        st_ = agent_start(root, program("ctl", ["sleep", m], config={"kill_grace": 600}))
        fifo = os.open(str(root / "ctl" / "control"), os.O_WRONLY)
        count = [0]

        @fuzz_settings(300)
        @given(st.lists(_line, min_size=1, max_size=5))
        def check(lines):
            data = b"".join(l.replace(b"\n", b" ") + b"\n" for l in lines if not _is_real_signal(l))
            view = memoryview(data)
            while view:
                view = view[os.write(fifo, view):]
            count[0] += len(lines)

        check()
        os.close(fifo)
        time.sleep(0.5)
        for i in range(budget(10)):  # and through `control`
            res = run_agent(root, ["control", "ctl"], stdin=random.Random(i).choice(
                [b"", b"{", b"[]", b'{"op": "signal", "signal": 9}', b'{"op": "callback", "url": 1}',
                 b"[" * 1000, b"\xff" * 10, b'{"op": "release"}']))
            count[0] += 1
        report("control messages", count[0])
        assert pid_alive(st_["agent_pid"]) and procs_with(m)
        assert json.loads(run_agent(root, ["status", "ctl"]).stdout)["state"] == "running"
        assert not (root / "ctl" / "agent.log").exists()
    finally:
        kill_marked(m)


# --- callback requests -----------------------------------------------------------------------------


def _raw(port, ctx, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            out = b""
            while True:
                try:
                    part = tls.recv(65536)
                except (ConnectionResetError, ssl.SSLError, socket.timeout):
                    break
                if not part:
                    break
                out += part
    return out


_methods = st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "post", "P\u00d8ST"])
_routes = st.one_of(st.sampled_from(["r1/state", "r1/completed", "r1/output/stdout", "r1/output/stderr"] * 3 +
                                    ["r2/state", "nope/state", "r1/output/stdin", "r1", "", "r1/state/x"]),
                    _text.map(lambda t: "r1/" + t))
_query = st.one_of(st.sampled_from(["", "?offset=0", "?offset=0", "?offset=0", "?offset=0", "?offset=0", "?offset=5", "?offset=-1", "?offset=1&offset=2",
                                    "?offset=99999999999999999999", "?offset=%FF", "?offset=1%0A"]),
                   _text.map(lambda t: "?offset=" + t))


def _state_like(draw_json):
    return st.fixed_dictionaries(
        {"version": st.sampled_from([1, 2, True]), "id": st.sampled_from(["r1", "r2", "x"]),
         "host": st.just("h"), "state": st.sampled_from(["running", "done", "error", "lost", "x"]),
         "start_time": st.just("2024-01-01T00:00:00Z"), "spool": st.just("/s")},
        optional={"return_code": draw_json, "pid": draw_json, "rusage": draw_json, "errno": draw_json,
                  "stdout_bytes": draw_json, "note": draw_json, "extra": draw_json})


_bodies = st.one_of(st.binary(max_size=300), st.binary(max_size=300), st.binary(min_size=70000, max_size=70001), _json.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
                    _state_like(_json).map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
                    st.integers(30, 3000).map(lambda n: b"[" * n + b"]" * n))
_tokens = st.one_of(st.sampled_from(["T1"] * 6 + ["T2", "", "Bearer", "x" * 43]), _text,
                    st.sampled_from(["\u017f", "\u212a", "\u0131", "\u0130"]).map(lambda c: "T1" + c))


def test_fuzz_callback_requests(tmp_path, caplog):
    """Random requests over real HTTPS: never a 500 or 503 (they are all
    the client's doing), never a traceback in the log."""
    import asyncio
    import threading

    from chaperone.push.endpoint import CallbackServer
    from chaperone.push.mirror import OutputMirror

    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    server = CallbackServer(max_body=1 << 16)
    states = []
    ready = threading.Event()
    tokens = {}

    def serve():
        asyncio.set_event_loop(loop)

        async def start():
            await server.start(cert_dir=tmp_path / "tls")
            tokens["T1"] = server.register("r1", OutputMirror(tmp_path / "m1"), lambda *a: states.append(a))
            tokens["T2"] = server.register("r2", OutputMirror(tmp_path / "m2"), lambda *a: states.append(a))
            ready.set()

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    ctx = ssl.create_default_context(cadata=server.cert_pem)
    seen = {}
    try:
        @fuzz_settings(150)
        @given(_methods, _routes, _query, _tokens, _bodies, st.sampled_from([True] * 6 + [False]),
               st.sampled_from(["", "", "", "", "chunked", "bad"]))
        def check(method, route, query, token, body, auth, length):
            token = tokens.get(token, token)
            head = "%s /api/v1/agent/%s%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % (
                method, route.replace("\r", "").replace("\n", "").replace(" ", "%20"), query.replace(" ", "+"))
            if auth:
                head += "Authorization: Bearer %s\r\n" % token
            if length == "chunked":
                head += "Transfer-Encoding: chunked\r\n"
                payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
            else:
                head += "Content-Length: %s\r\n" % (len(body) if length != "bad" else "12x")
                payload = body
            data = head.encode("utf-8", "surrogatepass") + b"\r\n" + payload
            answer = _raw(server.port, ctx, data)
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
            seen[status] = seen.get(status, 0) + 1
            assert status not in (500, 503), (data[:300], answer[:300])

        check()
        # Seeded: requests that are right but for one thing (output at
        # any offset and size, states with one field changed).
        rnd = random.Random(7)
        fields = ["return_code", "errno", "pid", "stdout_bytes", "rusage", "state", "id", "version", "note",
                  "end_time", "timed_out", "signal", "extra"]
        values = [None, True, -1, 0, 2 ** 63, 2 ** 70, -(2 ** 64), 1.5, float("inf"), "x", "\udcff", [], {},
                  [[[[1]]]], {"ru_maxrss": 2 ** 80}]
        for i in range(budget(100)):
            if rnd.random() < 0.5:
                body = os.urandom(rnd.choice([0, 1, 100, 70000]))
                route = "r1/output/%s?offset=%d" % (rnd.choice(["stdout", "stderr"]), rnd.choice([0, 0, 1, 5, 10 ** 6]))
            else:
                st_ = {"version": 1, "id": "r1", "host": "h", "state": rnd.choice(["running", "done", "error", "lost"]),
                       "start_time": "2024-01-01T00:00:00Z", "spool": "/s", "return_code": 0}
                st_[rnd.choice(fields)] = rnd.choice(values)
                body = json.dumps(st_).encode("utf-8", "surrogatepass")
                route = "r1/" + ("completed" if st_["state"] != "running" else "state")
            data = ("POST /api/v1/agent/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer %s\r\n"
                    "Content-Length: %d\r\n\r\n" % (route, tokens["T1"], len(body))).encode() + body
            answer = _raw(server.port, ctx, data)
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
            seen[status] = seen.get(status, 0) + 1
            assert status not in (0, 500, 503), (data[:300], answer[:300])
    finally:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.stop()))
        time.sleep(0.5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    report("callback requests (statuses %s)" % dict(sorted(seen.items())), sum(seen.values()))
    for record in caplog.records:
        assert not record.exc_info, (record.getMessage(), record.exc_info)


# --- spool entries replaced ---------------------------------------------------------------------------


def test_fuzz_spool_entries(tmp_path):
    """Seeded: an entry of a run (finished or running) replaced by a FIFO,
    a symbolic link (to /dev/zero, to a directory, dangling), a directory
    or garbage; a command on it: an answer in bounded time, one line if an
    error, no agent left behind, and no signal to anyone else."""
    rnd = random.Random(20261201)
    root = tmp_path / "spool"
    m = long_marker()
    canary = subprocess.Popen(["sleep", long_marker()], start_new_session=True)
    entries = ["state.json", "stdout", "stderr", "control", "program.json", "state.json.next", "."]
    kinds = ["fifo", "zero", "dirlink", "dangling", "dir", "garbage", "huge", "canary-state"]
    commands = [["status"], ["output", "--stream", "stdout"], ["output", "--stream", "stderr", "--offset", "1"],
                ["follow"], ["signal", "TERM"], ["clean"], ["clean", "--force"], ["list"]]
    count = 0
    pairs = [(e, k) for e in entries for k in kinds]
    rnd.shuffle(pairs)  # (each pair once before any comes again)
    try:
        for i in range(budget(25)):
            run_id = "e%d" % i
            running = rnd.random() < 0.3
            st_ = agent_start(root, program(run_id, ["sleep", m] if running else ["sh", "-c", "echo o; echo e >&2"]))
            if not running:
                wait_state(root, run_id)
            (entry, kind), cmd = pairs[i % len(pairs)], rnd.choice(commands)
            path = root / run_id / entry if entry != "." else root / run_id
            if kind == "canary-state":
                bad = dict(read_state(root, run_id), pid=canary.pid, pgid=canary.pid)
                path = root / run_id / "state.json"
                path.write_text(json.dumps(bad))
            else:
                replace_entry(path, kind, rnd, tmp_path)
            args = cmd[:1] + ([run_id] if cmd != ["list"] else []) + cmd[1:]
            if args[0] == "follow" and running:
                args = ["status", run_id]  # (a follow of a running run rightly goes on)
            start = time.monotonic()
            res = run_agent(root, args, timeout=20)
            assert time.monotonic() - start < 15, args
            count += 1
            assert pid_alive(canary.pid), (entry, kind, args)
            if running and kind != "canary-state":
                os.kill(st_["pid"], signal.SIGKILL) if pid_alive(st_["pid"]) else None
        report("spool entries replaced", count)
        def command_line(p):  # (a process may end, and be a zombie, while we look)
            try:
                return p.cmdline()
            except psutil.Error:
                return []

        left = [c for c in map(command_line, procs_with(str(root), exact=False))
                if any(a.endswith("agent.py") for a in c)]
        for c in left:  # only supervisors, never a command stuck on an entry
            assert c[-1] == "start", c
    finally:
        kill_marked(m)
        canary.kill()
        canary.wait()


def replace_entry(path, kind, rnd, tmp_path):
    """Put a ``kind`` of thing where ``path`` was.  (The run's directory of a
    running run, removed, is made again at once by its supervisor, with a
    final state saying so: then it is removed again.)"""
    for _ in range(50):
        if path.is_dir() and not path.is_symlink():
            subprocess.run(["rm", "-rf", str(path)])
        elif os.path.lexists(str(path)):
            os.unlink(str(path))
        try:
            make_entry(path, kind, rnd, tmp_path)
            return
        except (FileExistsError, IsADirectoryError):
            time.sleep(0.02)
    raise AssertionError("%s kept coming back" % path)


def make_entry(path, kind, rnd, tmp_path):
    if kind == "fifo":
        os.mkfifo(str(path))
    elif kind == "zero":
        os.symlink("/dev/zero", str(path))
    elif kind == "dirlink":
        os.symlink(str(tmp_path), str(path))
    elif kind == "dangling":
        os.symlink("/nonexistent-fuzz", str(path))
    elif kind == "dir":
        os.mkdir(str(path))
    elif kind == "garbage":
        path.write_bytes(bytes(rnd.getrandbits(8) for _ in range(200)))
    elif kind == "huge":
        with open(str(path), "xb") as f:
            f.truncate(2 << 20)
