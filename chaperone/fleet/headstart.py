"""How each host of a selection is reached, and the CLI's head start for
``run -H``: the SSH sessions to the first hosts start before Python has
loaded the rest of chaperone.

:func:`entry_ssh` and :func:`named` are how a :class:`~.inventory.HostEntry`
becomes a :class:`~chaperone.transports.target.Target` (the library's
fan-out and the head start both use them, so that the head start's
sessions have exactly the options the transports will look for).

:func:`speculate` (called by ``chaperone.__main__`` for ``run -H`` /
``--hostfile``): select the hosts as ``run`` will, and start a standby
session (``chaperone.transports.ssh.master.Standby``) to each of the first
``forks`` of them: each logs in while Python loads, and the run's start is
then sent on it (no second connection, no handshake after the imports).
A guess that does not match (``--pick``, an error, options that differ) is
no guess: nothing is started, or the sessions are stopped unused at exit.

Light: stdlib, the node-set and inventory code (YAML only when a YAML
inventory is read), the CLI's option table, ssh's options.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Any, Dict, List, Mapping, Optional, Sequence

    from ..transports.target import Target
    from .inventory import HostEntry


def entry_ssh(entry: "HostEntry", ssh: "Mapping[str, Any]") -> "Dict[str, Any]":
    """The SSH settings of one host: the call's (``ssh``), and the
    inventory's for the host (user, port, python, spool) where the call
    gives none."""
    mine = dict(ssh)
    for key in ("user", "port", "python", "spool"):
        value = getattr(entry, key)
        if value is not None and mine.get(key) is None:
            mine[key] = value
    return mine


def named(target: "Target", entry: "HostEntry") -> "Target":
    """``target`` (reached at the entry's hostname) under the entry's name."""
    if not target.local and target.name != entry.name:
        return target.replace(name=entry.name, hostname=target.destination)
    return target


def guess_targets(configs: "List[str]", args: "Sequence[str]") -> "Optional[List[Target]]":
    """The targets ``run`` will start first, in order (at most ``forks``),
    for ``run ARGS`` with ``-H``/``--hostfile``; None when that cannot be
    known now (``--pick``, a bad option, an error)."""
    from ..cli import options as o

    opts, host, words, _ = o.split_run(list(args), o.RUN + o.SSH)
    parsed = o.parse_options(opts, o.RUN + o.SSH)
    if parsed is None or host is not None or not words or "pick" in parsed or "verbose" in parsed:
        return None
    if not (parsed.get("hosts") or parsed.get("hostfiles")):
        return None
    configs = list(configs) + parsed.get("ssh_config", [])
    if len(configs) > 1:
        return None
    from .limits import default_forks
    from .inventory import load_inventory, select_hosts

    try:
        forks = int(parsed["forks"][-1]) if "forks" in parsed else default_forks()
        entries = select_hosts(parsed.get("hosts", []), inventory=load_inventory(parsed.get("inventory", [])),
                               exclude=parsed.get("exclude", []), hostfiles=parsed.get("hostfiles", []))
        ssh = o.ssh_settings(parsed)
    except Exception:
        return None
    from ..transports.target import Target

    # (as chaperone.cli.app.chaperone_for makes the Chaperone, and its target() the targets)
    base = dict(config=tuple(configs), check_host_keys="no_host_key_check" not in parsed)
    targets = []
    for e in entries[:max(1, forks)]:
        settings = dict(base)
        settings.update({k: v for k, v in entry_ssh(e, ssh).items() if v is not None})
        targets.append(named(Target.parse(e.hostname, **settings), e))
    return targets


def speculate(configs: "List[str]", args: "Sequence[str]") -> int:
    """Start standby sessions to the hosts ``run ARGS`` will start first;
    how many were started."""
    from ..transports.ssh import master, options

    ssh = options.ssh_binary()
    if ssh is None or options.default_client() != "openssh":
        return 0
    targets = guess_targets(configs, args)
    if not targets:
        return 0
    multiplex = not options.multiplexes_itself(targets[0].config)  # (one config for all)
    n = 0
    for t in targets:
        if not t.local:
            master.speculate_more(options.ssh_options(ssh, t), t.destination, multiplex)
            n += 1
    return n


def speculate_argv(argv: "Sequence[str]") -> bool:
    """For ``chaperone [-F CFG] run ... -H ...``: :func:`speculate`; False
    for any other command line (the single-host head start then guesses)."""
    configs = []
    i = 0
    while i + 1 < len(argv) and argv[i] == "-F":
        configs.append(argv[i + 1])
        i += 2
    if argv[i:i + 1] != ["run"]:
        return False
    from ..cli import options as o

    rest = list(argv[i + 1:])
    opts = o.split_run(rest, o.RUN + o.SSH)[0]
    if not o._names_hosts(opts):
        return False
    speculate(configs, rest)
    return True
