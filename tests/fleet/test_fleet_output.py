"""Output shapes for many hosts (chaperone.fleet.output): bytes exactly,
lines never mixed, gathered blocks, JSON lines, summary, exit status."""

import base64
import io
import json
import random

from hypothesis import example, given, settings, strategies as st

from chaperone.fleet.fanout import HostFailure, HostResult
from chaperone.fleet.inventory import HostEntry
from chaperone.fleet.output import (NO_NEWLINE, HostOutcome, LiveOutput, exit_status, gather, gather_groups,
                                    host_json, json_line, outcome_from_result, progress_line, summary_rows,
                                    summary_table)


def test_live_prefixes_aligned_and_streams_separate():
    out, err = io.BytesIO(), io.BytesIO()
    live = LiveOutput(["h1", "h100"], out, err)
    live.feed("h1", b"hel")
    live.feed("h100", b"a\nb")
    live.feed("h1", b"lo\n\xff\xfe\x00bin\r\n")
    live.feed("h100", b"warn\n", "stderr")
    live.end("h100")
    live.close()
    assert out.getvalue() == (b"h100: a\n"
                              b"h1:   hello\n"
                              b"h1:   \xff\xfe\x00bin\r\n"
                              b"h100: b\n"
                              b"h100: " + NO_NEWLINE + b"\n")
    assert err.getvalue() == b"h100: warn\n"


class Writes(io.BytesIO):
    """Records every write() call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, b):
        self.calls.append(bytes(b))
        return super().write(b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=3, max_size=3), st.randoms(use_true_random=False))
@example([b"x" * 16, b"y" * 17, b"z" * 32], random.Random(0))   # pieces of exactly max_line, no newline
@example([b"", b"", b"\0" * 17 + b"\n"], random.Random(0))      # a line longer than max_line, come in pieces
def test_live_lines_never_mix_hosts_and_keep_every_byte(datas, rnd):
    names = ["a", "bb", "ccc"]
    out = Writes()
    live = LiveOutput(names, out, max_line=16)
    queues = {}
    for name, data in zip(names, datas):
        cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(3))
        queues[name] = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
    while any(queues.values()):  # the hosts' chunks interleaved, each host's in order
        name = rnd.choice([n for n in names if queues[n]])
        live.feed(name, queues[name].pop(0))
    live.close()
    for call in out.calls:
        assert call.endswith(b"\n")                    # one whole line per write
        head = call[:5].rstrip(b" ")
        assert head[:-1] in (b"a", b"bb", b"ccc") and head[-1:] in (b":", b"+")
        assert call[:5] == head + b" " * (5 - len(head))  # aligned on the longest name
        assert len(call) <= 5 + 16 + 1 or call[5:] == NO_NEWLINE + b"\n"
    for name, data in zip(names, datas):
        assert _unsplit(out.calls, name) == data


def _unsplit(calls, name):
    """A host's bytes rebuilt from the writes: ':' starts a line, '+' continues
    the previous one (which ended with an added newline); a "No newline"
    marker removes the newline added to the last line."""
    lines = []
    for call in calls:
        head = call[:5].rstrip(b" ")
        if head[:-1] != name.encode():
            continue
        mark, body = head[-1:], call[5:]
        if body == NO_NEWLINE + b"\n" and mark == b":":
            lines[-1] = lines[-1][:-1]
        elif mark == b"+":
            lines[-1] = lines[-1][:-1] + body
        else:
            lines.append(body)
    return b"".join(lines)


def test_colour_is_only_decoration():
    out = io.BytesIO()
    live = LiveOutput(["a", "b"], out, color=True)
    live.feed("a", b"x\n")
    live.feed("b", b"y")
    live.close()
    assert out.getvalue() == (b"\x1b[32ma:\x1b[0m x\n\x1b[33mb:\x1b[0m y\n"
                              b"\x1b[33mb:\x1b[0m \x1b[2m" + NO_NEWLINE + b"\x1b[0m\n")


def _o(name, state="done", code=0, out=b"", err=b"", **kw):
    return HostOutcome(name, state, code, kw.pop("duration", 0.1), stdout=out, stderr=err, **kw)


def test_gather_groups_need_identical_stdout_stderr_and_exit():
    outcomes = [_o("h%d" % i, out=b"same\n") for i in (1, 2, 3, 5)] + [
        _o("h4", code=1, out=b"same\n"),                      # same output, other exit: apart (clush -b)
        _o("h6", out=b"same\n", err=b"warn\n"),                # other stderr: apart
        _o("h7", "unreachable", None, reason="ssh: connect to host h7 port 22: Connection refused"),
        _o("h8", "unreachable", None, reason="ssh: connect to host h8 port 22: Connection refused"),
        _o("h9", out=b"\xff\x00 no newline"),
    ]
    groups = [(h, [o.name for o in ms]) for h, ms in gather_groups(outcomes)]
    assert groups == [("h[1-3,5]", ["h1", "h2", "h3", "h5"]), ("h4", ["h4"]), ("h6", ["h6"]), ("h7", ["h7"]),
                      ("h8", ["h8"]), ("h9", ["h9"])]
    out, err = io.BytesIO(), io.BytesIO()
    gather(outcomes, out, err)
    rule = b"-" * 15 + b"\n"
    assert out.getvalue() == (rule + b"h[1-3,5] (4)\n" + rule + b"same\n" +
                              rule + b"h4 (1): exit 1\n" + rule + b"same\n" +
                              rule + b"h6 (1)\n" + rule + b"same\n" +
                              rule + b"h7 (1): unreachable: ssh: connect to host h7 port 22: Connection refused\n"
                              + rule +
                              rule + b"h8 (1): unreachable: ssh: connect to host h8 port 22: Connection refused\n"
                              + rule +
                              rule + b"h9 (1)\n" + rule + b"\xff\x00 no newline\n" + NO_NEWLINE + b"\n")
    assert err.getvalue() == b"warn\n"


def test_json_lines_bytes_exact():
    o = _o("h1", out=b"text\n", err=b"\xff\xfe\x00", run_id="r1", final={"state": "done", "return_code": 0},
           hostname="127.0.0.2", duration=0.25)
    line = json_line(o)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    d = json.loads(line)
    assert d == {"host": "h1", "hostname": "127.0.0.2", "state": "done", "exit_status": 0, "duration": 0.25,
                 "reason": None, "run_id": "r1", "final": {"state": "done", "return_code": 0},
                 "stdout": "text\n", "stderr_base64": base64.b64encode(b"\xff\xfe\x00").decode()}
    assert base64.b64decode(d["stderr_base64"]) == b"\xff\xfe\x00"
    assert "stdout" not in host_json(o, output=False)
    bad = host_json(_o("h2", "unreachable", None, reason="refused"))
    assert (bad["exit_status"], bad["final"], bad["reason"]) == (255, None, "refused")


def test_summary_folds_equal_rows():
    outcomes = [_o("h%02d" % i, duration=0.1 + i / 100) for i in range(1, 11)] + [
        _o("h11", code=2), _o("h12", "unreachable", None, reason="Connection refused", duration=None),
        _o("h13", "timeout", None, reason="timed out after 5 s"), _o("h14", "error", 127, reason="no such program")]
    table = summary_table(outcomes)
    assert table.splitlines() == [
        "HOST      STATE        EXIT  DURATION     REASON",
        "h[01-10]  done            0  0.11-0.20 s",
        "h11       done            2  0.10 s",
        "h12       unreachable   255  -            Connection refused",
        "h13       timeout       124  0.10 s       timed out after 5 s",
        "h14       error         127  0.10 s       no such program",
    ]
    assert len(summary_rows(outcomes, fold_rows=False)) == 14
    rows = summary_rows([_o("a", run_id="r1"), _o("b", run_id="r2"), _o("c", code=3, run_id="r3")])
    assert rows == [("a,b", "done", "0", "0.10 s", "", "2 runs"), ("c", "done", "3", "0.10 s", "", "r3")]


def test_exit_status_rule():
    assert exit_status([]) == 0
    assert exit_status([_o("a"), _o("b")]) == 0
    assert exit_status([_o("a"), _o("b", code=3), _o("c", code=1)]) == 3           # the largest, as clush -S
    assert exit_status([_o("a", code=3), _o("b", "unreachable", None)]) == 255     # not reached: 255
    assert exit_status([_o("a", code=1), _o("b", "timeout", None)]) == 124
    assert exit_status([_o("a"), _o("b", "cancelled", None)]) == 130
    assert exit_status([_o("a"), _o("b", "done", 130 + 13)]) == 143                # killed by a signal
    assert exit_status([_o("a"), _o("b", "lost", None)]) == 255
    assert exit_status([_o("a"), _o("b", "failed", 0)]) == 1                      # never 0 for a failure


def test_outcome_from_result():
    e = HostEntry(name="h1", hostname="127.0.0.2")
    ok = outcome_from_result(HostResult(e, "ok", value=None, started=1.0, ended=1.5))
    assert (ok.name, ok.hostname, ok.state, ok.status, ok.duration) == ("h1", "127.0.0.2", "done", 0, 0.5)
    given_ = _o("h1", code=4, duration=None)
    assert outcome_from_result(HostResult(e, "ok", value=given_, started=0, ended=2)).duration == 2
    err = HostFailure("ssh: Host key verification failed.", exit_status=255)
    bad = outcome_from_result(HostResult(e, "failed", error=err, reason=str(err), started=0, ended=1))
    assert (bad.state, bad.status, bad.reason) == ("failed", 255, "ssh: Host key verification failed.")
    t = outcome_from_result(HostResult("h2", "timeout", reason="timed out after 1 s"))
    assert (t.name, t.state, t.status) == ("h2", "timeout", 124)


def test_progress_line():
    assert progress_line(12, 50, 1, 8) == "12/50 done, 1 failed, 8 running"
    assert progress_line(50, 50) == "50/50 done"


def test_summary_fits_a_terminal_by_cutting_reasons():
    """On a terminal each row stays one line: a reason too long for the
    width is cut with an ellipsis (the RUN column after it stays whole)."""
    long = "unknown host nodeX: Name or service not known (is it in ~/.ssh/config? check the spelling)"
    outcomes = [_o("node01", run_id="g-node01"), _o("nodeX", "failed", 255, reason=long, run_id="g-nodeX")]
    lines = summary_table(outcomes, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[2].startswith("nodeX") and lines[2].endswith("g-nodeX") and "\u2026" in lines[2]
    assert "unknown host nodeX: Name" in lines[2]
    assert summary_table(outcomes, width=400).splitlines()[2].find(long) > 0   # wide enough: whole
