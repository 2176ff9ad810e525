"""Host patterns: ONE syntax that takes ClusterShell node sets and Ansible
host patterns alike.

Where the two habits agree there is nothing to decide: ``web,db`` is a
union; ``node[01-20]`` and ``db[01:10]`` are ranges (:mod:`.nodeset`);
``web!db`` / ``web:!db`` exclude and ``web&prod`` / ``web:&prod``
intersect.  What this module adds to a node set:

* **Separators**: ``,`` and ``:`` both (``web:db`` is ``web,db``), and an
  operator may stand in front of an operand after a separator, or at the
  very start (Ansible: ``web:&prod:!db``, ``!db`` = ``all:!db``).  A ``:``
  is not a separator inside brackets, in the first ``:`` of
  ``@source:group``, in an IPv6 literal (``fe80::1``), or in ``~regex``
  parentheses.
* **Names**: a bare name is an inventory host if there is one by that name,
  else an inventory group (Ansible: ``web`` is the group web), else a plain
  host name reachable through ssh_config or DNS (ClusterShell, ssh).
  ``all`` (and ``*``) is every inventory host; ``ungrouped`` the hosts in no
  group.  ``@name`` is the group *or label* name (labels: hosts labelled
  ``gpu`` are ``@gpu``); ``@group:name`` only the group, ``@label:name``
  only the label (an unknown ``@name`` is an error, never a host).
* **Globs and regexes**, matched against the inventory's group names (all
  their hosts) and host names, as Ansible does: ``web*``, ``db?``, and
  ``~web\\d+`` (Python's re, anchored at the start as Ansible's
  ``re.match``).  One that matches nothing is an error, unless it only
  removes or intersects.
* **Subscripts** (Ansible): ``web[0]``, ``web[-1]``, ``web[0:2]`` (both ends
  inclusive, as Ansible), ``web[1:]``: positions in the group's inventory
  order.  Only after a bare *group* name, and only in those forms;
  everywhere else brackets are ranges.  So ``db[01:10]`` is hosts db01..db10
  unless ``db`` is a group; then write ``db[01-10]`` for the hosts.

**The one decision: the order of evaluation.**  ClusterShell evaluates
left to right (``a!b,b`` is ``a,b``); Ansible applies every union first,
then the ``&``, then the ``!`` whatever their order.  The two agree
whenever no union follows an ``!`` or ``&``, which is how both are nearly
always written.  :func:`pattern_style` says which reading applies: a
pattern that uses Ansible-only syntax (a ``:`` separator, an operator after
a separator or at the start, or a ``~regex``) is read Ansible's way; any
other is read ClusterShell's way (left to right).  Ansible-only syntax
cannot be read by ClusterShell and ClusterShell syntax means the same to
Ansible except for that order, so every pattern has exactly one meaning.
``^`` (xor) has no Ansible reading: mixing it with Ansible-only syntax is
an error.

The result is sorted naturally (node2 before node10), without duplicates,
as ClusterShell lists a node set; a subscript takes positions in the
inventory's order first.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Dict, Iterable, List, Optional, Protocol, Sequence

from .nodeset import (DEFAULT_LIMIT, NodeSetError, Term, _apply, expand_name, natural_key, tokenize)

__all__ = ["HostSource", "pattern_style", "select", "NodeSetError"]

#: Ansible's subscripts: [N], [-N], [N:], [N:M].
_SUBSCRIPT = re.compile(r"^(?P<base>[^\[\]]+)\[(?:(?P<idx>-?\d+)|(?P<start>\d+):(?P<end>\d*))\]$")


class HostSource(Protocol):
    """What a pattern is resolved against (an :class:`~.inventory.Inventory`)."""

    def host_names(self) -> List[str]: ...            # inventory order
    def group_members(self, name: str) -> Optional[List[str]]: ...   # None: no such group
    def group_names(self) -> List[str]: ...
    def label_members(self, name: str) -> Optional[List[str]]: ...   # None: no such label


class _Empty:
    def host_names(self) -> List[str]:
        return []

    def group_members(self, name: str) -> Optional[List[str]]:
        return None

    def group_names(self) -> List[str]:
        return []

    def label_members(self, name: str) -> Optional[List[str]]:
        return None


def pattern_style(pattern: str) -> str:
    """``"ansible"`` if the pattern uses syntax only Ansible has (then
    unions come first, then ``&``, then ``!``), else ``"nodeset"`` (left to
    right).  Raises :class:`NodeSetError` for a bad pattern."""
    return _style(pattern, tokenize(pattern, ansible=True))


def _style(pattern: str, terms: Sequence[Term]) -> str:
    ansible = next((t for t in terms if t.sep == ":" or t.prefixed or t.text.startswith("~")), None)
    if ansible is None:
        return "nodeset"
    xor = next((t for t in terms if t.op == "^"), None)
    if xor is not None:
        raise NodeSetError(pattern, "'^' {at} (ClusterShell's xor) cannot be mixed with Ansible's syntax (':' "
                           "between names, '!' or '&' after a separator, '~regex'), which is evaluated in "
                           "another order; use ',' and infix '!' '&' '^' only", xor.op_pos)
    return "ansible"


def select(pattern: str, inventory: Optional[HostSource] = None, *, limit: int = DEFAULT_LIMIT) -> List[str]:
    """The host names a pattern selects (see the module docstring), sorted
    naturally.  ``inventory`` may be None (only plain names and ranges
    then).  Raises :class:`NodeSetError` (one line, with the column)."""
    inv = inventory if inventory is not None else _Empty()
    terms = tokenize(pattern, ansible=True)
    style = _style(pattern, terms)
    if style == "ansible":
        regular = [t for t in terms if t.op == ","]
        ordered = regular + [t for t in terms if t.op == "&"] + [t for t in terms if t.op == "!"]
        if not regular:
            acc: Dict[str, None] = dict.fromkeys(inv.host_names())
        else:
            acc = {}
    else:
        ordered = list(terms)
        acc = {}
    for term in ordered:
        names = _resolve(pattern, term, inv, limit)
        acc = _apply(acc, term.op, names)
        if len(acc) > limit:
            raise NodeSetError(pattern, "selects more than %d hosts" % limit)
    return sorted(acc, key=natural_key)


def _resolve(pattern: str, term: Term, inv: HostSource, limit: int) -> List[str]:
    text = term.text
    if text.startswith("~"):
        try:
            rx = re.compile(text[1:])
        except re.error as e:
            raise NodeSetError(pattern, "bad regular expression %r {at}: %s" % (text[1:], e), term.pos) from None
        names = _matching(inv, rx.match)
        if not names and term.op == ",":
            raise NodeSetError(pattern, "%r {at} matches no inventory host or group" % text, term.pos)
        return names
    if text.startswith("@"):
        return _groups(pattern, term, inv, limit)
    if _is_ip(text):
        return [text]
    if text in ("all", "*"):
        return list(inv.host_names())
    m = _SUBSCRIPT.match(text)
    if m and (m.group("base") == "all" or inv.group_members(m.group("base")) is not None) \
            and m.group("base") not in set(inv.host_names()):
        base = m.group("base")
        hosts = list(inv.host_names()) if base == "all" else inv.group_members(base)
        if m.group("idx") is not None:
            i = int(m.group("idx"))
            if not -len(hosts) <= i < len(hosts):
                raise NodeSetError(pattern, "%r {at}: group %s has %d hosts" % (text, base, len(hosts)), term.pos)
            return [hosts[i]]
        start = int(m.group("start"))
        end = int(m.group("end")) if m.group("end") else len(hosts) - 1
        if end < start:
            raise NodeSetError(pattern, "subscript %r {at} goes backwards" % text, term.pos)
        return hosts[start:end + 1]
    names = expand_name(text, limit, pattern=pattern, pos=term.pos)
    out: Dict[str, None] = {}
    hosts = set(inv.host_names())
    for name in names:
        if "*" in name or "?" in name:
            found = _matching(inv, lambda s, _n=name: fnmatch.fnmatchcase(s, _n))
            if not found and term.op == ",":
                raise NodeSetError(pattern, "%r {at} matches no inventory host or group" % name, term.pos)
            out.update(dict.fromkeys(found))
        elif name in hosts:
            out[name] = None
        else:
            members = inv.group_members(name)
            if members is not None:
                out.update(dict.fromkeys(members))
            else:
                out[name] = None
        if len(out) > limit:
            raise NodeSetError(pattern, "%r {at} selects more than %d hosts" % (text, limit), term.pos)
    return list(out)


def _matching(inv: HostSource, match) -> List[str]:
    out: Dict[str, None] = {}
    for g in inv.group_names():
        if match(g):
            out.update(dict.fromkeys(inv.group_members(g) or ()))
    for h in inv.host_names():
        if match(h):
            out[h] = None
    return list(out)


def _is_ip(text: str) -> bool:
    if ":" not in text:
        return False
    import ipaddress

    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _groups(pattern: str, term: Term, inv: HostSource, limit: int) -> List[str]:
    body = term.text[1:]
    source: Optional[str] = None
    head = body.split("[", 1)[0]
    if ":" in head:
        source, body = body.split(":", 1)
        if source not in ("group", "label"):
            raise NodeSetError(pattern, "unknown group source %r {at} (sources: group, label)" % source, term.pos)
    if not body:
        raise NodeSetError(pattern, "empty group name {at}", term.pos)
    out: Dict[str, None] = {}
    names = ["all"] if body == "*" else expand_name(body, limit, pattern=pattern, pos=term.pos + 1)
    for name in names:
        found = False
        if source in (None, "group"):
            members = list(inv.host_names()) if name == "all" else inv.group_members(name)
            if members is not None:
                found = True
                out.update(dict.fromkeys(members))
        if source in (None, "label"):
            members = inv.label_members(name)
            if members is not None:
                found = True
                out.update(dict.fromkeys(members))
        if not found:
            what = {None: "group or label", "group": "group", "label": "label"}[source]
            raise NodeSetError(pattern, "@%s {at} is no %s %s" % (
                (source + ":" if source else "") + name, what,
                "(no inventory: give one with --inventory FILE or $CHAPERONE_INVENTORY)" if isinstance(inv, _Empty)
                else "of the inventory"), term.pos)
        if len(out) > limit:
            raise NodeSetError(pattern, "%r {at} selects more than %d hosts" % (term.text, limit), term.pos)
    return list(out)


def names_in(patterns: Iterable[str], inventory: Optional[HostSource] = None, *,
             limit: int = DEFAULT_LIMIT) -> List[str]:
    """The union of several patterns (``-H a -H b``), sorted naturally."""
    acc: Dict[str, None] = {}
    for p in patterns:
        acc.update(dict.fromkeys(select(p, inventory, limit=limit)))
        if len(acc) > limit:
            raise NodeSetError(p, "the patterns select more than %d hosts" % limit)
    return sorted(acc, key=natural_key)
