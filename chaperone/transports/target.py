"""How a host is reached: :class:`Target`, parsed from what a user types and
recorded with each run, so that any later process reaches the run's host
the same way.

Stdlib only and light to import (the CLI's head start uses it).

What a host argument may be, as with ``ssh``:

* ``local``: this machine, no SSH;
* ``host`` or ``user@host``: a name from the SSH config, a DNS name or an
  address;
* ``ssh://[user@]host[:port]``: OpenSSH's URI form;
* ``host:port`` and ``[v6addr]:port``: understood as a port (``ssh``
  itself would try to resolve ``host:port``: chaperone takes the clear
  meaning instead);
* anything else with ``/``, spaces or control characters is refused with a
  hint.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import UsageError

LOCAL = "local"


def is_local(name: str) -> bool:
    """Whether a host name (as the user wrote it, or a record keeps it) is
    this machine: the one place that says what ``local`` means."""
    return name == LOCAL


class Target:
    """Where a run lives and how chaperone gets there.  Immutable; equal
    targets share one transport (one connection) in a process.

    ``name`` is the host as the user wrote it (``gpu1``, ``me@10.0.0.5``,
    ``local``): what records and tables show.  The SSH fields are what
    ``ssh`` would get on its command line (the SSH config fills in the
    rest, for both SSH clients)."""

    __slots__ = ("name", "hostname", "user", "port", "config", "identities", "options", "jump",
                 "python", "spool", "check_host_keys", "known_hosts", "_key")

    def __init__(self, name: str, *, hostname: Optional[str] = None, user: Optional[str] = None,
                 port: Optional[int] = None, config: Sequence[str] = (), identities: Sequence[str] = (),
                 options: Sequence[str] = (), jump: Optional[str] = None, python: Optional[str] = None,
                 spool: Optional[str] = None, check_host_keys: bool = True, known_hosts: Optional[str] = None):
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "hostname", hostname)
        set_(self, "user", user)
        set_(self, "port", int(port) if port else None)
        set_(self, "config", tuple(config or ()))
        set_(self, "identities", tuple(identities or ()))
        set_(self, "options", tuple(options or ()))
        set_(self, "jump", jump or None)
        set_(self, "python", python or None)
        set_(self, "spool", spool or None)
        set_(self, "check_host_keys", bool(check_host_keys))
        set_(self, "known_hosts", known_hosts or None)
        set_(self, "_key", None)

    def __setattr__(self, name, value):
        raise AttributeError("Target is immutable; use replace()")

    # Kinds -----------------------------------------------------------------

    @property
    def local(self) -> bool:
        """This machine, reached without SSH."""
        return is_local(self.name)

    @property
    def destination(self) -> str:
        """What ``ssh`` is given as the host (an alias the SSH config may
        map to another HostName)."""
        return self.hostname or self.name

    # Building --------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, **settings: Any) -> "Target":
        """A target from a host argument (see the module's docstring) and
        settings (``user``, ``port``, ``config``, ``identities``,
        ``options``, ``jump``, ``python``, ``spool``, ``check_host_keys``,
        ``known_hosts``).  Settings given here win over what the argument
        says (``-l`` over ``user@``, ``-p`` over ``:port``), as with ssh."""
        name, user, host, port = parse_host(text)
        if name == LOCAL:
            return cls(LOCAL, python=settings.get("python"), spool=settings.get("spool"))
        if settings.get("user"):
            user = settings["user"]
        if settings.get("port"):
            port = settings["port"]
        rest = {k: v for k, v in settings.items() if k not in ("user", "port")}
        return cls(name, hostname=host if host != name else None, user=user, port=port, **rest)

    def replace(self, **changes: Any) -> "Target":
        fields = {k: getattr(self, k) for k in self.__slots__ if not k.startswith("_")}
        fields.update(changes)
        name = fields.pop("name")
        return Target(name, **fields)

    # Records ----------------------------------------------------------------

    def describe(self) -> Dict[str, Any]:
        """A JSON-able description, kept in the run's record."""
        if self.local:
            return {"host": LOCAL, "python": self.python, "root": self.spool}
        return {
            "host": self.name, "ssh": {
                "hostname": self.hostname, "username": self.user, "port": self.port,
                "config": list(self.config), "client_keys": list(self.identities) or None,
                "options": list(self.options) or None, "jump": self.jump,
                "check_host_keys": self.check_host_keys, "known_hosts": self.known_hosts,
                "python": self.python, "root": self.spool,
            },
        }

    @classmethod
    def from_description(cls, how: Dict[str, Any]) -> "Target":
        """The target a record describes (also records of earlier versions)."""
        name = how.get("host") or LOCAL
        if name == LOCAL:
            return cls(LOCAL, python=how.get("python"), spool=how.get("root"))
        ssh = how.get("ssh") or {}
        user, host = ssh.get("username"), ssh.get("hostname")
        if ssh.get("hostname") is None and "@" in name:  # records of earlier versions
            user_part, _, host = name.rpartition("@")
            user = user or user_part
        return cls(name, hostname=host, user=user, port=ssh.get("port"), config=ssh.get("config") or (),
                   identities=ssh.get("client_keys") or (), options=ssh.get("options") or (),
                   jump=ssh.get("jump"), python=ssh.get("python"), spool=ssh.get("root"),
                   check_host_keys=ssh.get("check_host_keys", True), known_hosts=ssh.get("known_hosts"))

    # Identity ---------------------------------------------------------------

    def key(self) -> Tuple:
        if self._key is None:
            object.__setattr__(self, "_key", tuple(getattr(self, k) for k in self.__slots__ if k != "_key"))
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        return "Target(%r)" % self.name


def _bad(text: str, why: str) -> UsageError:
    return UsageError("invalid host %r: %s" % (text, why))


def parse_host(text: str) -> Tuple[str, Optional[str], str, Optional[int]]:
    """``(name, user, host, port)`` from a host argument; ``name`` is what
    tables show: the argument without a ``ssh://`` scheme or port."""
    if not isinstance(text, str) or not text:
        raise _bad(str(text), "it is empty")
    if text == LOCAL:
        return LOCAL, None, LOCAL, None
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        raise _bad(text, "it contains spaces or control characters")
    port: Optional[int] = None
    uri = text.startswith("ssh://")
    rest = text[len("ssh://"):] if uri else text
    if "://" in rest:
        raise _bad(text, "only ssh:// URLs are understood (ssh://[user@]host[:port])")
    if uri:
        rest = rest.rstrip("/")
    if "/" in rest:
        hint = " (a path? chaperone takes HOST, then the command: run HOST -- CMD)"
        raise _bad(text, "'/' is not allowed in a host name" + hint)
    user, at, hostport = rest.rpartition("@")
    if at and not user:
        raise _bad(text, "the user name before '@' is empty")
    host = hostport
    if hostport.startswith("["):  # [v6addr] or [v6addr]:port
        end = hostport.find("]")
        if end < 0:
            raise _bad(text, "']' is missing")
        host, tail = hostport[1:end], hostport[end + 1:]
        if tail:
            if not tail.startswith(":"):
                raise _bad(text, "expected ':PORT' after ']'")
            port = _port(text, tail[1:])
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = _port(text, p)
    elif hostport.count(":") > 1 and uri:
        raise _bad(text, "write an IPv6 address in brackets: ssh://[addr]:port")
    if not host:
        raise _bad(text, "the host name is empty")
    if host.startswith("-"):
        raise _bad(text, "a host name cannot start with '-'")
    name = (user + "@" if at else "") + host
    return name, (user or None), host, port


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise _bad(text, "%r is not a port number (1-65535)" % value)
    return int(value)
