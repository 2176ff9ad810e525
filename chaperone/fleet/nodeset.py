"""Node sets, as ClusterShell writes them, plus Ansible's inventory ranges.

Pure functions, no I/O.  The syntax (docs/hosts.md has the user's version):

* A *name* is literal text with any number of bracketed ranges, expanded as
  a cartesian product, left to right (``dc[1-2]n[1-3]`` gives dc1n1, dc1n2,
  dc1n3, dc2n1 ...).  Literal digits next to a bracket simply stay there
  (``node1[0-2]`` is node10..node12, as ClusterShell amends it).
* Inside brackets, comma-separated items:

  - ClusterShell: ``5``, ``1-20``, ``1-9/2`` (a step);
  - Ansible: ``01:10``, ``01:10:3`` (a step), ``:5`` (from 0);
  - letters (Ansible): ``a:f`` (``a-f`` too), single ASCII letters, in
    Ansible's order a..z then A..Z.

  Padding is kept: a bound with a leading zero (``01``) pads every number of
  the item to its width.  Both bounds must then have the same width
  (``[01-100]`` is an error, as in ClusterShell and Ansible), and an
  unpadded start with a padded end (``[1-010]``) is an error too.
* Operators between names, evaluated strictly left to right with equal
  precedence, as ClusterShell does (``a,b!a`` is ``b``; ``a!b,b`` is
  ``a,b``): ``,`` union, ``!`` difference, ``&`` intersection, ``^``
  symmetric difference.  Spaces around names are ignored.
* ``@group`` and ``@source:group`` are resolved through a *resolver*
  callback ``resolver(group, source) -> iterable of node-set strings, or
  None if unknown``; the strings may themselves contain ``@groups``
  (recursion is bounded and cycles are an error).  Ranges in a group name
  name several groups (``@rack[1-2]`` is ``@rack1,@rack2``, as ClusterShell).
  ``@*`` asks the resolver for the group ``"*"`` (meaning: all).

Ansible's host *patterns* (``web:&prod``, ``~regex``, subscripts) are a
superset handled by :mod:`chaperone.fleet.patterns`, on the same scanner
(:func:`tokenize` with ``ansible=True``).

Bounded: :func:`expand` refuses a result (or any intermediate set or single
range) over ``limit`` names (:data:`DEFAULT_LIMIT`, 100,000) before building
it, so ``node[1-1000000000]`` is an error, not an exhausted machine.

Errors are :class:`NodeSetError` (a ValueError), one line naming the column:
``host pattern 'node[1-3': '[' at column 5 is never closed``.

:func:`fold` turns a list of names back into a short node set, the way
``nodeset -f`` and ``clush -b`` headers write it: ``node[1-3,5]``,
``dc[1-2]n[1-2]``, ``node[9,09-10]``; no steps (``node[1,3,5]``).
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple
from ..errors import NodeSetError  # noqa: F401 (defined there; exported here too)

__all__ = [
    "DEFAULT_LIMIT", "NodeSetError", "Term", "Resolver", "tokenize", "expand_name", "count_name",
    "expand", "fold", "natural_key",
]

#: The most names one pattern may expand to (and the largest single range).
DEFAULT_LIMIT = 100_000
#: How deep ``@group`` definitions may refer to other groups.
MAX_GROUP_DEPTH = 20

#: resolver(group, source) -> node-set strings (or host names), or None if unknown.
Resolver = Callable[[str, Optional[str]], Optional[Iterable[str]]]

OPERATORS = ",!&^"
_LETTERS = string.ascii_letters  # Ansible's order: a..z, A..Z


@dataclass(frozen=True)
class Term:
    """One operand of a pattern: ``op`` is how it combines with what came
    before (``,`` ``!`` ``&`` ``^``); ``text`` is the operand, stripped;
    ``pos`` its column (0-based) in the pattern; ``prefixed`` says the
    operator was written in front of the operand after a separator
    (Ansible's ``web:!db``, ``web,&prod``) or at the very start, rather than
    between two operands (ClusterShell's ``web!db``); ``sep`` is the
    separator written before it (``,`` or ``:``; ``""`` for the first)."""

    op: str
    text: str
    pos: int
    prefixed: bool = False
    sep: str = ""
    op_pos: int = -1  # column (0-based) of the operator or separator before it; -1 for none


# --- scanning -----------------------------------------------------------------------


def _close_bracket(s: str, i: int, pattern: str, base: int) -> int:
    """Index of the ']' closing the '[' at s[i]."""
    j = s.find("]", i + 1)
    k = s.find("[", i + 1)
    if j < 0 or (0 <= k < j):
        raise NodeSetError(pattern, "'[' {at} is never closed", base + i)
    return j


def _ipv6_at(s: str, i: int) -> int:
    """If an IPv6 literal starts at s[i] (up to the next operator or the
    end), the index just past it; else -1."""
    import ipaddress

    j = i
    while j < len(s) and s[j] not in OPERATORS and not s[j].isspace():
        j += 1
    cand = s[i:j]
    if cand.count(":") < 2:
        return -1
    try:
        ipaddress.IPv6Address(cand.split("%", 1)[0])
    except ValueError:
        return -1
    return j


def _port_at(s: str, j: int) -> bool:
    """Whether the ':' at ``j`` starts a port: digits to the end or a ','."""
    k = j + 1
    while k < len(s) and s[k].isdigit():
        k += 1
    return k > j + 1 and (k == len(s) or s[k] in ",:")


def tokenize(pattern: str, *, ansible: bool = False) -> List[Term]:
    """Split a pattern into :class:`Term` s.

    With ``ansible=False`` (a ClusterShell node set): operators ``,!&^``
    between operands, every operand non-empty.  With ``ansible=True`` (host
    patterns, :mod:`chaperone.fleet.patterns`), also: ``:`` is a separator
    like ``,`` (but not the first ``:`` of ``@source:group``, nor inside an
    IPv6 literal or brackets); an operator may follow a separator or start
    the pattern (``web:!db``, ``!db``); ``~regex`` runs to the next ``,``
    or ``:`` outside brackets and parentheses and its characters are
    literal."""
    if not isinstance(pattern, str):
        raise TypeError("a pattern is a str, not %s" % type(pattern).__name__)
    s = pattern
    n = len(s)
    terms: List[Term] = []
    i = 0
    op, sep, prefixed, op_pos = ",", "", False, -1
    expect_operand = True  # at the start, or after a separator/operator
    after_sep = True       # an operator here would be a prefix
    while True:
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            if terms or not expect_operand or op != "," or sep:
                if expect_operand:
                    what = ("'%s'" % op) if op != "," or not sep else "'%s'" % sep
                    raise NodeSetError(pattern, "nothing after %s {at}" % what, max(n - 1, 0))
            break
        c = s[i]
        # An operator in front of an operand.
        if c in "!&^" and expect_operand:
            if not ansible or not after_sep or op != ",":
                raise NodeSetError(pattern, "operator %r {at} needs a name before it" % c, i)
            op, prefixed, after_sep, op_pos = c, True, False, i
            i += 1
            continue
        v6 = _ipv6_at(s, i) if ansible else -1
        if v6 < 0 and (c in OPERATORS or (ansible and c == ":")):
            raise NodeSetError(pattern, "missing name before %r {at}" % c, i)
        if c == "]":
            raise NodeSetError(pattern, "']' {at} has no '['", i)
        # An operand.
        start = i
        if ansible and c == "~":
            depth_paren = 0
            j = i + 1
            while j < n:
                d = s[j]
                if d == "\\":
                    j += 2
                    continue
                if d == "[":
                    k = j + 1
                    if k < n and s[k] == "^":
                        k += 1
                    if k < n and s[k] == "]":
                        k += 1
                    while k < n and s[k] != "]":
                        k += 2 if s[k] == "\\" else 1
                    if k >= n:
                        raise NodeSetError(pattern, "'[' {at} is never closed", j)
                    j = k + 1
                    continue
                if d == "(":
                    depth_paren += 1
                elif d == ")":
                    depth_paren -= 1
                elif depth_paren <= 0 and d in ",:":
                    break
                j += 1
            end = j
        else:
            end = v6
            if end < 0:
                j = i
                colon_ok = ansible and c == "@"  # the first ':' of @source:group
                while j < n:
                    d = s[j]
                    if d == "[":
                        j = _close_bracket(s, j, pattern, 0) + 1
                        continue
                    if d == "]":
                        raise NodeSetError(pattern, "']' {at} has no '['", j)
                    if d in OPERATORS:
                        break
                    if ansible and d == ":":
                        if colon_ok:
                            colon_ok = False
                        elif s.startswith("ssh://", start) and j == start + 3:
                            pass  # (a URL's ':' of ssh://)
                        elif _port_at(s, j):
                            pass  # (host:PORT, user@host:PORT, ssh://host:PORT: one host, as everywhere;
                            # Ansible's group names are never all digits)
                        else:
                            break
                    j += 1
                end = j
        text = s[start:end].rstrip()
        if not text or text == "~":
            raise NodeSetError(pattern, "empty name {at}", start)
        bad = next((k for k, ch in enumerate(text) if ch.isspace()), None)
        if bad is not None and not text.startswith("~"):
            raise NodeSetError(pattern, "space inside a name {at} (separate names with ',')", start + bad)
        terms.append(Term(op, text, start, prefixed, sep, op_pos))
        i = end
        while i < n and s[i].isspace():
            i += 1
        if i >= n:
            break
        c = s[i]
        if c == "," or (ansible and c == ":"):
            op, sep, prefixed, after_sep, op_pos = ",", c, False, True, i
        elif c in "!&^":
            op, sep, prefixed, after_sep, op_pos = c, "", False, False, i
        else:  # pragma: no cover - the operand scan stops only at these
            raise NodeSetError(pattern, "unexpected %r {at}" % c, i)
        expect_operand = True
        i += 1
        if i >= n:
            raise NodeSetError(pattern, "nothing after %r {at}" % c, i - 1)
    return terms


# --- ranges -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    start: int
    stop: int
    step: int
    pad: int       # 0: unpadded
    letters: bool = False

    def __len__(self) -> int:
        return (self.stop - self.start) // self.step + 1

    def items(self) -> Iterable[str]:
        if self.letters:
            return _LETTERS[self.start:self.stop + 1:self.step]
        if self.pad:
            return (str(v).zfill(self.pad) for v in range(self.start, self.stop + 1, self.step))
        return (str(v) for v in range(self.start, self.stop + 1, self.step))


def _bound(text: str, pattern: str, pos: int) -> Tuple[int, int, bool]:
    """(value, pad, letter) of one range bound."""
    if text.isdigit() and text.isascii():
        pad = len(text) if len(text) > 1 and text[0] == "0" else 0
        if len(text) > 18:
            raise NodeSetError(pattern, "number %s {at} is too large" % text, pos)
        return int(text), pad, False
    if len(text) == 1 and text in _LETTERS:
        return _LETTERS.index(text), 0, True
    raise NodeSetError(pattern, "%r {at} is not a number or a letter" % text if text else "empty range bound {at}",
                       pos)


def _parse_ranges(inner: str, pattern: str, pos: int) -> List[_Range]:
    """The items of one bracket (``inner`` is its text, at ``pos``)."""
    out = []
    offset = 0
    for item in inner.split(","):
        ipos = pos + offset
        offset += len(item) + 1
        it = item.strip()
        if not it:
            raise NodeSetError(pattern, "empty range {at}", ipos)
        step = 1
        if ":" in it:  # Ansible: begin:end[:step]
            parts = it.split(":")
            if len(parts) not in (2, 3):
                raise NodeSetError(pattern, "range %r {at} is not begin:end or begin:end:step" % it, ipos)
            a, b = parts[0].strip() or "0", parts[1].strip()
            if not b:
                raise NodeSetError(pattern, "range %r {at} has no end" % it, ipos)
            if len(parts) == 3:
                st = parts[2].strip()
                if not (st.isdigit() and st.isascii()):
                    raise NodeSetError(pattern, "step %r {at} is not a number" % st, ipos)
                step = int(st)
        elif "-" in it:  # ClusterShell: a-b[/step]
            rng, slash, st = it.partition("/")
            if slash:
                st = st.strip()
                if not (st.isdigit() and st.isascii()):
                    raise NodeSetError(pattern, "step %r {at} is not a number" % st, ipos)
                step = int(st)
            a, dash, b = rng.partition("-")
            a, b = a.strip(), b.strip()
            if not a or not b:
                raise NodeSetError(pattern, "range %r {at} needs both bounds" % it, ipos)
        else:
            if "/" in it:
                raise NodeSetError(pattern, "a step {at} needs a range (a-b/step)", ipos)
            a = b = it
        if step < 1:
            raise NodeSetError(pattern, "step {at} must be 1 or more", ipos)
        va, pa, la = _bound(a, pattern, ipos)
        vb, pb, lb = _bound(b, pattern, ipos)
        if la != lb:
            raise NodeSetError(pattern, "range %r {at} mixes a letter and a number" % it, ipos)
        if not la and (pa or pb) and len(a) != len(b):
            raise NodeSetError(pattern, "padding mismatch in %r {at}: both bounds need as many digits" % it, ipos)
        if vb < va:
            raise NodeSetError(pattern, "range %r {at} goes backwards" % it, ipos)
        out.append(_Range(va, vb, step, pa, la))
    return out


def _split_name(name: str, pattern: str, pos: int) -> List[object]:
    """Literal strings and lists of ranges, in order."""
    parts: List[object] = []
    i = 0
    lit = []
    while i < len(name):
        c = name[i]
        if c == "[":
            j = _close_bracket(name, i, pattern, pos)
            if lit:
                parts.append("".join(lit))
                lit = []
            parts.append(_parse_ranges(name[i + 1:j], pattern, pos + i + 1))
            i = j + 1
        elif c == "]":
            raise NodeSetError(pattern, "']' {at} has no '['", pos + i)
        else:
            lit.append(c)
            i += 1
    if lit:
        parts.append("".join(lit))
    return parts


def _count(parts: Sequence[object]) -> int:
    total = 1
    for p in parts:
        if isinstance(p, list):
            total *= sum(len(r) for r in p)
    return total


def count_name(name: str, pattern: Optional[str] = None, pos: int = 0) -> int:
    """How many names ``name`` (one operand, with brackets) expands to."""
    return _count(_split_name(name, name if pattern is None else pattern, pos))


def expand_name(name: str, limit: int = DEFAULT_LIMIT, *, pattern: Optional[str] = None,
                pos: int = 0) -> List[str]:
    """The names one operand with brackets stands for, in order
    (``db[01:03]`` -> db01, db02, db03).  ``pattern``/``pos`` place errors
    in a larger pattern."""
    pattern = name if pattern is None else pattern
    parts = _split_name(name, pattern, pos)
    n = _count(parts)
    if n > limit:
        raise NodeSetError(pattern, "%r {at} expands to %d names, over the limit of %d" % (name, n, limit), pos)
    choices = [[p] if isinstance(p, str) else [x for r in p for x in r.items()] for p in parts]
    if not choices:
        return [""]
    seen: Dict[str, None] = {}
    for combo in itertools.product(*choices):
        seen["".join(combo)] = None
    return list(seen)


# --- sets -------------------------------------------------------------------------------


def _apply(acc: Dict[str, None], op: str, names: Iterable[str]) -> Dict[str, None]:
    if op == ",":
        for x in names:
            acc[x] = None
        return acc
    other = dict.fromkeys(names)
    if op == "!":
        return {x: None for x in acc if x not in other}
    if op == "&":
        return {x: None for x in acc if x in other}
    if op == "^":
        out = {x: None for x in acc if x not in other}
        for x in other:
            if x not in acc:
                out[x] = None
        return out
    raise ValueError(op)  # pragma: no cover


def natural_key(name: str) -> tuple:
    """Sort key putting node2 before node10 (and node9 before node09)."""
    parts = re.split(r"(\d+)", name)
    return tuple((int(p), len(p)) if k % 2 else p for k, p in enumerate(parts))


def expand(nodeset: str, resolver: Optional[Resolver] = None, *, limit: int = DEFAULT_LIMIT) -> List[str]:
    """The names of a ClusterShell node set, sorted naturally, without
    duplicates; see the module docstring.  Raises :class:`NodeSetError`."""
    return sorted(_expand(nodeset, resolver, limit, ()), key=natural_key)


def _expand(nodeset: str, resolver: Optional[Resolver], limit: int, stack: tuple) -> Dict[str, None]:
    acc: Dict[str, None] = {}
    for term in tokenize(nodeset):
        if term.text.startswith("@"):
            names = _expand_groups(nodeset, term, resolver, limit, stack)
        else:
            names = expand_name(term.text, limit, pattern=nodeset, pos=term.pos)
        acc = _apply(acc, term.op, names)
        if len(acc) > limit:
            raise NodeSetError(nodeset, "more than %d names" % limit)
    return acc


def _expand_groups(nodeset: str, term: Term, resolver: Optional[Resolver], limit: int,
                   stack: tuple) -> List[str]:
    body = term.text[1:]
    source: Optional[str] = None
    if ":" in body.split("[", 1)[0]:
        source, body = body.split(":", 1)
        if not source:
            raise NodeSetError(nodeset, "empty group source {at}", term.pos)
    if not body:
        raise NodeSetError(nodeset, "empty group name {at}", term.pos)
    if resolver is None:
        raise NodeSetError(nodeset, "group %s {at} needs an inventory" % term.text, term.pos)
    out: Dict[str, None] = {}
    group_names = ["*"] if body == "*" else expand_name(body, limit, pattern=nodeset, pos=term.pos + 1)
    for group in group_names:
        key = (source, group)
        label = "@%s%s" % (source + ":" if source else "", group)
        if key in stack or len(stack) >= MAX_GROUP_DEPTH:
            chain = " -> ".join("@%s%s" % (s + ":" if s else "", g) for s, g in stack + (key,))
            raise _GroupLoop(nodeset, ("group %s contains itself: %s" % (label, chain)) if key in stack
                             else "groups nest more than %d deep: %s" % (MAX_GROUP_DEPTH, chain))
        members = resolver(group, source)
        if members is None:
            raise NodeSetError(nodeset, "unknown group %s {at}" % label, term.pos)
        for member in members:
            try:
                sub = _expand(member, resolver, limit, stack + (key,))
            except _GroupLoop as e:
                if stack:
                    raise
                raise NodeSetError(nodeset, e.detail) from None
            except NodeSetError as e:
                raise NodeSetError(nodeset, "in group %s {at}, %r: %s" % (label, member, e.detail),
                                   term.pos) from None
            out.update(sub)
            if len(out) > limit:
                raise NodeSetError(nodeset, "group %s {at} has more than %d names" % (label, limit), term.pos)
    return list(out)


class _GroupLoop(NodeSetError):
    """A group cycle: reported once, for the outermost pattern."""


# --- folding -------------------------------------------------------------------------


_DIGITS = re.compile(r"(\d+)")


def _fold_indexes(indexes: Iterable[str]) -> str:
    """Digit strings -> the inside of a bracket ("1-3,5", "08-11"), and
    whether it needs the brackets (more than one number)."""
    unpadded = set()
    padded: Dict[int, set] = {}
    for s in indexes:
        if len(s) > 1 and s[0] == "0":
            padded.setdefault(len(s), set()).add(int(s))
        else:
            unpadded.add(int(s))
    # A number as wide as a padded group is written the same either way: it
    # joins that group when it continues one of its runs (node[08-11]).
    for width, values in padded.items():
        for v in sorted(x for x in unpadded if len(str(x)) == width):
            if v - 1 in values:
                values.add(v)
                unpadded.discard(v)
    runs: List[Tuple[int, int, int]] = []  # (start, stop, pad)
    for pad, values in [(0, unpadded)] + sorted(padded.items()):
        run_start = prev = None
        for v in sorted(values):
            if prev is not None and v == prev + 1:
                prev = v
                continue
            if prev is not None:
                runs.append((run_start, prev, pad))
            run_start = prev = v
        if prev is not None:
            runs.append((run_start, prev, pad))
    runs.sort(key=lambda r: (r[0], r[2]))

    def fmt(v: int, pad: int) -> str:
        return str(v).zfill(pad) if pad else str(v)

    return ",".join(fmt(a, p) if a == b else "%s-%s" % (fmt(a, p), fmt(b, p)) for a, b, p in runs)


def fold(hosts: Iterable[str]) -> str:
    """A short node set naming exactly ``hosts``, folded as ClusterShell's
    ``nodeset -f`` folds (``n[0-1]``, not ``n0,n1``): names are grouped by their
    non-digit parts, each run of digits is an axis, and vectors are merged
    along one axis at a time until nothing merges (``dc[1-2]n[1-2]``;
    ``dc1n[1-2],dc2n1``).  Names holding node-set syntax characters are
    listed as they are (the result is then for display only)."""
    by_pattern: Dict[Tuple[str, ...], set] = {}
    plain = set()
    for h in hosts:
        if any(c in h for c in "[],!&^@") or not _DIGITS.search(h):
            plain.add(h)
            continue
        parts = _DIGITS.split(h)
        by_pattern.setdefault(tuple(parts[0::2]), set()).add(tuple(parts[1::2]))
    pieces: List[Tuple[tuple, str]] = [(natural_key(h), h) for h in plain]
    for pat, vectors in by_pattern.items():
        for vec in _fold_vectors(vectors):
            text = []
            first = []
            for k, lit in enumerate(pat):
                text.append(lit)
                first.append(lit)
                if k < len(vec):
                    axis = vec[k]
                    inside = _fold_indexes(axis)
                    text.append(inside if len(axis) == 1 else "[%s]" % inside)
                    first.append(min(axis, key=lambda x: (int(x), len(x))))
            pieces.append((natural_key("".join(first)), "".join(text)))
    pieces.sort()
    return ",".join(p[1] for p in pieces)


def _fold_vectors(vectors: set) -> List[Tuple[frozenset, ...]]:
    """Merge index vectors (tuples of digit strings) into products of sets."""
    items = [tuple(frozenset([x]) for x in v) for v in vectors]
    dims = len(items[0]) if items else 0
    changed = True
    while changed and dims > 1:
        changed = False
        for axis in reversed(range(dims)):
            groups: Dict[tuple, set] = {}
            for it in items:
                key = it[:axis] + it[axis + 1:]
                groups.setdefault(key, set()).update(it[axis])
            if len(groups) < len(items):
                changed = True
                items = [key[:axis] + (frozenset(vals),) + key[axis:] for key, vals in groups.items()]
    if dims == 1:
        items = [(frozenset(x for it in items for x in it[0]),)]
    items.sort(key=lambda it: tuple(min((int(x), len(x)) for x in a) for a in it))
    return items
