"""The command line's options, in one table, and how ``run``'s arguments
split into options, the host and the command, as ``ssh`` splits them.

Stdlib only and light to import: the CLI's head start (``__main__``) reads
the command line with this module before click is loaded, and the click
commands are built from the same table, so the two never disagree.

The rule for ``run`` (``ssh``'s own): chaperone's options and ssh's come
before HOST, and again right after it; the first word after HOST that is
not an option starts the command, and so does whatever follows ``--``.
Then:

* without ``--``, the command's words are joined with spaces and run by the
  user's login shell on the host, as ``ssh HOST WORDS...`` does:
  ``run gpu1 'echo $HOME'`` prints the remote home directory;
* after ``--``, the words are the program's exact argv, never interpreted
  by a shell: ``run gpu1 -- echo '$HOME'`` prints ``$HOME``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Dict, List, Optional, Tuple


class Opt:
    """One option: its spellings, where click puts it (``dest``), whether it
    takes a value, may be repeated, and its help."""

    __slots__ = ("flags", "dest", "value", "multiple", "help", "metavar", "count")

    def __init__(self, flags, dest, value=True, multiple=False, help="", metavar=None, count=False):
        self.flags = tuple(flags)
        self.dest = dest
        self.value = value
        self.multiple = multiple
        self.help = help
        self.metavar = metavar
        self.count = count  # a flag that may be repeated (-tt): how many times


#: How to reach a host: on every command that connects (as ssh takes them).
SSH = (
    Opt(("-F",), "ssh_config", multiple=True, metavar="FILE", help="SSH config file (as ssh -F)."),
    Opt(("-p", "--port"), "port", metavar="PORT", help="SSH port."),
    Opt(("-l", "--login"), "user", metavar="USER", help="SSH user."),
    Opt(("-i", "--identity"), "identity", multiple=True, metavar="FILE", help="SSH identity file (tried first)."),
    Opt(("-o",), "ssh_option", multiple=True, metavar="KEY=VALUE", help="SSH option (as ssh -o)."),
    Opt(("-J", "--jump"), "jump", metavar="[USER@]HOST[:PORT]", help="Connect through this jump host (as ssh -J)."),
    Opt(("-4",), "ipv4", value=False, help="IPv4 only (as ssh -4)."),
    Opt(("-6",), "ipv6", value=False, help="IPv6 only (as ssh -6)."),
    Opt(("-C",), "compression", value=False, help="Compress the connection (as ssh -C)."),
    Opt(("--no-host-key-check",), "no_host_key_check", value=False,
        help="Do not check SSH host keys (unsafe: for throw-away hosts)."),
    Opt(("-v", "--verbose"), "verbose", value=False, count=True,
        help="Say how the host is reached, with ssh's own -v messages (-vv, -vvv: more)."),
    Opt(("--python",), "python", metavar="PATH", help="Python on the host (default: python3)."),
    Opt(("--spool",), "spool", metavar="DIR", help="Spool directory on the host (default ~/.chaperone/runs)."),
)

#: ``run``'s own options.
RUN = (
    Opt(("--id", "--name"), "run_id", metavar="ID",
        help="Run id (default: generated). Starting an existing id re-attaches."),
    Opt(("--rm",), "remove", value=False,
        help="Remove the run (its spool and record) once it has ended and its output is here."),
    Opt(("-d", "--detach"), "detach", value=False, help="Start it, print its id and return; it runs on."),
    Opt(("-e", "--env"), "env", multiple=True, metavar="NAME=VALUE",
        help="Set an environment variable (NAME alone: its value here, as docker -e)."),
    Opt(("--env-file",), "env_files", multiple=True, metavar="FILE",
        help="Environment variables from FILE (NAME=VALUE lines, # comments, as docker's)."),
    Opt(("--cwd", "-w", "--workdir"), "cwd", metavar="DIR",
        help="Working directory (default: here for local, the home directory on hosts)."),
    Opt(("--timeout",), "timeout", metavar="DURATION", help="Then SIGTERM, and SIGKILL after the kill grace (30s, 5m, 2h)."),
    Opt(("--kill-grace",), "kill_grace", metavar="DURATION", help="From SIGTERM to SIGKILL on timeout or kill (default 10s)."),
    Opt(("--stdin",), "stdin_file", metavar="FILE",
        help="Give the program this file as stdin ('-': this terminal's stdin)."),
    Opt(("-n", "--no-stdin"), "no_stdin", value=False, help="Give the program /dev/null as stdin (as ssh -n)."),
    Opt(("-t", "--tty"), "tty", value=False, count=True,
        help="A terminal on the host, attached to this one (as ssh -t; -tt: even when stdin is not a terminal)."),
    Opt(("-T",), "no_tty", value=False, help="No terminal (the default, as ssh -T)."),
    Opt(("--json",), "as_json", value=False, help="Print the run as JSON at the end instead of its output."),
    Opt(("-q", "--quiet"), "quiet", value=False, help="Do not print the run id and reconnects on stderr."),
    Opt(("-H", "--hosts"), "hosts", multiple=True, metavar="PATTERN",
        help="Run on each host of PATTERN (node sets, @groups, inventory patterns); repeatable."),
    # Many hosts (chaperone/cli/fleet.py, docs/hosts.md):
    Opt(("--hostfile",), "hostfiles", multiple=True, metavar="FILE",
        help="Run on each host of FILE ([user@]host[:port] a line); repeatable."),
    Opt(("--inventory",), "inventory", multiple=True, metavar="FILE",
        help="Inventory (Ansible INI/YAML, chaperone YAML) for -H (default: $CHAPERONE_INVENTORY)."),
    Opt(("-x", "--exclude"), "exclude", multiple=True, metavar="PATTERN", help="With -H: without these hosts."),
    Opt(("--pick",), "pick", metavar="N", help="With -H: N of the hosts, at random."),
    Opt(("-f", "--forks"), "forks", metavar="N", help="With -H: at most N runs starting at once (default 16 a CPU, <= 64)."),
    Opt(("-b", "--gather"), "gather", value=False,
        help="With -H: at the end, each distinct output once under its hosts (as clush -b)."),
)
#: ``run``'s options that only mean something with many hosts.
MANY_ONLY = ("inventory", "exclude", "pick", "forks", "gather")

#: Options that end the command line's reading with a message (help, version).
EAGER = ("-h", "--help", "--version")


def arity(options) -> Dict[str, bool]:
    """``{flag: takes a value}`` for these options."""
    return {flag: opt.value for opt in options for flag in opt.flags}


#: With one of these, hosts come from the option: no HOST argument.
HOSTS_FLAGS = ("-H", "--hosts", "--hostfile")


def _names_hosts(opts: List[str]) -> bool:
    return any(o in HOSTS_FLAGS or o.startswith(("--hosts=", "--hostfile="))
               or (o.startswith("-H") and not o.startswith("--")) for o in opts)


def split_run(args: List[str], options) -> Tuple[List[str], Optional[str], List[str], bool]:
    """``(option args, host, command words, exact)`` from ``run``'s
    arguments, as ssh reads its own: options before HOST and right after
    it; the command from the first other word, or after ``--`` (``exact``:
    the words are an exact argv).  With ``-H`` there is no HOST argument.
    Unknown options are left in the option args for click to refuse."""
    takes = arity(options)
    opts: List[str] = []
    host: Optional[str] = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            if host is not None or _names_hosts(opts):
                return opts, host, list(args[i + 1:]), True
            # `run -- HOST ...` (as `ssh -- HOST ...`): no options after this
            rest = args[i + 1:]
            if not rest:
                return opts, None, [], False
            host, rest = rest[0], rest[1:]
            if rest[:1] == ["--"]:
                return opts, host, list(rest[1:]), True
            return opts, host, list(rest), False
        if arg.startswith("-") and arg != "-":
            if arg in ("-it", "-ti"):
                # docker's -it, not ssh's identity file "t": a terminal (the
                # input is the program's anyway)
                arg = "-t"
            opts.append(arg)
            name, eq, _ = arg.partition("=")
            if not eq and takes.get(name):
                if i + 1 < len(args):
                    opts.append(args[i + 1])
                    i += 1
            i += 1
            continue
        if host is None and not _names_hosts(opts):
            host = arg
            i += 1
            continue
        return opts, host, list(args[i:]), False
    return opts, host, [], False


#: Commands that take run ids (and their docker names), and the options of
#: theirs that take a value (besides SSH's): for the head start.
ID_COMMANDS = ("status", "inspect", "logs", "wait", "kill", "stop", "clean", "rm")
ID_VALUES = ("--timeout", "-s", "--signal", "--grace", "--tail")


def parse_options(args: List[str], options) -> Optional[Dict[str, list]]:
    """``{dest: [values]}`` of the options in ``args`` (flags: ``[True]``);
    None when an option is not in the table."""
    by_flag = {flag: opt for opt in options for flag in opt.flags}
    out: Dict[str, list] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        opt = by_flag.get(name)
        if opt is None and not name.startswith("--") and len(name) > 2 and name[:2] in by_flag \
                and by_flag[name[:2]].value:
            opt, value, eq = by_flag[name[:2]], arg[2:], "="  # -p2222
        if opt is None:
            return None
        if opt.value:
            if not eq:
                i += 1
                if i == len(args):
                    return None
                value = args[i]
            out.setdefault(opt.dest, []).append(value)
        else:
            out[opt.dest] = [True]
        i += 1
    return out


_WARNED: set = set()


def _warn_identity(path: str) -> None:
    """ssh's warning for an ``-i`` file that cannot be read (ssh goes on
    with the other keys; so does chaperone), once per process."""
    import os

    full = os.path.expanduser(path)
    if path in _WARNED or os.access(full, os.R_OK):
        return
    _WARNED.add(path)
    import sys

    why = "No such file or directory" if not os.path.exists(full) else "Permission denied"
    sys.stderr.write("chaperone: warning: identity file %s not accessible: %s (as ssh, going on with the "
                     "other keys)\n" % (path, why))


def ssh_settings(params: Dict) -> Dict:
    """The SSH options of a command line (click's params, or
    :func:`parse_options`'s lists) as settings for a Target."""
    def one(key):
        v = params.get(key)
        if isinstance(v, list):
            return v[-1] if v else None
        return v

    def many(key):
        v = params.get(key)
        return tuple(v) if v else ()

    out: Dict = {}
    port = one("port")
    if port:
        if not str(port).isdigit() or not 0 < int(port) < 65536:
            from ..errors import UsageError

            raise UsageError("invalid port %r: a number from 1 to 65535" % (port,))
        out["port"] = int(port)
    for key in ("user", "jump", "python", "spool"):
        if one(key):
            out[key] = one(key)
    if many("identity"):
        out["identities"] = many("identity")
        for path in out["identities"]:
            _warn_identity(path)
    options = many("ssh_option")
    # ssh's own flags for options: after the -o ones (ssh keeps the first value)
    if one("ipv4") and one("ipv6"):
        from ..errors import UsageError

        raise UsageError("-4 and -6 do not go together: one address family")
    for flag, option in (("ipv4", "AddressFamily=inet"), ("ipv6", "AddressFamily=inet6"),
                         ("compression", "Compression=yes")):
        if one(flag):
            options += (option,)
    if options:
        out["options"] = options
    return out


def run_env(params: Dict) -> Dict[str, str]:
    """The environment ``run`` sets: ``--env-file`` files in order, then each
    ``-e``, as docker reads them: ``NAME=VALUE``; ``NAME`` alone takes the
    value it has here (unset here: a usage error for ``-e``, left out for a
    file's line, as docker does); a file's blank lines and
    ``#`` lines are skipped, and its values are taken as written (no quotes
    removed).  A usage error names what is wrong."""
    import os

    from ..errors import UsageError

    def setting(text: str, where: str) -> None:
        name, sep, value = text.partition("=")
        if not name or "\0" in text:
            raise UsageError("bad environment setting %r%s: expected NAME=VALUE" % (text, where))
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
        elif not where:  # (-e NAME with NAME unset here: surely a mistake; in a file, skipped as docker does)
            raise UsageError("bad environment setting %r: %s is not set here (-e NAME passes this machine's "
                             "value); expected NAME=VALUE" % (text, name))

    env: Dict[str, str] = {}
    for path in params.get("env_files") or ():
        try:
            with open(os.path.expanduser(path), "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError("cannot read --env-file %s: %s" % (path, e.strerror or e)) from None
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise UsageError("--env-file %s is not UTF-8 text" % path) from None
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                setting(line.lstrip(), " (%s, line %d)" % (path, number))
    for pair in params.get("env") or ():
        setting(pair, "")
    return env
