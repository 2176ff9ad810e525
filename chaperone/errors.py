"""Every exception chaperone raises, in one place.

Families (the CLI turns a :class:`ChaperoneError` into one line on stderr and
its ``exit_code``; everything else is a bug and gets a traceback):

* the user's and the hosts': :class:`ChaperoneError` and its kinds
  (:class:`UsageError` 2, :class:`NoSuchRun` 4, :class:`StartFailed`,
  :class:`StartPending`, :class:`ConnectFailed`, :class:`ConnectionLost`,
  :class:`AgentFailed`);
* the wire: :class:`ProtocolError` (the agent's output), :class:`OffsetGap`
  and :class:`Reject` (requests the callback endpoint or the server refuse);
* ``chaperone serve``: :class:`CannotServe`, :class:`AlreadyRunning`,
  :class:`Conflict`, and its clients' :class:`ServeError` kinds;
* many hosts: :class:`NodeSetError`, :class:`InventoryError`,
  :class:`SelectionError` (``ValueError`` kinds: a bad pattern or file),
  :class:`HostFailure` (one host's failure in a fan-out).

The modules where each was first defined still export it under its name.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (typing's import costs the head start's fast paths 5 ms)
if TYPE_CHECKING:
    from typing import Optional


class ChaperoneError(Exception):
    """Something chaperone itself could not do (exit status 255 in the CLI)."""

    exit_code = 255


class UsageError(ChaperoneError):
    """Bad input from the user (exit status 2)."""

    exit_code = 2


class NoSuchRun(ChaperoneError):
    exit_code = 4


class StartFailed(ChaperoneError):
    """The run never started: its start never reached its host, or was
    refused there (its record says ``failed``, with the original error)."""


class StartPending(ChaperoneError):
    """The run is ``starting`` and its host does not have it yet: its start
    may still be on its way (another process, or this one, is starting
    it).  Look again in a moment; after ``states.START_GRACE`` a start
    that never arrived is ``failed``."""

    transient = True


class ConnectionLost(ChaperoneError):
    """The transport to the host broke; the run itself goes on."""


class ConnectFailed(ChaperoneError):
    """Could not connect to or log in to the host.  ``transient``: worth
    retrying later (refused, timed out, reset), as opposed to a wrong host
    key or a refused login.  ``retry_safe``: dropped before login (sshd's
    MaxStartups, a reset during key exchange): nothing can have run, so the
    call is simply made again."""

    def __init__(self, message: str, transient: bool = False, retry_safe: bool = False):
        super().__init__(message)
        self.transient = transient or retry_safe
        self.retry_safe = retry_safe


class AgentFailed(ChaperoneError):
    """The agent answered with an error (its one-line message).  The CLI's
    exit status follows the agent's (docs/protocol.md): 1 when it refused
    (a signal to a run that is over, clean of a running run), 3 when the
    spool is damaged or the host's OS failed; else 255."""

    def __init__(self, message, code):
        super().__init__(message)
        self.agent_code = code
        self.exit_code = code if code in (1, 3) else 255


class TimeoutExpired(Exception):
    """A child process did not exit within the time given (``Child.wait``)."""


# -- The wire: what the agent prints, what agents post back ----------------


class ProtocolError(Exception):
    """Bytes from the agent that do not follow docs/protocol.md (a client
    turns it into :class:`ConnectionLost` or :class:`AgentFailed`)."""


class ForeignBytes(ProtocolError):
    """Bytes in the agent's frames that are not the agent's: something else
    wrote to the session's output (say a job the login scripts left
    running).  The frames before them were whole; the client reads on
    from the spool, as after a dropped connection."""


class OffsetGap(Exception):
    """A chunk starts after the last byte held; resend from :attr:`held`."""

    def __init__(self, held: int, offset: Optional[int] = None) -> None:
        self.held = held
        self.offset = offset
        msg = f"offset gap: {held} bytes held"
        if offset is not None:
            msg += f", chunk starts at {offset}"
        super().__init__(msg)


class Reject(Exception):
    """An HTTP request refused with ``status`` and ``{"error": message}``
    (and ``headers``, e.g. ``WWW-Authenticate``): by the callback endpoint
    and by ``chaperone serve``'s API alike."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# -- chaperone serve: the server and its clients ---------------------------


class CannotServe(Exception):
    """A reason ``chaperone serve`` cannot start or stop, in one line."""


class AlreadyRunning(CannotServe):
    """Another ``chaperone serve`` holds this home's lock."""


class Conflict(UsageError):
    """The run id is taken (by another run, or by a start in progress)."""


class ServeError(ChaperoneError):
    """What a client of ``chaperone serve`` (:mod:`chaperone.serve.client`)
    gets from the server: ``status`` is the HTTP status (0: none)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class ServeUsageError(ServeError, UsageError):
    """The server refused the request (400, 409)."""

    exit_code = 2


class ServeNoSuchRun(ServeError, NoSuchRun):
    """The server has no such run (404)."""

    exit_code = 4


class ServerGone(ServeError):
    """The server could not be reached (not running any more?)."""


# -- Many hosts: patterns, inventories, the fan-out -------------------------


class NodeSetError(ValueError):
    """A bad node set or host pattern: one line, with the column (1-based)
    of the offending character when there is one."""

    def __init__(self, pattern: str, reason: str, position: Optional[int] = None,
                 context: str = "host pattern") -> None:
        self.pattern = pattern
        self.reason = reason
        self.position = position  # 0-based index into pattern, or None
        where = "" if position is None else " at column %d" % (position + 1)
        shown = pattern if len(pattern) <= 200 else pattern[:197] + "..."
        #: The message without the pattern ("'[' at column 5 is never closed").
        self.detail = reason.replace(" {at}", where) if " {at}" in reason else reason + where
        super().__init__("%s %r: %s" % (context, shown, self.detail))


class InventoryError(ValueError):
    """A bad or missing inventory: one line, naming the file (and line)."""


class SelectionError(ValueError):
    """A selection that cannot be made (bad pattern, nothing selected ...)."""


class HostFailure(Exception):
    """Raise it from a fan-out task to fail its host with exactly this reason
    (no exception type in front), e.g. ``HostFailure("ssh: connect to host
    h03 port 22: Connection refused", exit_status=255)``."""

    def __init__(self, reason: str, exit_status: Optional[int] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status
