"""Build argv lists that run a command on a host, through OpenSSH and sudo.

Two public functions:

* :func:`build_command` runs a *shell command string* (``/bin/sh -c``).
* :func:`build_program` runs an *exact argv*: nothing in it is ever
  interpreted by a shell, on either side.

Both return a ``list[str]`` for :mod:`subprocess`; they start nothing.

How a command reaches the remote host
-------------------------------------
``ssh`` joins its remote arguments with spaces and the remote user's login
shell parses the result again.  So we always hand ``ssh`` exactly **one**
remote argument, already quoted for a POSIX shell, and that argument always
runs ``/bin/sh -c <command>``: the command is interpreted by ``/bin/sh`` on
every path (local, remote, with or without sudo), never by whatever login
shell the remote user has.  The login shell must understand POSIX single
quotes (sh, bash, dash, zsh, ksh do).

Options
-------
``options`` is a :class:`CommandOptions` or a plain ``dict`` with the same keys
(unknown keys are an error):

``mode``
    ``"ssh"`` (default): ``ssh [-l user] host ...``.
    ``"ssh-as"``: ``ssh -l user host ...`` (a user is required).
    ``"sudo-then-ssh"``: ``sudo -u user ssh host ...``: become the local
    ``user`` first, then connect with *their* ssh keys and config.
    ``"ssh-then-sudo"``: ``ssh host 'sudo -u user -- /bin/sh -c ...'``:
    connect as the configured login user, then become ``user`` remotely.
``port``
    ``ssh -p PORT`` (int, 1-65535).
``identity_file``
    ``ssh -i FILE``.
``ssh_options``
    ``ssh -o`` options: a list of ``"Name=value"`` strings, or a dict
    ``{"Name": value}`` (bool values become ``yes``/``no``).  They come before
    ``BatchMode``, so they win (ssh keeps the first value it sees).
``config_file``
    ``ssh -F FILE``.
``ssh``
    The ssh program (default ``"ssh"``).
``sudo``
    The sudo program (default ``"sudo"``).
``batch``
    Default ``True``: ``ssh -o BatchMode=yes`` and ``sudo -n``, so nothing ever
    waits for a password or a host key confirmation.

``host=None`` runs locally, without ssh: ``["/bin/sh", "-c", command]``, or
``[sudo, "-n", "-u", user, "--", "/bin/sh", "-c", command]`` when ``user`` is
given (whatever the mode).

Hosts and users are checked: empty values, values starting with ``-``
(option injection), whitespace and control characters are rejected with
:class:`ValueError`.  Commands and arguments may contain anything but NUL.

Only the standard library is imported here (CLI start-up time matters).
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any, List, Mapping, Optional, Sequence, Union

__all__ = ["MODES", "CommandOptions", "build_command", "build_program"]

#: The accepted values of ``options["mode"]``.
MODES = ("ssh", "ssh-as", "sudo-then-ssh", "ssh-then-sudo")

#: The shell that interprets command strings, everywhere.
SHELL = "/bin/sh"


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """How to reach a host; see the module docstring for each field."""

    mode: str = "ssh"
    port: Optional[int] = None
    identity_file: Optional[str] = None
    ssh_options: Union[Sequence[str], Mapping[str, Any], None] = None
    config_file: Optional[str] = None
    ssh: str = "ssh"
    sudo: str = "sudo"
    batch: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"unknown mode {self.mode!r}: expected one of {', '.join(MODES)}"
            )
        if self.port is not None:
            if isinstance(self.port, bool) or not isinstance(self.port, int):
                raise ValueError(f"port must be an int, not {self.port!r}")
            if not 1 <= self.port <= 65535:
                raise ValueError(f"port {self.port} out of range 1-65535")
        for name in ("identity_file", "config_file"):
            value = getattr(self, name)
            if value is not None:
                _check_path(name, value)
        for name in ("ssh", "sudo"):
            _check_path(name, getattr(self, name))
        if not isinstance(self.batch, bool):
            raise ValueError(f"batch must be True or False, not {self.batch!r}")
        # Validates ssh_options early.
        self.ssh_option_args()

    @classmethod
    def coerce(
        cls, options: Union["CommandOptions", Mapping[str, Any], None]
    ) -> "CommandOptions":
        """Accept a :class:`CommandOptions`, a dict of its fields, or None."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(
                f"options must be a dict or CommandOptions, not {type(options).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))}: "
                f"expected some of {', '.join(sorted(known))}"
            )
        values = dict(options)
        # None for ssh/sudo/mode/batch means "the default".
        for key in ("mode", "ssh", "sudo", "batch"):
            if key in values and values[key] is None:
                del values[key]
        return cls(**values)

    def ssh_option_args(self) -> List[str]:
        """The ``-o`` arguments for :attr:`ssh_options`."""
        opts = self.ssh_options
        if opts is None:
            return []
        items: List[str] = []
        if isinstance(opts, Mapping):
            for name, value in opts.items():
                if not isinstance(name, str) or not name or not name.isalnum():
                    raise ValueError(f"invalid ssh option name {name!r}")
                if isinstance(value, bool):
                    value = "yes" if value else "no"
                elif isinstance(value, int):
                    value = str(value)
                if not isinstance(value, str):
                    raise ValueError(
                        f"ssh option {name!r}: value must be a str, int or bool, "
                        f"not {value!r}"
                    )
                items.append(f"{name}={value}")
        elif isinstance(opts, (list, tuple)):
            for item in opts:
                if not isinstance(item, str) or not item.strip():
                    raise ValueError(f"invalid ssh option {item!r}: expected 'Name=value'")
                items.append(item)
        else:
            raise ValueError(
                "ssh_options must be a list of 'Name=value' strings or a dict, "
                f"not {type(opts).__name__}"
            )
        args: List[str] = []
        for item in items:
            if _has_control(item):
                raise ValueError(f"ssh option {item!r} contains a control character")
            if item.startswith("-"):
                raise ValueError(f"ssh option {item!r} must not start with '-'")
            args += ["-o", item]
        return args


def build_command(
    command: str,
    host: Optional[str] = None,
    user: Optional[str] = None,
    options: Union[CommandOptions, Mapping[str, Any], None] = None,
) -> List[str]:
    """Return an argv that runs the shell command string ``command``.

    ``command`` is interpreted by ``/bin/sh -c`` as ``user`` on ``host``
    (``host=None``: locally).  See the module docstring for ``options``.
    Raises :class:`ValueError` on bad input.
    """
    if not isinstance(command, str):
        raise ValueError(f"command must be a str, not {type(command).__name__}")
    if "\0" in command:
        raise ValueError("command contains a NUL character")
    opts = CommandOptions.coerce(options)
    if host is not None:
        _check_name("host", host)
    if user is not None:
        _check_name("user", user)

    sudo_prefix = [opts.sudo] + (["-n"] if opts.batch else [])

    if host is None:
        if user is None:
            return [SHELL, "-c", command]
        return sudo_prefix + ["-u", user, "--", SHELL, "-c", command]

    mode = opts.mode
    if mode in ("ssh-as", "sudo-then-ssh", "ssh-then-sudo") and user is None:
        raise ValueError(f"mode {mode!r} needs a user")

    shell_command = f"{SHELL} -c {shlex.quote(command)}"
    ssh = [opts.ssh] + _ssh_common_args(opts)

    if mode in ("ssh", "ssh-as"):
        login = ["-l", user] if user is not None else []
        return ssh + login + ["--", host, shell_command]
    if mode == "sudo-then-ssh":
        return sudo_prefix + ["-u", user, "--"] + ssh + ["--", host, shell_command]
    # ssh-then-sudo
    remote = " ".join(
        shlex.quote(a) for a in sudo_prefix + ["-u", user, "--", SHELL, "-c", command]
    )
    return ssh + ["--", host, remote]


def build_program(
    argv: Sequence[str],
    host: Optional[str] = None,
    user: Optional[str] = None,
    options: Union[CommandOptions, Mapping[str, Any], None] = None,
) -> List[str]:
    """Return an argv that runs exactly ``argv`` (no shell interpretation).

    ``argv[0]`` is looked up in ``PATH`` as a shell would.  Same ``host``,
    ``user`` and ``options`` as :func:`build_command`.
    """
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise ValueError("argv must be a list of str, not a string")
    if not argv:
        raise ValueError("argv must not be empty")
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise ValueError(f"argv[{i}] must be a str, not {type(arg).__name__}")
        if "\0" in arg:
            raise ValueError(f"argv[{i}] contains a NUL character")
    if argv[0] == "":
        raise ValueError("argv[0] must not be empty")
    return build_command(
        "exec " + " ".join(shlex.quote(a) for a in argv),
        host=host,
        user=user,
        options=options,
    )


def _ssh_common_args(opts: CommandOptions) -> List[str]:
    args: List[str] = []
    if opts.config_file is not None:
        args += ["-F", opts.config_file]
    if opts.port is not None:
        args += ["-p", str(opts.port)]
    if opts.identity_file is not None:
        args += ["-i", opts.identity_file]
    args += opts.ssh_option_args()
    if opts.batch:
        args += ["-o", "BatchMode=yes"]
    return args


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _check_name(what: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if value.startswith("-"):
        raise ValueError(
            f"{what} {value!r} starts with '-': refused (it would be read as an option)"
        )
    if _has_control(value) or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} contains whitespace or control characters")


def _check_path(what: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str, not {value!r}")
    if "\0" in value or "\n" in value:
        raise ValueError(f"{what} {value!r} contains a NUL or newline")

