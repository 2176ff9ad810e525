"""What both SSH clients (asyncssh in ``chaperone.ssh``, OpenSSH's ``ssh``
in ``chaperone.openssh``) send to a host: the bootstrap that runs the
shipped agent, the script that ships it, and how their failures read.

Stdlib only: the CLI imports this on its start-up path.
"""

from __future__ import annotations

import shlex
from typing import List, Optional

from ...agent_source import RUN_AGENT, agent_hash
from ...errors import ChaperoneError

#: Exit status of the remote bootstrap when the agent file is missing, stale or damaged.
SHIP_AGAIN = 97
REMOTE_DIR = "~/.chaperone"

#: Run by ``python -c`` on the host: ``BOOT AGENT_FILE SHA256 ARGS...`` runs
#: AGENT_FILE with ARGS if its content has that hash, else exits 97.
BOOTSTRAP = (
    "import sys,hashlib\n"
    "try:\n"
    "    _b=open(sys.argv[1],'rb').read()\n"
    "except OSError:\n"
    "    sys.exit(%d)\n"
    "if hashlib.sha256(_b).hexdigest()!=sys.argv[2]:\n"
    "    sys.exit(%d)\n"
    "sys.argv=sys.argv[1:2]+sys.argv[3:]\n"
) % (SHIP_AGAIN, SHIP_AGAIN) + RUN_AGENT


class ConnectFailed(ChaperoneError):
    """Could not connect to or log in to the host.  ``transient``: worth
    retrying later (refused, timed out, reset), as opposed to a wrong host
    key or a refused login."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class SSHDescribed:
    """What both SSH transports record of how a host was reached, and how
    either one is rebuilt from that record (a run started through one can
    be reconnected through the other)."""

    def describe(self) -> dict:
        return {
            "host": self.host, "ssh": {
                "port": self.port, "username": self.username, "config": self.config,
                "known_hosts": self.known_hosts, "check_host_keys": self.check_host_keys,
                "python": self.python, "client_keys": self.client_keys, "root": self.root,
            },
        }

    @classmethod
    def from_description(cls, how: dict):
        ssh = dict(how.get("ssh") or {})
        return cls(how["host"], **{k: v for k, v in ssh.items() if v is not None})


def agent_file() -> str:
    """Where the agent lives on a host (content-addressed)."""
    return "%s/agent-%s.py" % (REMOTE_DIR, agent_hash()[:16])


def agent_command(python: str, root: Optional[str], args: List[str]) -> str:
    """The remote command that runs ``agent.py ARGS`` (for the login shell)."""
    if root:
        args = ["--root", root, *args]
    # A small bootstrap reads the agent file, checks its sha256 and only
    # then runs it (as __main__, in the same process): a missing, damaged,
    # truncated or stale copy exits 97 ("ship it again") before any of it
    # runs.  (Checking the hash inside the agent alone misses a copy too
    # damaged to reach that check: empty, truncated, a syntax error.)  The
    # agent checks its own hash too (--expect-hash).
    # -I -S: stdlib only, nothing from the host's site-packages or PYTHON* vars.
    # A missing python makes `exec` fail with 127.
    script = "exec %s -I -S -c %s %s %s --expect-hash %s %s" % (
        shlex.quote(python), shlex.quote(BOOTSTRAP), agent_file(), agent_hash(), agent_hash(),
        " ".join(shlex.quote(a) for a in args))
    # The remote login shell runs `sh -c SCRIPT`: plain sh syntax only.
    return "sh -c %s" % shlex.quote(script)


def ship_command(python: str) -> str:
    """The remote command that installs the agent read from its stdin:
    exit 0, 3 (cannot write), 4 (damaged upload) or 127 (no python)."""
    script = (
        "umask 077; mkdir -p {dir} && chmod 700 {dir} || exit 3; t={dir}/.agent.$$.tmp; cat > \"$t\" || exit 3; "
        "{py} -c 'import hashlib,sys; sys.exit(hashlib.sha256(open(sys.argv[1],\"rb\").read())"
        ".hexdigest()!=sys.argv[2])' \"$t\" {hash}; s=$?; "
        # 127: no such python (not a damaged upload).
        "if [ $s -ne 0 ]; then rm -f \"$t\"; [ $s -eq 127 ] && exit 127; exit 4; fi; "
        "mv -f \"$t\" {dst} || exit 3; "
        # Its bytecode, checked against the source's hash at each load.
        "{py} -I -S -c 'import py_compile,sys; py_compile.compile(sys.argv[1], doraise=True, "
        "invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)' {dst} >/dev/null 2>&1; exit 0"
    ).format(dir=REMOTE_DIR, py=shlex.quote(python), hash=agent_hash(), dst=agent_file())
    return "sh -c %s" % shlex.quote(script)


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
