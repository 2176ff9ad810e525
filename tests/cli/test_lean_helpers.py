"""The CLI's helpers written without re, shlex and json (the fast ``run
local`` path must not load them: ~8 ms of a 40 ms command) give exactly
what those modules give."""

import json
import re
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaperone.cli.display import parse_duration
from chaperone.errors import UsageError
from chaperone.records import _dumps, _loads, shell_join

#: parse_duration's grammar as it was written with re (the reference), but
#: for one rule added since: a number without a unit stands alone ("30"),
#: never after another ("1h30": 30 what?).
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?)", re.I)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def reference_duration(text):
    s = str(text).strip().lower()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        return None if value != value or value < 0 else value
    pos, total, matched = 0, 0.0, False
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if not m or m.end() == pos:
            break
        if m.group(2) is None:
            return None
        total += float(m.group(1)) * _UNITS[m.group(2)]
        matched, pos = True, m.end()
    return total if matched and pos == len(s) else None


def lean_duration(text):
    try:
        return parse_duration(text)
    except UsageError:
        return None


EXAMPLES = ["30", "0.5", "1.5s", "500ms", "5m", "1h30m", "2d", "1w", "inf", "1e3", " 5 m ", "1h 30m", "1.s",
            ".5s", "5x", "", "m", "1h30", "1h30x", "10 ", "1.25h", "-1s", "nan", "3MS", "2H5M", "7 d", "1h\t2m",
            "1..5s", "1.5.5s", "٣s", "1 h 2"]


@pytest.mark.parametrize("text", EXAMPLES)
def test_durations_read_as_with_re(text):
    want = reference_duration(text)
    if "٣" in text:  # (\d takes any digit; the lean reader only ASCII ones, as the help says)
        want = None
    assert lean_duration(text) == want


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789.smhdwxMS \t", max_size=12))
def test_any_duration_text_reads_as_with_re(text):
    assert lean_duration(text) == reference_duration(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=12)))
def test_shell_join_is_shlex_join(argv):
    assert shell_join(argv) == shlex.join(argv)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
def test_records_json_is_json(value):
    assert _dumps(value) == json.dumps(value)
    assert _loads(_dumps(value)) == json.loads(json.dumps(value))
