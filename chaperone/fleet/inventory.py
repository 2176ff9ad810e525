"""Inventories: which hosts exist, how to reach them, and what every run on
them gets; and the selection of hosts for one command.

Three formats, one result (:class:`Inventory`, one :class:`HostEntry` per
host):

* **Ansible INI** (``[web]``, ``[web:vars]``, ``[web:children]``, host
  lines ``name[:port] key=value ...``, ranges ``db[01:10]``, ``;``/``#``
  comments), read as ansible-core's ini plugin reads it: values are Python
  literals when they parse as one; ``[g:vars]`` of a group never declared
  and ``[g:children]`` naming an undeclared group are errors.
* **Ansible YAML** (``all: {hosts: ..., vars: ..., children: ...}``, any
  top-level group), as its yaml plugin reads it.
* **chaperone's own YAML**: top-level ``defaults``, ``hosts``, ``groups``
  (see docs/hosts.md)::

      defaults: {user: alice, python: python3, env: {TZ: UTC}}
      hosts:
        gpu[1-4]: {labels: [gpu]}
        db1: {hostname: 10.0.0.5, port: 2222}
      groups:
        rack2: {hosts: "node[01-10],gpu1", children: [rack2b], env: {RACK: "2"}, spool: /scratch/chaperone}

  A YAML file is chaperone's when its top-level keys are among
  ``defaults``, ``hosts``, ``groups`` and not all of their values look like
  Ansible groups (mappings of ``hosts``/``vars``/``children`` only); any
  other YAML mapping is an Ansible inventory.  A file is YAML when it
  parses as a YAML mapping, else INI (extensions are not trusted: Ansible's
  files are often called ``hosts``).

Settings, whatever the format (Ansible variable <- chaperone key):

=============================  ============  =======================================
Ansible variable               chaperone     meaning
=============================  ============  =======================================
ansible_host, ansible_ssh_host hostname      what ssh connects to (default: the name)
ansible_port, ansible_ssh_port port          ssh port
ansible_user, ansible_ssh_user user          ssh user
ansible_python_interpreter     python        the Python that runs the agent
chaperone_spool                spool         the agent's spool directory
chaperone_env                  env           environment variables of every run
chaperone_labels               labels        labels (``@gpu``); a list or "a,b"
=============================  ============  =======================================

Precedence, as Ansible: ``all``/``defaults`` < groups (parents before
children; groups of one depth by name) < the host.  ``env`` merges key by
key in that order, ``labels`` add up.  A host's :attr:`HostEntry.groups`
are every group it is in, directly or through children (not ``all``).
Jinja expressions are not evaluated (the text is kept).

Where the inventory comes from (:func:`inventory_paths`): each
``--inventory FILE`` (several merge in order, later wins; ``'a,b,'``, a value with a comma
that is not a file, is a list of hosts, as in Ansible); else
``$CHAPERONE_INVENTORY`` (paths separated by ``:``); else the first of
``inventory.yaml``, ``inventory.yml``, ``inventory.ini``, ``inventory`` in
``$XDG_CONFIG_HOME/chaperone/`` (``~/.config/chaperone/``).  A missing
default file is an empty inventory (plain host names still work); a missing
file named by ``--inventory`` or ``$CHAPERONE_INVENTORY`` is an error.  (The
CLI's ``-i`` is ssh's identity file, as everywhere in chaperone.)

Selection (:func:`select_hosts`): patterns (:mod:`.patterns`), plus
``--hostfile FILE`` (one ``[user@]nodeset[:port]`` a line, ``#``
comments: pssh's and clush's files both read), ``-x PATTERN`` (removed
last), ``--pick N`` (N hosts at random, ``seed`` for tests).  Errors are
:class:`InventoryError` or :class:`SelectionError` (ValueErrors), one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from .nodeset import DEFAULT_LIMIT, NodeSetError, expand, expand_name, natural_key
from .patterns import select
from ..errors import InventoryError, SelectionError  # noqa: F401 (defined there; exported here too)


__all__ = [
    "HostEntry", "Inventory", "InventoryError", "SelectionError", "load_inventory", "inventory_paths",
    "parse_inventory", "read_hostfile", "select_hosts", "DEFAULT_NAMES", "ENV_VAR",
]

#: Environment variable naming the inventory file(s).
ENV_VAR = "CHAPERONE_INVENTORY"
#: File names tried in ``$XDG_CONFIG_HOME/chaperone/``, in order.
DEFAULT_NAMES = ("inventory.yaml", "inventory.yml", "inventory.ini", "inventory")

_ALIASES = {
    "ansible_host": "hostname", "ansible_ssh_host": "hostname",
    "ansible_port": "port", "ansible_ssh_port": "port",
    "ansible_user": "user", "ansible_ssh_user": "user",
    "ansible_python_interpreter": "python",
    "chaperone_spool": "spool", "chaperone_env": "env", "chaperone_labels": "labels",
}
#: chaperone key -> the Ansible variable it is stored as.
_NATIVE = {"hostname": "ansible_host", "port": "ansible_port", "user": "ansible_user",
           "python": "ansible_python_interpreter", "spool": "chaperone_spool", "env": "chaperone_env",
           "labels": "chaperone_labels"}
_NATIVE_HOST_KEYS = set(_NATIVE) | {"groups", "vars"}
_NATIVE_GROUP_KEYS = (set(_NATIVE) - {"hostname"}) | {"hosts", "children", "vars"}
_IMPLICIT = ("all", "ungrouped")


@dataclass(frozen=True)
class HostEntry:
    """One host of a selection: the name shown in output and how to reach it.

    ``name`` is what the user wrote or the inventory calls it (output
    prefixes, summaries, records).  ``hostname`` is what ssh connects to:
    the name itself unless the inventory says otherwise, so that an
    ssh_config ``Host`` alias keeps working.  ``port``/``user`` None: ssh's
    own defaults (ssh_config).  ``python``/``spool`` None: chaperone's
    defaults.  ``env``: variables for every run on the host.  ``vars``: all
    the host's merged inventory variables (Ansible's), for whoever wants
    more."""

    name: str
    hostname: str
    port: Optional[int] = None
    user: Optional[str] = None
    python: Optional[str] = None
    spool: Optional[str] = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    labels: FrozenSet[str] = frozenset()
    groups: Tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def plain(cls, name: str, *, user: Optional[str] = None, port: Optional[int] = None) -> "HostEntry":
        """A host the inventory does not know: reached by its name."""
        return cls(name=name, hostname=name, user=user, port=port)


# --- the raw model: Ansible's ---------------------------------------------------------------


class _Raw:
    """Groups and hosts with their variables, before precedence is applied."""

    def __init__(self) -> None:
        self.hosts: Dict[str, Dict[str, Any]] = {}          # name -> vars (insertion = inventory order)
        self.groups: Dict[str, Dict[str, Any]] = {}         # name -> {"hosts": [], "children": [], "vars": {}}
        self.where: Dict[str, str] = {}                     # group/host -> "file:line" for errors
        self.group("all")
        self.group("ungrouped")

    def group(self, name: str, where: str = "") -> Dict[str, Any]:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = {"hosts": [], "children": [], "vars": {}}
            if where:
                self.where.setdefault(name, where)
        return g

    def host(self, name: str, group: Optional[str], hvars: Mapping[str, Any]) -> None:
        self.hosts.setdefault(name, {}).update(hvars)
        if group and group not in _IMPLICIT:
            members = self.group(group)["hosts"]
            if name not in members:
                members.append(name)

    def child(self, parent: str, child: str) -> None:
        kids = self.group(parent)["children"]
        if child not in kids and child != "all":
            kids.append(child)

    def merge(self, other: "_Raw") -> None:
        for name, hv in other.hosts.items():
            self.hosts.setdefault(name, {}).update(hv)
        for name, g in other.groups.items():
            mine = self.group(name)
            for h in g["hosts"]:
                if h not in mine["hosts"]:
                    mine["hosts"].append(h)
            for c in g["children"]:
                self.child(name, c)
            mine["vars"].update(g["vars"])
        for k, v in other.where.items():
            self.where.setdefault(k, v)


def _parse_value(v: str) -> Any:
    """ansible-core's ini ``_parse_value``: a Python literal if it is one."""
    import ast

    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return v


def _host_pattern(text: str, where: str) -> Tuple[List[str], Optional[int]]:
    """``name[:port]`` with ranges -> (names, port), as Ansible's
    ``_expand_hostpattern`` (an IPv6 address has no port unless bracketed)."""
    text = text.strip()
    port = None
    m = re.match(r"^\[([0-9a-fA-F:.]+)\](?::(\d+))?$", text)
    if m and m.group(1).count(":") >= 2:
        return [m.group(1)], int(m.group(2)) if m.group(2) else None
    if text.count(":") >= 2 and "[" not in text:  # a bare IPv6 address
        return [text], None
    m = re.match(r"^(.*[^:]):(\d+)$", text)
    if m and "[" not in text[text.rfind(":"):]:
        text, port = m.group(1), int(m.group(2))
    if ":" in text.replace("[", "\0[").split("[")[0]:
        raise InventoryError("%s: bad host %r" % (where, text))
    try:
        return expand_name(text), port
    except NodeSetError as e:
        raise InventoryError("%s: %s" % (where, e)) from None


# --- Ansible INI ---------------------------------------------------------------------------------

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_GROUPNAME = re.compile(r"^([^:\]\s]+)\s*(?:[#;].*)?$")


def _parse_ini(text: str, path: str) -> _Raw:
    raw = _Raw()
    group, state = "ungrouped", "hosts"
    declared = {"all", "ungrouped"}
    pending: Dict[str, Tuple[str, str, str]] = {}  # group -> (state, where, parent)
    for lineno, line in enumerate(text.splitlines(), 1):
        where = "%s:%d" % (path, lineno)
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if not m:
                raise InventoryError("%s: bad section header %r (write [group], [group:vars] or "
                                     "[group:children])" % (where, line))
            group, state = m.group(1), m.group(2) or "hosts"
            if state not in ("hosts", "vars", "children"):
                raise InventoryError("%s: section [%s:%s] has an unknown type (hosts, vars or children)"
                                     % (where, group, state))
            raw.group(group, where)
            if state == "vars":
                if group not in declared:
                    pending.setdefault(group, ("vars", where, group))
            else:
                declared.add(group)
                pending.pop(group, None)
            continue
        if state == "hosts":
            import shlex

            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:
                raise InventoryError("%s: %s" % (where, e)) from None
            if not tokens:
                continue
            names, port = _host_pattern(tokens[0], where)
            hvars: Dict[str, Any] = {}
            for tok in tokens[1:]:
                if "=" not in tok:
                    raise InventoryError("%s: expected key=value for host variables, got %r" % (where, tok))
                k, v = tok.split("=", 1)
                hvars[k] = _parse_value(v)
            if port is not None:
                hvars["ansible_port"] = port
            for name in names:
                raw.host(name, group, hvars)
        elif state == "vars":
            if "=" not in line:
                raise InventoryError("%s: expected key=value in [%s:vars], got %r" % (where, group, line))
            k, v = (x.strip() for x in line.split("=", 1))
            raw.group(group)["vars"][k] = _parse_value(v)
        else:
            m = _GROUPNAME.match(line)
            if not m:
                raise InventoryError("%s: expected a group name in [%s:children], got %r" % (where, group, line))
            child = m.group(1)
            raw.child(group, child)
            raw.group(child, where)
            if child not in declared:
                pending.setdefault(child, ("children", where, group))
    for name, (st, where, parent) in pending.items():
        if name in declared:
            continue
        if st == "vars":
            raise InventoryError("%s: section [%s:vars] is for a group never declared: add [%s] or fix the name"
                                 % (where, name, name))
        raise InventoryError("%s: section [%s:children] names a group never declared: %s" % (where, parent, name))
    return raw


# --- Ansible YAML ----------------------------------------------------------------------------------


def _yaml_group(raw: _Raw, name: str, body: Any, where: str, depth: int = 0) -> None:
    if depth > 50:
        raise InventoryError("%s: groups nest too deep (at %s)" % (where, name))
    g = raw.group(name, where)
    if body is None:
        return
    if not isinstance(body, dict):
        raise InventoryError("%s: group %s must be a mapping of hosts/vars/children, not %s"
                             % (where, name, type(body).__name__))
    for key, value in body.items():
        if key == "hosts":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InventoryError("%s: hosts of group %s must be a mapping (host: vars)" % (where, name))
            for hpat, hvars in value.items():
                if hvars is not None and not isinstance(hvars, dict):
                    raise InventoryError("%s: variables of host %s must be a mapping" % (where, hpat))
                names, port = _host_pattern(str(hpat), where)
                hv = dict(hvars or {})
                if port is not None:
                    hv["ansible_port"] = port
                for h in names:
                    raw.host(h, name, hv)
        elif key == "vars":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InventoryError("%s: vars of group %s must be a mapping" % (where, name))
            g["vars"].update(value)
        elif key == "children":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise InventoryError("%s: children of group %s must be a mapping (group: ...)" % (where, name))
            for child, cbody in value.items():
                raw.child(name, str(child))
                _yaml_group(raw, str(child), cbody, where, depth + 1)
        else:
            raise InventoryError("%s: group %s has %r; a group has hosts, vars and children" % (where, name, key))


def _parse_ansible_yaml(data: dict, path: str) -> _Raw:
    raw = _Raw()
    for name, body in data.items():
        _yaml_group(raw, str(name), body, path)
    return raw


# --- chaperone's YAML ----------------------------------------------------------------------------------


def _looks_ansible(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= {"hosts", "vars", "children"}


def _is_native(data: dict) -> bool:
    keys = set(data)
    if not keys or not keys <= {"defaults", "hosts", "groups"}:
        return False
    return not all(_looks_ansible(v) for v in data.values())


def _native_settings(d: Mapping[str, Any], allowed: set, what: str, where: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if k not in allowed:
            raise InventoryError("%s: %s has an unknown key %r (known: %s)"
                                 % (where, what, k, ", ".join(sorted(allowed))))
        if k == "vars":
            if not isinstance(v, dict):
                raise InventoryError("%s: vars of %s must be a mapping" % (where, what))
            out.update(v)
        elif k in _NATIVE:
            out[_NATIVE[k]] = v
    return out


def _names(value: Any, what: str, where: str) -> List[str]:
    """A node set string or a list of them -> names."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InventoryError("%s: %s must be a node set or a list of names" % (where, what))
    out: List[str] = []
    for item in items:
        try:
            out.extend(expand(str(item)))
        except NodeSetError as e:
            raise InventoryError("%s: %s: %s" % (where, what, e)) from None
    return out


def _parse_native(data: dict, path: str) -> _Raw:
    raw = _Raw()
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise InventoryError("%s: defaults must be a mapping" % path)
    raw.group("all")["vars"].update(_native_settings(defaults, _NATIVE_GROUP_KEYS - {"hosts", "children"},
                                                     "defaults", path))
    hosts = data.get("hosts") or {}
    if isinstance(hosts, (str, list)):
        hosts = {h: None for h in _names(hosts, "hosts", path)}
    if not isinstance(hosts, dict):
        raise InventoryError("%s: hosts must be a mapping (name: settings)" % path)
    for key, settings in hosts.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise InventoryError("%s: settings of host %s must be a mapping" % (path, key))
        names, port = _host_pattern(str(key), path)
        hv = _native_settings(settings, _NATIVE_HOST_KEYS, "host %s" % key, path)
        if "hostname" in settings and len(names) > 1:
            raise InventoryError("%s: host %s is a range of %d hosts: one hostname cannot reach them all"
                                 % (path, key, len(names)))
        if port is not None:
            hv.setdefault("ansible_port", port)
        joined = _names(settings.get("groups") or [], "groups of host %s" % key, path)
        for h in names:
            raw.host(h, None, hv)
            for g in joined:
                raw.host(h, g, {})
    groups = data.get("groups") or {}
    if not isinstance(groups, dict):
        raise InventoryError("%s: groups must be a mapping (name: settings)" % path)
    for gname, settings in groups.items():
        gname = str(gname)
        settings = settings or {}
        if not isinstance(settings, dict):
            raise InventoryError("%s: settings of group %s must be a mapping" % (path, gname))
        raw.group(gname, path)["vars"].update(_native_settings(settings, _NATIVE_GROUP_KEYS, "group %s" % gname,
                                                               path))
        for h in _names(settings.get("hosts") or [], "hosts of group %s" % gname, path):
            raw.host(h, gname, {})
        for c in _names(settings.get("children") or [], "children of group %s" % gname, path):
            raw.child(gname, c)
            raw.group(c, path)
    for gname, settings in groups.items():  # a child never defined is a typo
        for c in _names((settings or {}).get("children") or [], "children", path):
            if c not in groups:
                raise InventoryError("%s: group %s has the child %s, which is not under groups:" % (path, gname, c))
    return raw


# --- the resolved inventory --------------------------------------------------------------------------------


class Inventory:
    """Hosts and groups with their settings resolved (see the module
    docstring).  Implements :class:`~.patterns.HostSource`."""

    def __init__(self, raw: Optional[_Raw] = None, paths: Sequence[str] = ()) -> None:
        raw = raw or _Raw()
        self.paths = list(paths)
        self._groups: Dict[str, List[str]] = {}
        parents: Dict[str, List[str]] = {g: [] for g in raw.groups}
        for g, body in raw.groups.items():
            for c in body["children"]:
                parents.setdefault(c, []).append(g)
        depth: Dict[str, int] = {}

        def depth_of(g: str, seen: Tuple[str, ...] = ()) -> int:
            if g in depth:
                return depth[g]
            if g in seen:
                raise InventoryError("%s: group %s is its own child (%s)"
                                     % (raw.where.get(g, "inventory"), g, " -> ".join(seen + (g,))))
            ps = [p for p in parents.get(g, []) if p != "all"]
            depth[g] = 0 if g == "all" else 1 + max((depth_of(p, seen + (g,)) for p in ps), default=0)
            return depth[g]

        for g in raw.groups:
            depth_of(g)
        direct: Dict[str, List[str]] = {h: [] for h in raw.hosts}
        for g, body in raw.groups.items():
            for h in body["hosts"]:
                direct.setdefault(h, []).append(g)

        def members(g: str, seen: Tuple[str, ...] = ()) -> List[str]:
            if g in self._groups:
                return self._groups[g]
            out: Dict[str, None] = dict.fromkeys(raw.groups[g]["hosts"])
            for c in raw.groups[g]["children"]:
                if c not in seen:
                    out.update(dict.fromkeys(members(c, seen + (g,))))
            self._groups[g] = list(out)
            return self._groups[g]

        for g in raw.groups:
            if g not in _IMPLICIT:
                members(g)
        self._groups["all"] = list(raw.hosts)
        self._groups["ungrouped"] = [h for h in raw.hosts if not direct.get(h)]
        in_groups: Dict[str, List[str]] = {h: [] for h in raw.hosts}
        for g, hs in self._groups.items():
            if g in _IMPLICIT:
                continue
            for h in hs:
                in_groups[h].append(g)
        order = sorted(raw.groups, key=lambda g: (depth[g], int(_priority(raw.groups[g]["vars"])), g))
        rank = {g: i for i, g in enumerate(order)}
        self.hosts: Dict[str, HostEntry] = {}
        self._labels: Dict[str, List[str]] = {}
        for h, hvars in raw.hosts.items():
            chain = ["all"] + sorted(in_groups[h], key=rank.__getitem__)
            merged: Dict[str, Any] = {}
            env: Dict[str, str] = {}
            labels: set = set()
            for layer in [raw.groups[g]["vars"] for g in chain] + [hvars]:
                for k, v in layer.items():
                    key = _ALIASES.get(k)
                    if key == "env":
                        env.update(_env(v, h, self._where()))
                    elif key == "labels":
                        labels.update(_labels(v, h, self._where()))
                    merged[k] = v
            entry = _entry(h, merged, env, labels, tuple(sorted(in_groups[h], key=natural_key)), self._where())
            self.hosts[h] = entry
            for lab in entry.labels:
                self._labels.setdefault(lab, []).append(h)

    def _where(self) -> str:
        return ", ".join(self.paths) or "inventory"

    # HostSource
    def host_names(self) -> List[str]:
        return list(self.hosts)

    def group_members(self, name: str) -> Optional[List[str]]:
        return self._groups.get(name)

    def group_names(self) -> List[str]:
        return list(self._groups)

    def label_members(self, name: str) -> Optional[List[str]]:
        return self._labels.get(name)

    def label_names(self) -> List[str]:
        return sorted(self._labels)

    def entry(self, name: str) -> HostEntry:
        """The inventory's entry for ``name``, or a plain one."""
        return self.hosts.get(name) or HostEntry.plain(name)

    def __len__(self) -> int:
        return len(self.hosts)


def _priority(gvars: Mapping[str, Any]) -> int:
    try:
        return int(gvars.get("ansible_group_priority", 1))
    except (TypeError, ValueError):
        return 1


def _env(v: Any, host: str, where: str) -> Dict[str, str]:
    if not isinstance(v, dict):
        raise InventoryError("%s: env of %s must be a mapping NAME: value" % (where, host))
    out = {}
    for k, val in v.items():
        k = str(k)
        if not k or "=" in k or "\0" in k:
            raise InventoryError("%s: bad environment variable name %r for %s" % (where, k, host))
        out[k] = "" if val is None else (("true" if val else "false") if isinstance(val, bool) else str(val))
    return out


def _labels(v: Any, host: str, where: str) -> List[str]:
    if isinstance(v, str):
        items = [x.strip() for x in v.split(",")]
    elif isinstance(v, (list, tuple, set)):
        items = [str(x).strip() for x in v]
    else:
        raise InventoryError("%s: labels of %s must be a list or 'a,b'" % (where, host))
    for x in items:
        if not x or not re.match(r"^[\w.-]+$", x):
            raise InventoryError("%s: bad label %r for %s (letters, digits, '_', '.', '-')" % (where, x, host))
    return items


def _entry(name: str, merged: Mapping[str, Any], env: Dict[str, str], labels: set, groups: Tuple[str, ...],
           where: str) -> HostEntry:
    fields: Dict[str, Any] = {}
    for k, v in merged.items():
        key = _ALIASES.get(k)
        if key in ("hostname", "user", "python", "spool") and v is not None:
            fields[key] = str(v)
        elif key == "port" and v is not None:
            try:
                port = int(v)
            except (TypeError, ValueError):
                port = -1
            if not 0 < port < 65536:
                raise InventoryError("%s: bad port %r for host %s" % (where, v, name))
            fields["port"] = port
    return HostEntry(name=name, hostname=fields.pop("hostname", name), env=env, labels=frozenset(labels),
                     groups=groups, vars=dict(merged), **fields)


# --- loading -------------------------------------------------------------------------------------------------


def parse_inventory(text: str, path: str = "<inventory>") -> Inventory:
    """An inventory from its text (format detected; see the module docstring)."""
    return Inventory(_parse_text(text, path), [path])


def _parse_text(text: str, path: str) -> _Raw:
    import yaml

    data = None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if path.endswith((".yaml", ".yml", ".json")):
            mark = getattr(e, "problem_mark", None)
            where = "%s:%d" % (path, mark.line + 1) if mark is not None else path
            raise InventoryError("%s: not valid YAML: %s" % (where, getattr(e, "problem", None) or e)) from None
    if isinstance(data, dict):
        return _parse_native(data, path) if _is_native(data) else _parse_ansible_yaml(data, path)
    if path.endswith((".yaml", ".yml", ".json")) and data is not None:
        raise InventoryError("%s: a YAML inventory is a mapping, not %s" % (path, type(data).__name__))
    return _parse_ini(text, path)


def inventory_paths(explicit: Sequence[str] = (), env: Optional[Mapping[str, str]] = None) -> Tuple[List[str], bool]:
    """The inventory sources to read and whether they must exist (named by
    the user) or are the optional default."""
    env = os.environ if env is None else env
    if explicit:
        return list(explicit), True
    if env.get(ENV_VAR):
        return [p for p in env[ENV_VAR].split(os.pathsep) if p], True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for name in DEFAULT_NAMES:
        path = os.path.join(base, "chaperone", name)
        if os.path.isfile(path):
            return [path], False
    return [], False


def load_inventory(paths: Sequence[str] = (), *, env: Optional[Mapping[str, str]] = None) -> Inventory:
    """Read the inventory: ``paths`` (``--inventory``), else ``$CHAPERONE_INVENTORY``,
    else the default file if there is one (else an empty inventory)."""
    sources, required = inventory_paths(paths, env)
    raw = _Raw()
    read: List[str] = []
    for src in sources:
        if "," in src and not os.path.exists(src):  # Ansible's -i 'a,b,'
            part = _Raw()
            for item in src.split(","):
                if item.strip():
                    names, port = _host_pattern(item, "-i %s" % src)
                    for n in names:
                        part.host(n, None, {"ansible_port": port} if port else {})
            raw.merge(part)
            read.append(src)
            continue
        path = os.path.expanduser(src)
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            if required:
                raise InventoryError("inventory %s: no such file" % src) from None
            continue
        except IsADirectoryError:
            raise InventoryError("inventory %s is a directory; give a file" % src) from None
        except (OSError, UnicodeDecodeError) as e:
            raise InventoryError("inventory %s: %s" % (src, e)) from None
        raw.merge(_parse_text(text, src))
        read.append(src)
    return Inventory(raw, read)


# --- selection ---------------------------------------------------------------------------------------------------


def read_hostfile(path: str) -> List[HostEntry]:
    """Hosts from a file: one ``[user@]nodeset[:port]`` a line (pssh's
    ``user@host:port``, clush's node sets), ``#`` comments, blank lines."""
    try:
        with open(os.path.expanduser(path), "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SelectionError("host file %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    out: List[HostEntry] = []
    for lineno, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = "%s:%d" % (path, lineno)
        user = None
        if "@" in line and not line.startswith("@"):
            user, line = line.split("@", 1)
        try:
            names, port = _host_pattern(line, where)
        except InventoryError as e:
            raise SelectionError(str(e)) from None
        out.extend(HostEntry.plain(n, user=user or None, port=port) for n in names)
    return out


def _spelled(e: HostEntry) -> str:
    """``[user@]name[:port]``, as a host file line writes it."""
    name = "[%s]" % e.name if ":" in e.name and e.port else e.name
    return "%s%s%s" % (e.user + "@" if e.user else "", name, ":%d" % e.port if e.port else "")


def select_hosts(patterns: Sequence[str] = (), *, inventory: Optional[Inventory] = None,
                 exclude: Sequence[str] = (), hostfiles: Sequence[str] = (), pick: Optional[int] = None,
                 seed: Any = None, limit: int = DEFAULT_LIMIT) -> List[HostEntry]:
    """The hosts of one command: the union of ``patterns`` (``-H``/``-w``,
    each may be repeated) and ``hostfiles``; minus ``exclude`` (``-x``);
    then ``pick`` of them at random (``random.Random(seed)``).  Sorted
    naturally by name.  Raises :class:`SelectionError` (one line) for a bad
    pattern or file, or when nothing is selected."""
    inv = inventory if inventory is not None else Inventory()
    chosen: Dict[str, HostEntry] = {}
    for p in patterns:
        try:
            names = select(p, inv, limit=limit)
        except NodeSetError as e:
            raise SelectionError(str(e)) from None
        for n in names:
            chosen.setdefault(n, inv.entry(n))
    listed = [e for hf in hostfiles for e in read_hostfile(hf)]
    ways: Dict[str, set] = {}
    for e in listed:
        ways.setdefault(e.name, set()).add((e.user, e.port))
    for e in listed:
        known = inv.hosts.get(e.name)
        if known is not None and (e.user or e.port):
            e = dataclasses.replace(known, user=e.user or known.user, port=e.port or known.port)
        elif known is not None:
            e = known
        if len(ways[e.name]) > 1:
            # (one name reached several ways, as pssh's localhost:2201,
            # localhost:2202: each a host of its own, named as written)
            e = dataclasses.replace(e, name=_spelled(e))
        chosen.setdefault(e.name, e)
    if len(chosen) > limit:
        raise SelectionError("the selection has %d hosts, over the limit of %d" % (len(chosen), limit))
    for x in exclude:
        try:
            gone = select(x, inv, limit=limit)
        except NodeSetError as e:
            raise SelectionError(str(e)) from None
        for n in gone:
            chosen.pop(n, None)
    if not chosen:
        what = " ".join(list(patterns) + ["--hostfile %s" % h for h in hostfiles]) or "(nothing)"
        raise SelectionError("no host selected by %s%s" % (what, " minus -x " + ",".join(exclude) if exclude else ""))
    names = sorted(chosen, key=natural_key)
    if pick is not None:
        if pick < 1:
            raise SelectionError("--pick needs a number of hosts, 1 or more (got %d)" % pick)
        if pick < len(names):
            import random

            names = sorted(random.Random(seed).sample(names, pick), key=natural_key)
    return [chosen[n] for n in names]
