"""The server's files in ``$CHAPERONE_HOME/serve/`` (directory 0700, files 0600).

* ``token``: the 256-bit secret every ``/api/`` request must present (the
  CLI and programs as ``Authorization: Bearer TOKEN``; the browser as a
  cookie derived from it).  Made once and kept across restarts, so that an
  open page and a client keep working after the server comes back; delete
  the file (server stopped) to make a new one.
* ``server.json``: how clients find the running server (pid, its start time,
  URL, port ...).  One whose pid is dead, or belongs to another process
  now, is stale and ignored.
* ``lock``: held (``flock``) by the running server, so that a second one
  knows it is second, even when a killed one left its ``server.json``.
* ``log``: a detached server's log.

Stdlib only: :mod:`chaperone.serve.client` imports this, and the CLI may
import that one without loading the server.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Optional
from ..errors import AlreadyRunning  # noqa: F401 (defined there; exported here too)

TOKEN_BYTES = 32  # 256 bits


def serve_dir(home=None) -> Path:
    """``$CHAPERONE_HOME/serve`` (created 0700, made 0700 if it was not)."""
    from ..records import chaperone_home

    path = chaperone_home(home) / "serve"
    path.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` atomically, 0600 from its first byte."""
    tmp = path.with_name(".%s.%d.tmp" % (path.name, os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_token(directory: Path) -> Optional[str]:
    try:
        text = (Path(directory) / "token").read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def ensure_token(directory: Path) -> str:
    """The server's token: the one in ``token``, or a new one.  A token file
    that others could read (not 0600, or not ours) is replaced: the secret
    may have leaked."""
    path = Path(directory) / "token"
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        private = stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 == 0
        token = read_token(directory) if private else None
        if token and len(token) >= 43:
            return token
    token = secrets.token_urlsafe(TOKEN_BYTES)
    _write_private(path, token.encode("ascii") + b"\n")
    return token


def process_start(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), or None if
    there is no such process (or only its exit status is left)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None  # (it exited; its parent has not looked yet)
        return proc.create_time()
    except Exception:
        return None


def write_server_info(directory: Path, info: dict) -> None:
    _write_private(Path(directory) / "server.json", json.dumps(info, indent=1).encode() + b"\n")


def read_server_info(directory: Path) -> Optional[dict]:
    """The running server's ``server.json``, or None when there is none or
    it is stale (its process is gone, or the pid is another process now)."""
    try:
        info = json.loads((Path(directory) / "server.json").read_text())
        pid = int(info["pid"])
        started = float(info["pid_start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    actual = process_start(pid)
    if actual is None or abs(actual - started) > 1.0:
        return None
    return info


def remove_server_info(directory: Path, pid: int) -> None:
    """Remove ``server.json`` if it is the one of process ``pid``."""
    path = Path(directory) / "server.json"
    try:
        if int(json.loads(path.read_text()).get("pid")) == pid:
            path.unlink()
    except (OSError, ValueError, TypeError, AttributeError):
        pass


class InstanceLock:
    """The one-server-per-user lock: an exclusive ``flock`` on ``lock``,
    released by the kernel when the server dies, however it dies."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "lock"
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning() from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def now_iso(t: Optional[float] = None) -> str:
    """ISO 8601 UTC, as the agent writes its times."""
    t = time.time() if t is None else t
    secs = int(t)
    micros = int(round((t - secs) * 1e6))
    if micros >= 1000000:
        secs, micros = secs + 1, micros - 1000000
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return text + (".%06d" % micros if micros else "") + "+00:00"
