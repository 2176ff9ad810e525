"""SSH in one place: what both SSH clients (asyncssh in ``via_asyncssh``,
OpenSSH's ``ssh`` in ``via_openssh``) share.

* what they send to a host: the bootstrap that runs the shipped agent and
  the script that ships it;
* how a call goes (:class:`SSHTransportBase`): launch the agent, ship it
  when the host lacks it and launch again, retry a connection that was
  refused before anything ran (sshd's MaxStartups), limit how many
  connections to one host are being set up at once;
* how their failures read.

Stdlib only: the CLI imports this on its start-up path.
"""

from __future__ import annotations

import abc
import random
import shlex
from typing import List, Optional, Tuple

from ...agent_source import agent_hash
from ...errors import ChaperoneError, ConnectFailed
from ..base import AgentProcess, Transport
from ..target import Target

from .failures import _host_for_ssh, connect_error  # noqa: F401 (defined there, used here and by others)
from .remote import (  # noqa: F401 (what runs on a host: defined there, used here and by others)
    BOOTSTRAP, REMOTE_DIR, SAFE_DIR, SHIP, SHIP_AGAIN, agent_command, agent_file, command_of,
)


def ship_command(python: str) -> str:
    """The remote command that installs the agent read from its stdin:
    exit 0, 3 (cannot write there, or the directory is unsafe: see
    BOOTSTRAP), 4 (damaged upload) or 127 (no python).  No ``chmod`` of an
    existing ``~/.chaperone``: one that others could write is refused, not
    quietly made private (what they planted would stay)."""
    script = (
        "umask 077; mkdir -p {dir} || exit 3; t={dir}/.agent.$$.tmp; "
        "cat > \"$t\" || {{ rm -f \"$t\"; exit 3; }}; "
        # 127: no such python (not a damaged upload).
        "{py} -I -S -c {ship} \"$t\" {hash} {dst}; s=$?; rm -f \"$t\"; exit $s"
    ).format(dir=REMOTE_DIR, py=shlex.quote(python), ship=shlex.quote(SHIP), hash=agent_hash(), dst=agent_file())
    return "sh -c %s" % shlex.quote(script)


def ship_notes(stderr: bytes) -> List[str]:
    """What a successful ship script says it repaired (moved aside, replaced)."""
    prefix = "chaperone-agent: note: "
    return [line[len(prefix):] for line in (stderr or b"").decode("utf-8", "replace").splitlines()
            if line.startswith(prefix)]


def report_ship_notes(host: str, stderr: bytes) -> None:
    """Say what shipping the agent to ``host`` repaired (a warning: shown
    on stderr unless logging is set up otherwise)."""
    notes = ship_notes(stderr)
    if notes:
        import logging

        log = logging.getLogger("chaperone.ssh")
        for note in notes:
            log.warning("chaperone: %s: %s", host, note)


def no_python(python: str, host: str) -> ChaperoneError:
    return ChaperoneError("no %s on %s (use --python to choose another)" % (python, host))


def ship_failure(status: int, stderr: bytes, python: str, host: str) -> ChaperoneError:
    """The error for a ship command that exited ``status`` (not 0)."""
    err = (stderr or b"").decode("utf-8", "replace").strip().splitlines()
    if status == 127:
        return no_python(python, host)
    if status == 3:
        return ChaperoneError("cannot write the agent to %s on %s: %s"
                              % (REMOTE_DIR, host, err[-1] if err else "not writable"))
    return ChaperoneError("cannot ship the agent to %s: %s"
                          % (host, err[-1] if err else "exit status %s" % status))


def shipped_but_missing(host: str) -> ChaperoneError:
    return ChaperoneError("the agent on %s is missing or damaged right after shipping it" % host)


class Tunnel:
    """A port on the host's loopback forwarded to a port here (for the
    agents' callbacks); ``port`` is the host's side.  Ends with the SSH
    connection that carries it."""

    port: int

    def closed(self) -> bool:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


#: New connections to one host being set up at once, by default: under
#: OpenSSH's ``MaxStartups 10:30:100`` (past 10 unauthenticated
#: connections, sshd starts dropping new ones).
DEFAULT_CONNECT_LIMIT = 4
#: A connection dropped before login (sshd's MaxStartups, a reset during
#: key exchange) is tried again this many times, with backoff and jitter.
CONNECT_RETRIES = 16
RETRY_BASE = 0.1
RETRY_CAP = 3.0


def retry_delay(attempt: int, rng=random.random) -> float:
    """Seconds before try ``attempt`` (1, 2, ...): exponential backoff with
    full jitter (AWS's "full jitter": uniform in [0, min(cap, base*2^n)])."""
    return rng() * min(RETRY_CAP, RETRY_BASE * (2 ** attempt))


async def retrying(connect):
    """``await connect()``, again after a :class:`ConnectFailed` that is
    ``retry_safe`` (dropped before login: nothing ran), with backoff and
    jitter, at most CONNECT_RETRIES times."""
    import asyncio

    attempt = 0
    while True:
        try:
            return await connect()
        except ConnectFailed as e:
            attempt += 1
            if not e.retry_safe or attempt > CONNECT_RETRIES:
                raise
            await asyncio.sleep(retry_delay(attempt))


#: Login-script output read while looking for the agent's marker, at most.
MAX_NOISE = 1 << 20


def marker_needle(args: List[str]) -> Optional[bytes]:
    """The marker line the agent prints first, for an agent argv with
    ``--marker M`` (None without)."""
    for i, arg in enumerate(args):
        if arg == "--marker" and i + 1 < len(args):
            return b"\n" + args[i + 1].encode() + b"\n"
        if arg.startswith("--marker="):
            return b"\n" + arg.partition("=")[2].encode() + b"\n"
    return None


class Launch(abc.ABC):
    """One agent command just started on a host (its first bytes not read yet)."""

    @abc.abstractmethod
    async def first(self) -> bytes:
        """The first bytes of its stdout; ``b""`` if it ended without any."""

    @abc.abstractmethod
    async def more(self) -> bytes:
        """The next bytes of its stdout, after what :meth:`first` and
        earlier calls gave; ``b""`` at its end."""

    @abc.abstractmethod
    async def finish(self) -> Tuple[Optional[int], bytes]:
        """Its exit status and stderr, once it ended (after ``first`` gave ``b""``)."""

    @abc.abstractmethod
    def process(self, first: bytes) -> AgentProcess:
        """The agent process to read from (``first`` is given back first)."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Stop it and free what it holds."""


class SSHTransportBase(Transport):
    """A host reached over SSH.  Subclasses say how a command is launched
    (:meth:`_launch`) and how the agent is shipped (:meth:`_ship_once`);
    the rest is here, once."""

    def __init__(self, target: Target, *, connect_timeout: Optional[float] = None,
                 keepalive_interval: float = 3.0, max_sessions: int = 10,
                 connect_limit: int = DEFAULT_CONNECT_LIMIT):
        if target.local:
            raise ChaperoneError("%s is not a host reached over SSH" % target.name)
        self.target = target
        self.host = target.name
        self.python = target.python or "python3"
        self.root = target.spool  # the agent's spool root on the host (default ~/.chaperone/runs)
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.max_sessions = max_sessions
        self.connect_limit = max(1, int(connect_limit))
        self.agent_file = agent_file()
        self._ship_lock = None
        self._shipped = 0  # how many times this transport shipped the agent
        self._connecting = None  # asyncio.Semaphore(connect_limit), made in the loop

    def describe(self) -> dict:
        return self.target.describe()

    # Connecting -------------------------------------------------------------

    def connecting(self):
        """The semaphore every new connection to this host is set up under."""
        if self._connecting is None:
            import asyncio

            self._connecting = asyncio.Semaphore(self.connect_limit)
        return self._connecting

    async def retrying(self, connect):
        """:func:`retrying` (here for the subclasses)."""
        return await retrying(connect)

    # Running the agent ------------------------------------------------------

    @abc.abstractmethod
    async def _launch(self, command: str, stdin: bytes, keep_stdin: bool = False) -> Launch:
        """Start ``command`` (for the login shell) with ``stdin`` on the host
        (its stdin then closed, unless ``keep_stdin``)."""

    @abc.abstractmethod
    async def _ship_once(self) -> bytes:
        """Install the agent on the host (raise on failure); what the ship
        script said on stderr (the repairs it made: :func:`ship_notes`)."""

    def _silent_exit(self, launch: Launch, code: Optional[int], err: bytes, relaunched: bool) -> bool:
        """A call ended without a byte of output, status ``code``: raise
        the error it means, or return True to launch it once more
        (``relaunched``: this call was launched once more already)."""
        return False

    async def open(self, args: List[str], stdin: bytes = b"", *, keep_stdin: bool = False) -> AgentProcess:
        command = agent_command(self.python, self.root, args)
        needle = marker_needle(args)
        shipped_again = relaunched = False
        while True:
            shipped = self._shipped
            launch = await self._launch(command, stdin, keep_stdin)
            try:
                # The agent always prints (a marker) unless the bootstrap
                # refused it: no output and status 97 mean "ship it again".
                # What login scripts print comes first: read on to the
                # marker; output that ends without one is no reply either.
                first = await launch.first()
                while first and needle and needle not in first and len(first) <= MAX_NOISE:
                    more = await launch.more()
                    if not more:
                        break
                    first += more
            except BaseException:
                launch.discard()
                raise
            if first and (not needle or needle in first or len(first) > MAX_NOISE):
                return launch.process(first)
            code, err = await launch.finish()
            if code == SHIP_AGAIN:
                if shipped_again:
                    raise shipped_but_missing(self.host)
                shipped_again = True
                await self._ship(shipped)
                continue
            if self._silent_exit(launch, code, err, relaunched):
                relaunched = True
                continue
            if code == 127:
                raise no_python(self.python, self.host)
            return launch.process(first)

    async def _ship(self, shipped_before: int) -> None:
        """Ship the agent, unless another call of this transport did since
        ``shipped_before``."""
        import asyncio

        if self._ship_lock is None:
            self._ship_lock = asyncio.Lock()
        async with self._ship_lock:
            if self._shipped == shipped_before:
                report_ship_notes(self.host, await self._ship_once())
                self._shipped += 1
