"""How ``ssh`` is run: which client, which binary, its options (everything
but the host and the command).  Stdlib only, light to import.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import List, Optional, Sequence

    from ..target import Target

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
    return config_mentions(default_config_files(config), r"Control(Master|Path|Persist)")


def config_mentions(paths: Sequence[str], keyword: str) -> bool:
    """Whether any of these ssh config files sets ``keyword`` (a regular
    expression; a textual check: enough to decide whether to supply a
    default)."""
    import re

    pattern = re.compile(r"\s*(%s)\b" % keyword, re.IGNORECASE)
    for path in paths:
        try:
            with open(os.path.expanduser(path), errors="replace") as f:
                if any(pattern.match(line) for line in f):
                    return True
        except OSError:
            continue
    return False


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
        "-o", "LogLevel=ERROR",
    ]
    if not forwardings:
        argv += ["-o", "ClearAllForwardings=yes"]  # a LocalForward in the config is not for us
    if connect_timeout is not None:
        argv += ["-o", "ConnectTimeout=%d" % max(1, round(connect_timeout))]
    elif not (any(option_name(o) == "connecttimeout" for o in target.options)
              or config_mentions(default_config_files(target.config), "ConnectTimeout")):
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
