"""How ``ssh`` is run: which client, which binary, its options (everything
but the host and the command).  Stdlib only, light to import.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import List, Optional, Sequence

    from ..target import Target

def _memo(func):
    """``functools.lru_cache(maxsize=None)`` for positional arguments,
    without importing functools (and collections: 1.5 ms of the head
    start, which builds ssh's options before it starts ssh)."""
    cache: dict = {}

    def memo(*args):
        try:
            return cache[args]
        except KeyError:
            value = cache[args] = func(*args)
            return value

    memo.__name__, memo.__doc__, memo.__wrapped__ = func.__name__, func.__doc__, func  # type: ignore[attr-defined]
    memo.cache_clear = cache.clear  # type: ignore[attr-defined]
    return memo


#: How much the SSH clients say (the CLI's ``-v``, ``-vv``, ``-vvv``): 0,
#: the default, only errors.  See :func:`set_verbose`.
_VERBOSE = [0]


def set_verbose(level: int) -> None:
    """``-v`` (1) to ``-vvv`` (3), as ``ssh -v``: OpenSSH's own debug
    messages on this process's stderr as they come (each ssh on a
    connection of its own then, no shared master, so that each shows its
    whole handshake), asyncssh's log at
    debug level (``set_debug_level`` for 2 and 3), and chaperone's debug
    lines (the ``chaperone`` logger), each line prefixed with its source."""
    level = max(0, min(int(level or 0), 3))
    _VERBOSE[0] = level
    if not level:
        return
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for name in ("chaperone", "asyncssh"):
        logger = logging.getLogger(name)
        if not any(getattr(h, "_chaperone_verbose", False) for h in logger.handlers):
            handler._chaperone_verbose = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


def verbose() -> int:
    """The level :func:`set_verbose` set (0: quiet)."""
    return _VERBOSE[0]


#: Seconds to connect and log in when neither ``connect_timeout`` nor the
#: SSH config's ``ConnectTimeout`` says.
DEFAULT_CONNECT_TIMEOUT = 15


def ssh_binary() -> Optional[str]:
    """The ``ssh`` client to use (``$CHAPERONE_SSH`` or ``ssh`` on PATH)."""
    return which(os.environ.get("CHAPERONE_SSH") or "ssh")


def which(name: str) -> Optional[str]:
    """``shutil.which(name)`` for an executable file."""
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or os.curdir, name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    for path in candidates:
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def default_client() -> str:
    """The SSH client chaperone uses unless told: ``$CHAPERONE_SSH_CLIENT``
    (``openssh`` or ``asyncssh``), else OpenSSH's ``ssh`` when it is
    installed, else asyncssh."""
    return os.environ.get("CHAPERONE_SSH_CLIENT") or ("openssh" if ssh_binary() else "asyncssh")


def multiplexes_itself(config: Sequence[str]) -> bool:
    """Whether the user's ssh config does its own connection sharing
    (ControlMaster/ControlPath/ControlPersist): chaperone then starts no
    master of its own."""
    return config_mentions(default_config_files(config), "ControlMaster", "ControlPath", "ControlPersist")


#: The ciphers OpenSSH enables by default, AES-GCM first: on a CPU with AES
#: instructions AES-GCM moves a GiB with about a third of the CPU time of
#: chacha20-poly1305, OpenSSH's first choice (which it prefers for CPUs
#: without them): docs/performance.md.  Only the order differs from the
#: default, so any server agrees on one as before.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                "aes128-ctr", "aes192-ctr", "aes256-ctr")


@_memo
def cpu_has_aes() -> bool:
    """Whether this machine's CPU has AES instructions (Linux: the
    ``aes`` flag, x86's AES-NI, or ARMv8's ``aes`` feature)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return "aes" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def prefer_fast_ciphers(config: Sequence[str], options: Sequence[str] = ()) -> bool:
    """Whether chaperone puts AES-GCM first: the CPU has AES instructions,
    and neither the user's ``-o`` options nor their ssh config name
    ``Ciphers`` (then theirs stand, as with ssh)."""
    if any(option_name(o) == "ciphers" for o in options):
        return False
    return cpu_has_aes() and not config_mentions(default_config_files(config), "Ciphers")


@_memo
def _ssh_has_all_ciphers(ssh: str) -> bool:
    """Whether this ``ssh`` has every cipher of FAST_CIPHERS (no AES-GCM
    when built without OpenSSL; a FIPS build may lack chacha20):
    ``ssh -Q cipher``, run once per binary (its path, size and
    mtime) and remembered in ``$XDG_CACHE_HOME/chaperone`` (each command is
    a new process: the answer costs a few ms to get); once per process."""
    try:
        st = os.stat(ssh)
    except OSError:
        return False
    key = "%s %d %d" % (os.path.realpath(ssh), st.st_size, st.st_mtime_ns)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "chaperone",
                         "ssh-ciphers")
    try:
        with open(cache) as f:
            for line in f:
                name, sep, answer = line.rstrip("\n").rpartition(" ")
                if sep and name == key:
                    return answer == "all"
    except OSError:
        pass
    import subprocess

    try:
        out = subprocess.run([ssh, "-Q", "cipher"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return False
    has = all(c in out.split() for c in FAST_CIPHERS)  # (one it lacks: the whole option is refused)
    try:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        with open(cache, "a") as f:
            f.write("%s %s\n" % (key, "all" if has else "no"))
    except OSError:
        pass
    return has


def config_mentions(paths: Sequence[str], *keywords: str) -> bool:
    """Whether any of these ssh config files sets one of ``keywords``
    (case-insensitive names such as ``Ciphers``; a textual check: enough to
    decide whether to supply a default), the files they ``Include`` too
    (as ssh: globs, relative to ~/.ssh for the user's files and /etc/ssh
    for the system's; a system crypto policy lives in such a file)."""
    found = config_keywords(paths)
    return any(k.lower() in found for k in keywords)


def config_keywords(paths: Sequence[str]) -> "frozenset[str]":
    """The keywords (lower case) that lines of these ssh config files, and
    of the files they include, start with, read again at each call.
    Without re (nor glob, for an Include whose wildcards are in its last
    part only, as the usual ``/etc/ssh/ssh_config.d/*.conf``): the head
    start reads them before it starts ssh."""
    found = set()
    todo = [(os.path.expanduser(p), 0) for p in paths]
    while todo:
        path, depth = todo.pop(0)
        try:
            with open(path, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            word = _keyword(line)
            if not word:
                continue
            found.add(word)
            rest = line.lstrip()[len(word):]
            if word == "include" and depth < 8 and rest[:1].isspace():
                base = "/etc/ssh" if path.startswith("/etc/") else os.path.expanduser("~/.ssh")
                for name in rest.split():
                    name = os.path.expanduser(name.strip('"'))
                    todo += [(f, depth + 1) for f in sorted(_glob(os.path.join(base, name)))]
    return frozenset(found)


def _glob(pattern: str) -> "list[str]":
    """``glob.glob(pattern)``; by hand (without re) when only the last part
    of the path has wildcards, and those are ``*`` and ``?``."""
    head, tail = os.path.split(pattern)
    if any(c in head for c in "*?[") or "[" in tail:
        import glob

        return glob.glob(pattern)
    if not any(c in tail for c in "*?"):
        return [pattern] if os.path.lexists(pattern) else []
    try:
        names = os.listdir(head or os.curdir)
    except OSError:
        return []
    return [os.path.join(head, n) for n in names
            if (tail.startswith(".") or not n.startswith(".")) and _wild_match(tail, n)]


def _wild_match(pattern: str, name: str) -> bool:
    """fnmatch's ``*`` and ``?`` (case-sensitive, as glob on POSIX)."""
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] in ("?", name[n]) and pattern[p] != "*":
            p += 1
            n += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _keyword(line: str) -> str:
    """The word a config line starts with (after blanks; letters, digits
    and ``_``, as the regular expression ``\\s*(\\w+)\\b`` reads it), lower case."""
    text = line.lstrip()
    end = 0
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    return text[:end].lower()


def default_config_files(config: Sequence[str]) -> List[str]:
    return list(config) or ["~/.ssh/config", "/etc/ssh/ssh_config"]


def ssh_options(ssh: str, target: "Target", *, connect_timeout: Optional[float] = None,
                keepalive_interval: float = 3.0, forwardings: bool = False) -> List[str]:
    """``ssh`` and its options for ``target`` (everything but the host and
    the command).  Command-line options win over the config (ssh keeps the
    first value), the user's ``-o`` options first of all.  Port forwardings
    from the config are cleared unless ``forwardings`` (that would clear
    those on the command line too)."""
    argv = [ssh]
    if target.config:
        argv += ["-F", target.config[0]]
    for option in target.options:
        argv += ["-o", option]
    argv += [
        "-T", "-x", "-a",  # no tty, no X11 or agent forwarding
        "-o", "BatchMode=yes",  # never a prompt
        "-o", "ServerAliveInterval=%d" % max(1, round(keepalive_interval)),
        "-o", "ServerAliveCountMax=3",
    ]
    if verbose():  # (its stderr is copied to this process's as it comes: see read_stderr)
        argv += ["-" + "v" * verbose()]
    else:
        argv += ["-o", "LogLevel=ERROR"]
    if not forwardings:
        argv += ["-o", "ClearAllForwardings=yes"]  # a LocalForward in the config is not for us
    if prefer_fast_ciphers(target.config, target.options) and _ssh_has_all_ciphers(ssh):
        argv += ["-o", "Ciphers=" + ",".join(FAST_CIPHERS)]
    if connect_timeout is not None:
        argv += ["-o", "ConnectTimeout=%d" % max(1, round(connect_timeout))]
    elif not (any(option_name(o) == "connecttimeout" for o in target.options)
              or config_sets_connect_timeout(ssh, target)):
        argv += ["-o", "ConnectTimeout=%d" % DEFAULT_CONNECT_TIMEOUT]
    if target.port:
        argv += ["-p", str(int(target.port))]
    if target.user:
        argv += ["-l", target.user]
    if target.jump:
        argv += ["-J", target.jump]
    for key in target.identities:
        argv += ["-i", key]
    if not target.check_host_keys:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    elif target.known_hosts:
        argv += ["-o", "UserKnownHostsFile=%s" % target.known_hosts]
    return argv


def config_sets_connect_timeout(ssh: str, target: "Target") -> bool:
    """Whether the SSH config gives ``target`` a ConnectTimeout (else
    chaperone's default bounds the connect: without one, ssh waits for ever
    on a host that accepts the connection and never says a word).  Only
    when a config file mentions ConnectTimeout at all is ssh asked what it
    makes of it for this host (``ssh -G``: Host and Match blocks apply to
    some hosts only)."""
    if not config_mentions(default_config_files(target.config), "ConnectTimeout"):
        return False
    return _effective(ssh, tuple(target.config[:1]), tuple(target.options), target.port, target.user,
                      target.destination).get("connecttimeout", "none") != "none"


@_memo
def _effective(ssh, config, options, port, user, destination) -> dict:
    """``ssh -G``: the settings ssh would use for this host (lower-case
    keywords; {} when ssh cannot say)."""
    import subprocess

    argv = [ssh, "-G"] + (["-F", config[0]] if config else [])
    for option in options:
        argv += ["-o", option]
    argv += (["-p", str(port)] if port else []) + (["-l", user] if user else []) + ["--", destination]
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=10).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return {}
    settings = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value.strip())
    return settings


def option_name(option: str) -> str:
    """The keyword of a ``-o`` option (``Key=Value`` or ``Key Value``), lower case."""
    return option.strip().replace("=", " ", 1).split(None, 1)[0].lower() if option.strip() else ""


def option_line(option: str) -> str:
    """A ``-o`` option as a line of an ssh config file."""
    key, sep, value = option.strip().partition("=")
    if not sep:
        key, _, value = option.strip().partition(" ")
    return "%s %s" % (key.strip(), value.strip())


def direct_argv(options: Sequence[str], host: str, command: str, multiplex: bool) -> List[str]:
    """``ssh ... HOST COMMAND`` on a connection of its own.  ``multiplex``:
    chaperone shares connections itself (the user's config does not), so
    this call must neither use nor become a control master."""
    argv = list(options)
    if multiplex:
        argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    return argv + ["--", host, command]
