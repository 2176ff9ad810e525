"""The agent's lean start-up: what it does instead of importing json, re,
signal (enum) and threading at every call must behave exactly as those do.

The JSON and signal checks run under every Python the agent supports that
is installed here (3.8 to 3.13), each against its own stdlib.
"""

import os
import random
import re
import signal
import subprocess
import sys

import pytest

from helpers import AGENT, agent, agent_start, program, unique, wait_state

PYTHONS = [sys.executable, "/usr/bin/python3"] + [
    "/root/.pyenv/versions/%s/bin/python" % v for v in ("3.8.18", "3.9.18", "3.10.13", "3.12.1", "3.13.0")]
PYTHONS = [p for p in dict.fromkeys(PYTHONS) if os.path.exists(p)]

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

lean = []
for v in values:
    lean.append(outcome(lambda: ag.dumps(v)))
    lean.append(outcome(lambda: ag.dumps(v, sort_keys=True)))
    lean.append(outcome(lambda: ag.loads(ag.dumps(v))))
    lean.append(outcome(lambda: ag.loads(ag.dumps(v, sort_keys=True))))
heavy = sorted(m for m in ("json", "re", "enum", "signal", "threading", "subprocess") if m in sys.modules)
assert not heavy, "valid JSON loaded %s" % heavy
for v in bad_values:
    lean.append(outcome(lambda: ag.dumps(v)))
    lean.append(outcome(lambda: ag.dumps(v, sort_keys=True)))
for d in docs + [d.encode() for d in docs[:5]]:
    lean.append(outcome(lambda: ag.loads(d)))

import json

ref = []
for v in values:
    ref.append(outcome(lambda: json.dumps(v)))
    ref.append(outcome(lambda: json.dumps(v, sort_keys=True)))
    ref.append(outcome(lambda: json.loads(json.dumps(v))))
    ref.append(outcome(lambda: json.loads(json.dumps(v, sort_keys=True))))
for v in bad_values:
    ref.append(outcome(lambda: json.dumps(v)))
    ref.append(outcome(lambda: json.dumps(v, sort_keys=True)))
for d in docs + [d.encode() for d in docs[:5]]:
    ref.append(outcome(lambda: json.loads(d)))
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
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaperone_agent_lean_test", str(AGENT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
SourceFileLoader("chaperone_agent_imports", ag.__file__).exec_module(ag)
code = ag.main(sys.argv[2:])
heavy = sorted(m for m in ("json", "re", "enum", "signal", "threading", "subprocess", "argparse",
                           "datetime", "tempfile", "shutil", "base64", "ssl") if m in sys.modules)
os.write(2, ("\nIMPORTED %d %s\n" % (code, " ".join(heavy))).encode())
'''


def _imports(root, *args, stdin=b""):
    res = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", IMPORTS, str(AGENT), "--root", str(root)]
                         + list(args), input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    line = res.stderr.decode().rsplit("\nIMPORTED ", 1)[1].split()
    return int(line[0]), line[1:]


def test_commands_import_no_heavy_module(tmp_path):
    root = tmp_path / "spool"
    run_id = unique("imp")
    agent_start(root, program(run_id, ["sh", "-c", "echo out; echo err >&2"]))
    wait_state(root, run_id)
    for args in (["status", run_id], ["list"], ["follow", run_id], ["output", run_id, "--stream", "stdout"],
                 ["signal", run_id, "TERM"], ["status", "nosuch"], ["status", "bad..id"]):
        code, heavy = _imports(root, *args)
        assert code in (0, 1, 2, 4), (args, code)
        assert heavy == [], (args, heavy)
    code, heavy = _imports(root, "control", run_id, stdin=b'{"op": "release"}')
    assert (code, heavy) == (0, [])
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
    assert os.listdir(str(root)) == [] and (keep / "file").read_bytes() == b"x"
