"""The agent's lean start-up: what it does instead of importing json, re,
signal (enum) and threading at every call must behave exactly as those do.

The JSON and signal checks run under every Python the agent supports that
is installed here (3.8 to 3.13), each against its own stdlib.
"""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from chaperone.agent_source import agent_hash
from support.helpers import AGENT, agent, agent_start, load_agent, program, unique, wait_state

from support.helpers import find_python, require_python  # noqa: E402

PYTHONS = [sys.executable, "/usr/bin/python3"] + [find_python(v) for v in ("3.8", "3.9", "3.10", "3.12", "3.13")]
PYTHONS = [p for p in dict.fromkeys(PYTHONS) if p and os.path.exists(p)]


def test_the_oldest_python_is_among_those_checked():
    """The agent's oldest Python (3.8) is one of them: in CI a failure, not
    a silent skip, when it is missing."""
    assert require_python("3.8") in PYTHONS

#: Run as ``python -I -S -c CHECK agent.py`` under each Python: loads the
#: agent, checks that its JSON needs no json package (nor re, enum...),
#: then compares it with json, and its signal table with signal.Signals.
CHECK = r'''
import sys
from importlib.machinery import SourceFileLoader

ag = type(sys)("chaperone_agent_lean")
ag.__file__ = sys.argv[1]
SourceFileLoader("chaperone_agent_lean", ag.__file__).exec_module(ag)
assert ag.loads.__qualname__ == "_lean_json.<locals>.loads", "the agent fell back to json"

nan, inf = float("nan"), float("inf")
circular = []
circular.append(circular)
texts = ["", "abc", "\"\\/'", "".join(map(chr, range(256))), "\u2028\u2029", "\ud800", "x\udfffy",
         "\ud83d\ude00", "\U0001f600", "\U0010ffff", "\ufeff", "\x00\x1f\x7f", "é" * 300]
values = texts + [
    0, -1, 1, 2 ** 63, -2 ** 64, 10 ** 100, 7 ** 3000, True, False, None,
    0.0, -0.0, 1e308, -1e308, 5e-324, 1e-320, 0.1, 1 / 3, 1e16, 123456789.125, 2.5e-07, nan, inf, -inf,
    [], {}, (), [[]], [{}], {"": {}}, (1, "a", None), list(range(50)),
    {"b": 1, "a": [1, 2.5, "x", None, True], "c": {"z": {}, "y": []}},
    {"\u00e9": "\ud800", "\U0001f600": [nan, -inf]}, {1: "int", 2.5: "float", -3: 0}, {True: 1, False: 0},
    {None: "n"}, {nan: 1}, {inf: 2},
    {"id": "run-1", "program": {"argv": ["true"], "cwd": None, "env": {"A": "b\n"}, "stdin": None}},
]
deep = []
for _ in range(60):
    deep = [{"k": deep}, 1]
values.append(deep)
bad_values = [set(), b"bytes", object(), {(1, 2): 3}, {1: "a", "b": 2}, {1: "int", 2.5: "float", None: "n"}, circular, [1, {"x": b""}],
              10 ** 5000, {"a": float}]
docs = [" \t\n\r{\"a\": 1} \n\r\t", "[1, 2", "{\"a\": 1} x", "", "   ", "NaN", "-Infinity", "Infinity",
        "[NaN, Infinity, -Infinity]", "nan", "\ufeff{}", "\"\\ud800\"", "\"\\ud83d\\ude00\"", "\"\x00\"",
        "\"\\u00e9\"", "1" * 5000, "1" * 4000, "1e400", "-1e400", "-0", "0.0", "01", "-", "1.", ".5",
        "{\"a\":1,\"a\":2}", "[" * 100000, "{\"a\" 1}", "\"\\x\"", "\"unterminated", "true false", "[1,]",
        "{,}", "\x0c{}", "\u00a0{}", "{}\x0c", "{}\u00a0", "{} {}", "null", "true", "-12.5e+3",
        "\"" + "\\u0000" * 10 + "\"", "[\"a\"\n,\n\"b\"]", "{\"a\": [1, {\"b\": null}]}", "\n"]

def outcome(call):
    try:
        return "ok", repr(call())
    except BaseException as e:  # RecursionError too
        return type(e).__name__, str(e).splitlines()[0] if str(e) else ""

def outcomes(dumps, loads, after_valid=lambda: None):
    """Every case through ``dumps``/``loads``: valid values, then (after
    ``after_valid``) values json cannot encode and documents to parse."""
    out = []
    for v in values:
        out.append(outcome(lambda: dumps(v)))
        out.append(outcome(lambda: dumps(v, sort_keys=True)))
        out.append(outcome(lambda: loads(dumps(v))))
        out.append(outcome(lambda: loads(dumps(v, sort_keys=True))))
    after_valid()
    for v in bad_values:
        out.append(outcome(lambda: dumps(v)))
        out.append(outcome(lambda: dumps(v, sort_keys=True)))
    for d in docs + [d.encode() for d in docs[:5]]:
        out.append(outcome(lambda: loads(d)))
    return out


def nothing_heavy():
    heavy = sorted(m for m in ("json", "re", "enum", "signal", "threading", "subprocess") if m in sys.modules)
    assert not heavy, "valid JSON loaded %s" % heavy


lean = outcomes(ag.dumps, ag.loads, nothing_heavy)

import json

ref = outcomes(json.dumps, json.loads)
assert len(lean) == len(ref)
for i, (a, b) in enumerate(zip(lean, ref)):
    assert a == b, (i, a[:1] + (a[1][:300],), b[:1] + (b[1][:300],))
assert sum(1 for r in ref if r[0] != "ok") > 30  # the errors were compared too

import signal

assert ag.SIGNAL_NAMES == dict((s.value, s.name) for s in signal.Signals)
assert ag.SIGNAL_NUMBERS == dict((n, s.value) for n, s in signal.Signals.__members__.items())
for num in range(-1, 80):
    try:
        want = signal.Signals(num).name
    except ValueError:
        want = "SIG%d" % num
    assert ag.signal_name(num) == want, (num, ag.signal_name(num), want)
print("ok %d.%d %d" % (sys.version_info[:2] + (len(ref),)))
'''


@pytest.mark.parametrize("python", PYTHONS)
def test_json_and_signal_shims_equal_the_stdlib(python):
    res = subprocess.run([python, "-I", "-S", "-c", CHECK, str(AGENT)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    assert res.stdout.startswith(b"ok "), res.stdout


#: Loads the agent with ``_json`` missing, or with one whose make_encoder
#: takes other arguments: the agent must use json instead, and work.
FALLBACK = r'''
import sys
from importlib.machinery import SourceFileLoader

if sys.argv[2] == "missing":
    sys.modules["_json"] = None  # import _json: ImportError
else:
    import _json

    fake = type(sys)("_json")
    fake.__dict__.update(vars(_json))
    fake.make_encoder = lambda *args: _json.make_encoder(*args[:-1])  # one argument short: TypeError
    sys.modules["_json"] = fake
ag = type(sys)("chaperone_agent_fallback")
ag.__file__ = sys.argv[1]
SourceFileLoader("chaperone_agent_fallback", ag.__file__).exec_module(ag)
assert ag.loads.__qualname__ == "loads", ag.loads.__qualname__
del sys.modules["_json"]  # json itself gets the real one, or none
doc = {"b": [1, 2.5, "\u00e9", None, float("nan")], "a": {}}
assert ag.dumps(doc, sort_keys=True) == '{"a": {}, "b": [1, 2.5, "\\u00e9", null, NaN]}'
assert ag.dumps(doc) == '{"b": [1, 2.5, "\\u00e9", null, NaN], "a": {}}'
assert ag.loads(' {"a": [1, "\\u00e9"]} ') == {"a": [1, "\u00e9"]}
try:
    ag.loads("{} x")
except ValueError as e:
    assert str(e) == "Extra data: line 1 column 4 (char 3)", e
else:
    raise AssertionError("no error")
print("ok")
'''


@pytest.mark.parametrize("how", ["missing", "different"])
def test_without_a_usable_json_accelerator_the_agent_uses_json(how):
    res = subprocess.run([sys.executable, "-I", "-S", "-c", FALLBACK, str(AGENT), how], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, timeout=60)
    assert res.returncode == 0 and res.stdout == b"ok\n", res.stderr.decode()[-3000:]


def test_several_pythons_were_checked():
    """The shims were compared on the oldest and the newest supported
    Pythons, not only on the one running the tests."""
    versions = set()
    for p in PYTHONS:
        out = subprocess.run([p, "-c", "import sys; print(sys.version_info[1])"], stdout=subprocess.PIPE)
        versions.add(int(out.stdout))
    assert len(versions) >= 3 and min(versions) <= 9, versions


def _load_agent():
    return load_agent("chaperone_agent_lean_test")


ag = _load_agent()


def test_aliases_take_the_first_name_as_signal_does():
    names = ag.SIGNAL_NAMES
    for alias, name in (("SIGIOT", "SIGABRT"), ("SIGCLD", "SIGCHLD"), ("SIGPOLL", "SIGIO")):
        if hasattr(signal, alias):
            assert names[getattr(signal, alias)] == name
            assert ag.parse_signal(alias.lower()) == getattr(signal, name)


def _parse_signal_reference(name):
    """The agent's parse_signal as it was, with signal.Signals (a digit
    string int() refuses, such as '²', crashed it: now an unknown signal)."""
    text = str(name).strip()
    if text.isdigit():
        try:
            num = int(text)
            signal.Signals(num)
        except ValueError:
            return None
        return num
    upper = text.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    sig = getattr(signal.Signals, upper, None) if upper.isidentifier() else None
    if sig is None or upper.startswith("SIG_"):
        return None
    return int(sig)


def test_parse_signal_is_what_signal_signals_said():
    words = list(signal.Signals.__members__) + ["SIG_DFL", "SIG_IGN", "SIG_BLOCK", "NSIG", "SIGRTMIN+1", "",
                                                 " ", "SIG", "sig", "²", "١٥", "15.0", "-1", "0", "00015",
                                                 "ſigterm", "Signals", "SIGNALS", "__class__", "name", "kill"]
    words += [str(n) for n in range(0, 80)]
    words += [w.lower() for w in words] + [w[3:] for w in words if w.startswith("SIG")]
    words += [" %s\n" % w for w in words]
    for word in words:
        try:
            got = ag.parse_signal(word)
        except ag.AgentError as e:
            assert str(e) == "unknown signal %r" % (word,)
            got = None
        assert got == _parse_signal_reference(word), word
        assert got is None or type(got) is int


def _id_corpus():
    rng = random.Random(7)
    alphabet = "aZ09._-/ \n\t\u0661\u00e9x"
    names = ["", "a", "A", "0", ".", "..", "a..b", "a.b", "-a", "_a", ".a", "a\n", "a\n\n", "\na", "a b",
             "x" * 127, "x" * 128, "x" * 129, "a/b", "\u0661", "a\u0661", "é", "a-._", "ab.", None, 5, b"ab"]
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    return names


def test_run_ids_are_the_pattern_in_full_without_dot_dot():
    from chaperone.models import RUN_ID_PATTERN

    assert ag.RUN_ID_PATTERN == RUN_ID_PATTERN
    pattern = re.compile(RUN_ID_PATTERN)
    for name in _id_corpus():
        want = isinstance(name, str) and bool(pattern.fullmatch(name)) and ".." not in name
        assert ag.valid_id(name) == want, name
    # `$` would take "a\n" with match(); an id never ends with a newline.
    assert not ag.valid_id("a\n") and pattern.match("a\n")


def test_options_tell_negative_numbers_as_argparse_does():
    negative = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's _negative_number_matcher
    rng = random.Random(11)
    alphabet = "-.1 9\n\u0661\u00b2ax"
    args = ["-", "--", "-1", "-1\n", "-1\n\n", "-.5", "-.5\n", "-1.", "-1.5", "-1.5.5", "-\u0661", "-\u00b2",
            "-1 ", "--1", "-x", "--root", "-\n", "-.\n", "\n", "1"]
    args += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(5000)]
    args += ["-" + a for a in args]
    for arg in args:
        want = arg.startswith("-") and arg != "-" and " " not in arg and not negative.match(arg)
        assert ag._is_option(arg) == want, repr(arg)


# --- what each command imports --------------------------------------------------


#: Runs the agent's main() with ARGS, then prints the heavy modules loaded.
IMPORTS = r'''
import os, sys
from importlib.machinery import SourceFileLoader

ag = type(sys)("chaperone_agent_imports")
ag.__file__ = sys.argv[1]
if os.environ.get("BOOTSTRAP_SHA256"):  # (as the SSH bootstrap gives it: see agent_source.RUN_AGENT)
    ag.BOOTSTRAP_SHA256 = os.environ["BOOTSTRAP_SHA256"]
SourceFileLoader("chaperone_agent_imports", ag.__file__).exec_module(ag)
code = ag.main(sys.argv[2:])
heavy = sorted(m for m in ("json", "re", "enum", "signal", "threading", "subprocess", "argparse",
                           "datetime", "tempfile", "shutil", "base64", "ssl", "hashlib", "_hashlib")
               if m in sys.modules)
os.write(2, ("\nIMPORTED %d %s\n" % (code, " ".join(heavy))).encode())
'''


def _imports(root, *args, stdin=b"", verified=None):
    env = dict(os.environ, BOOTSTRAP_SHA256=verified or "")
    res = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", IMPORTS, str(AGENT), "--root", str(root)]
                         + list(args), input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                         env=env)
    line = res.stderr.decode().rsplit("\nIMPORTED ", 1)[1].split()
    return int(line[0]), line[1:]


def test_commands_import_no_heavy_module(tmp_path):
    root = tmp_path / "spool"
    run_id = unique("imp")
    code, heavy = _imports(root, "start", stdin=json.dumps(program(run_id, ["sh", "-c", "echo out; echo err >&2"])).encode())
    assert (code, heavy) == (0, [])
    wait_state(root, run_id)
    code, heavy = _imports(root, "start", "--follow", stdin=json.dumps(program(unique("imp"), ["true"])).encode())
    assert (code, heavy) == (0, [])
    batch = [program(unique("imp"), ["true"]), program(unique("imp"), ["true"], umask=-1)]
    code, heavy = _imports(root, "start", stdin=json.dumps(batch).encode())
    assert (code, heavy) == (0, [])
    for args in (["status", run_id], ["list"], ["follow", run_id], ["output", run_id, "--stream", "stdout"],
                 ["signal", run_id, "TERM"], ["status", "nosuch"], ["status", "bad..id"]):
        code, heavy = _imports(root, *args)
        assert code in (0, 1, 2, 4), (args, code)
        assert heavy == [], (args, heavy)
    # As the SSH bootstrap runs it, having checked these bytes' hash itself (without OpenSSL): the
    # agent does not read and hash itself again, nor load hashlib; run directly, it checks itself.
    code, heavy = _imports(root, "--expect-hash", agent_hash(), "status", run_id, verified=agent_hash())
    assert (code, heavy) == (0, [])
    code, heavy = _imports(root, "--expect-hash", "0" * 64, "status", run_id)
    assert code == 97 and set(heavy) <= {"hashlib", "_hashlib"}, (code, heavy)
    code, heavy = _imports(root, "control", run_id, stdin=b'{"op": "release"}')
    assert (code, heavy) == (0, [])
    for args in (["watch"], ["release"]):
        code, heavy = _imports(root, *args, stdin=(run_id + " nosuch").encode())
        assert (code, heavy) == (0, []), args
    # (a directory the program made in its spool goes too, and a symbolic
    # link in it is removed, not followed)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_bytes(b"x")
    os.makedirs(str(root / run_id / "made" / "deeper"))
    (root / run_id / "made" / "deeper" / "f").write_bytes(b"y")
    os.symlink(str(keep), str(root / run_id / "made" / "link"))
    code, heavy = _imports(root, "clean", run_id)
    assert (code, heavy) == (0, [])
    assert agent(root, "status", run_id).returncode == 4
    left = os.listdir(str(root))
    assert run_id not in left and not [n for n in left if n.startswith(".")], left
    assert (keep / "file").read_bytes() == b"x"



# --- the program's start, without subprocess --------------------------------------


#: The program: what it was given (descriptors, ignored signals, session,
#: umask, PR_SET_PDEATHSIG, cwd), as JSON.
PROBE = r'''
import ctypes, json, os, sys
libc = ctypes.CDLL(None)
pdeath = ctypes.c_int()
libc.prctl(2, ctypes.byref(pdeath), 0, 0, 0)  # PR_GET_PDEATHSIG
fds = []
for fd in range(1024):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
print(json.dumps({"pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "pdeath": pdeath.value,
                  "umask": os.umask(0), "cwd": os.getcwd(), "fds": fds, "argv": sys.argv[1:],
                  "ignored": int(sys.argv[1], 16), "stdin": sys.stdin.read()}))
'''


def test_the_program_starts_as_subprocess_started_it(tmp_path):
    """A session of its own, PR_SET_PDEATHSIG=SIGKILL, the umask, the cwd,
    stdin, SIGPIPE/SIGXFSZ back to default (Python ignores them), and no
    descriptor but 0, 1, 2, also none the agent inherited."""
    root = tmp_path / "spool"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    run_id = unique("probe")
    # (sh passes on its SigIgn to the Python it execs; which then ignores SIGPIPE itself)
    spec = program(run_id, ["sh", "-c", 'exec "$0" -I -S "$1" "$(grep ^SigIgn /proc/self/status | cut -f2)" x',
                            sys.executable, str(probe)], cwd=str(tmp_path), umask=0o027,
                   stdin={"data": "aW4="})
    leak_r, leak_w = os.pipe()  # inheritable: the agent has it, the program must not
    os.set_inheritable(leak_w, True)
    try:
        res = subprocess.run([sys.executable, str(AGENT), "--root", str(root), "start", "--follow"],
                             input=json.dumps(spec).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             pass_fds=(leak_w,), timeout=60)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert res.returncode == 0, res.stderr
    st = wait_state(root, run_id)
    assert st["state"] == "done" and st["return_code"] == 0, st
    got = json.loads((root / run_id / "stdout").read_text())
    assert got["pid"] == got["sid"] == got["pgid"] == st["pid"] == st["pgid"]
    assert got["pdeath"] == signal.SIGKILL
    assert got["umask"] == 0o027 and got["cwd"] == str(tmp_path) and got["stdin"] == "in"
    assert got["fds"] == [0, 1, 2], got["fds"]
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not got["ignored"] & (1 << (sig - 1)), hex(got["ignored"])


def test_exec_errors_and_the_path_search_are_subprocess_s(tmp_path):
    """PATH is searched in the program's environment; the first error that
    is not "not there" wins, else the last; chdir errors name the cwd."""
    import errno

    root = tmp_path / "spool"
    noexec, good = tmp_path / "noexec", tmp_path / "good"
    noexec.mkdir()
    good.mkdir()
    (noexec / "prog").write_text("#!/bin/sh\necho never\n")
    (good / "prog").write_text("#!/bin/sh\necho found\n")
    os.chmod(str(good / "prog"), 0o755)
    (good / "garbage").write_bytes(b"\x00\x01garbage")
    os.chmod(str(good / "garbage"), 0o755)
    cases = [
        (["prog"], {"env": {"PATH": "%s:%s" % (noexec, good)}}, None),
        (["prog"], {"env": {"PATH": "/nonexistent:%s" % noexec}}, (errno.EACCES, "prog")),
        (["prog"], {"env": {"PATH": "/etc/passwd:/nonexistent"}}, (errno.ENOENT, "prog")),  # the last
        (["prog"], {"env": {"PATH": "/nonexistent:/etc/passwd"}}, (errno.ENOTDIR, "prog")),
        (["prog"], {"env": {"PATH": ""}, "cwd": str(good)}, None),
        (["prog"], {"env_inherit": False, "cwd": str(good)}, (errno.ENOENT, "prog")),  # os.defpath
        ([str(good / "garbage")], {}, (errno.ENOEXEC, str(good / "garbage"))),
        ([str(good)], {}, (errno.EACCES, str(good))),
        (["true"], {"cwd": "/etc/passwd"}, (errno.ENOTDIR, "cwd /etc/passwd")),
        (["nonexistent-prog"], {"cwd": "/nonexistent"}, (errno.ENOENT, "cwd /nonexistent")),
        (["true", "\ud800"], {}, (None, "true: 'utf-8' codec can't encode character '\\ud800' in position 0")),
    ]
    for i, (argv, kw, want) in enumerate(cases):
        st = agent_start(root, program("px%d" % i, argv, **kw))
        if want is None:
            assert st["state"] in ("running", "done"), st
            assert wait_state(root, "px%d" % i)["return_code"] == 0
            assert (root / ("px%d" % i) / "stdout").read_bytes() == b"found\n"
            continue
        assert st["state"] == "error" and st["pid"] is None, st
        assert st["errno"] == want[0], (argv, kw, st)
        if want[0] is not None:
            assert st["error"] == "%s: %s" % (want[1], os.strerror(want[0])), st
        else:
            assert st["error"].startswith(want[1]), st


def test_a_failed_exec_leaves_no_process(tmp_path):
    """The child that could not exec reports and exits: it never goes on
    as a second supervisor (which would write states and wait for input)."""
    root = tmp_path / "spool"
    marker = unique("noexec")
    st = agent_start(root, program("gone", ["/nonexistent/%s" % marker], cwd=str(tmp_path)))
    assert st["state"] == "error"
    import psutil

    time.sleep(0.2)
    left = [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in (p.info["cmdline"] or []))]
    assert not left, left
    assert sorted(os.listdir(str(root / "gone"))) == ["control", "program.json", "state.json", "stderr", "stdout",
                                                      "timeline"]


# --- fsync only what must survive a crash -------------------------------------------


def test_only_final_states_are_fsynced(tmp_path, monkeypatch):
    """program.json, the placeholder and the running state are written
    atomically without fsync; done, error and lost are fsynced before their
    rename, and their directory after it."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink("/proc/self/fd/%d" % fd))
        real_fsync(fd)

    monkeypatch.setattr(ag.os, "fsync", fsync)
    root = str(tmp_path)
    spec = ag.validate_spec(program("fs", ["true"]))
    run, claimed = ag.claim(root, spec)
    assert claimed and synced == []
    st = run.read_state()
    assert st["state"] == "running"
    run.write_state(dict(st, pid=1))
    assert synced == []
    for state in ("done", "error", "lost"):
        run.write_state(dict(st, state=state))
        assert len(synced) == 2 and synced[0].startswith(os.path.join(root, "fs", "state.json."))
        assert synced[1] == os.path.join(root, "fs")
        del synced[:]
        assert run.read_state()["state"] == state
    assert sorted(os.listdir(os.path.join(root, "fs"))) == ["control", "program.json", "state.json", "stderr",
                                                             "stdout", "timeline"]


@pytest.mark.skipif(not os.path.exists("/usr/bin/strace"), reason="needs strace")
def test_a_run_costs_one_durable_write(tmp_path):
    """End to end (strace): a run, its supervisor included, fsyncs its
    final state and then its directory, nothing else.  A batch of three:
    three of each."""
    root = tmp_path / "spool"
    trace = tmp_path / "trace"

    def fsyncs(args, stdin):
        res = subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                              sys.executable, str(AGENT), "--root", str(root)] + args,
                             input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert res.returncode == 0, res.stderr
        return [line for line in trace.read_text().splitlines() if "sync(" in line]

    assert len(fsyncs(["start", "--follow"], json.dumps(program("one", ["true"])).encode())) == 2
    assert len(fsyncs(["start", "--follow"], json.dumps(program("bad", ["/nonexistent/x"])).encode())) == 2
    batch = [program("b%d" % i, ["true"]) for i in range(3)]
    assert len(fsyncs(["start"], json.dumps(batch).encode())) == 6  # (strace -f waits for the supervisors)
    for i in range(3):
        assert wait_state(root, "b%d" % i)["state"] == "done"


def _damage(root, run_id, data):
    with open(os.path.join(str(root), run_id, "state.json"), "wb") as f:
        f.write(data)


@pytest.mark.parametrize("data", [b"", b"\0" * 700, b'{"state": "runn', b"[]", b'{"no": "state"}', b"\xff\xfe"])
def test_a_damaged_state_is_one_error_for_that_run(tmp_path, data):
    """After an OS crash the state of a run that was running may be
    anything (it was not fsynced): each command says so in one line (exit
    3) for that run; list lists the others; clean --force removes it."""
    from support.helpers import one_line_error

    root = tmp_path / "spool"
    for run_id in ("ok1", "hurt", "ok2"):
        agent_start(root, program(run_id, ["true"]))
        wait_state(root, run_id)
    _damage(root, "hurt", data)
    for args in (["status", "hurt"], ["follow", "hurt"], ["output", "hurt", "--stream", "stdout"],
                 ["signal", "hurt", "TERM"], ["clean", "hurt"]):
        res = agent(root, *args)
        assert res.returncode == 3 and res.stdout == b"", (args, res)
        line = one_line_error(res.stderr)
        assert line.startswith("chaperone-agent: run hurt: state.json is damaged ("), line
    res = agent(root, "list")
    assert res.returncode == 0
    assert [st["id"] for st in json.loads(res.stdout.decode())] == ["ok1", "ok2"]
    assert one_line_error(res.stderr).startswith("chaperone-agent: run hurt: state.json is damaged (")
    res = agent(root, "start", input=json.dumps([program("hurt", ["true"]), program("new", ["true"])]).encode())
    assert res.returncode == 0, res.stderr
    answers = json.loads(res.stdout.decode())
    assert answers[0]["id"] == "hurt" and "state.json is damaged" in answers[0]["rejected"]
    assert answers[1]["id"] == "new" and answers[1]["state"] in ("running", "done")
    res = agent(root, "clean", "hurt", "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.decode()) == {"id": "hurt", "cleaned": True, "state": None}
    assert not os.path.exists(str(root / "hurt"))


def test_bootstraps_hash_without_hashlib():
    """The bootstraps' SHA-256 (``_H``, in PRELUDE) is hashlib's, from the
    interpreter's built-in module: hashlib loads OpenSSL and reads its
    configuration (3 ms of each agent call here)."""
    from chaperone.agent_source import LOCAL_BOOTSTRAP, PRELUDE, SHA256, sha256_hex
    from chaperone.transports.ssh.remote import BOOTSTRAP, SHIP

    assert SHA256 in BOOTSTRAP and SHA256 in SHIP and "_H" not in LOCAL_BOOTSTRAP  # (it hashes nothing)
    data = bytes(range(256)) * 1000
    code = PRELUDE + SHA256 + ("print(_H(sys.stdin.buffer.read()).hexdigest(), "
                      "sorted(m for m in ('hashlib', '_hashlib') if m in sys.modules))")
    for py in PYTHONS:
        out = subprocess.run([py, "-I", "-S", "-c", code], input=data, stdout=subprocess.PIPE, timeout=60,
                             check=True).stdout
        assert out.decode().split(None, 1) == [hashlib.sha256(data).hexdigest(), "[]\n"], py
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
