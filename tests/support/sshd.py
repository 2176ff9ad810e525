"""A real, throw-away OpenSSH server for the tests.

:class:`SSHD` starts ``sshd -D -e -f CONFIG`` on a free port of 127.0.0.1,
with everything (host key, user key, ``authorized_keys``, ``sshd_config``,
pid file, log) in a temporary directory.  Nothing on the machine is changed,
except that, as root, sshd needs its privilege separation directory
``/run/sshd``, created (mode 0755) if missing.

It also writes, for clients:

* ``known_hosts``: the host key for ``[127.0.0.1]:PORT``;
* ``ssh_config``: ``Host testhost`` with HostName, Port, User, IdentityFile,
  IdentitiesOnly, UserKnownHostsFile, StrictHostKeyChecking yes, BatchMode
  yes, LogLevel ERROR, so that ``ssh -F ssh_config testhost CMD`` and a
  library reading that file use the same settings.

``SSHD(listen_address=ADDR, netns=NS, host_alias=ALIAS)`` runs it as
``ip netns exec NS sshd ...`` listening on ADDR (an address inside that
network namespace, reachable from here), with ``HostName ADDR`` in the
ssh_config and the known_hosts entry for ``[ADDR]:PORT``.  The defaults
(127.0.0.1, no namespace, ``testhost``) are the behaviour described above.

If sshd is not installed, tests needing it are skipped (see
:func:`require_sshd`), unless ``CHAPERONE_REQUIRE_SSHD=1`` is set in the
environment (CI sets it): then it is a failure.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import List, Optional

#: ``CHAPERONE_REQUIRE_SSHD=1``: a missing sshd fails the tests instead of
#: skipping them.
REQUIRE_ENV = "CHAPERONE_REQUIRE_SSHD"
REQUIRE_SSHD = os.environ.get(REQUIRE_ENV) == "1"

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")


def find_sshd() -> Optional[str]:
    """The absolute path of sshd (it must be run by absolute path), or None."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    for d in _SBIN_DIRS:
        path = os.path.join(d, "sshd")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def sshd_unavailable_reason() -> Optional[str]:
    """Why a real sshd cannot be used here, or None if it can."""
    if find_sshd() is None:
        return "OpenSSH server (sshd) is not installed"
    for prog in ("ssh", "ssh-keygen"):
        if shutil.which(prog) is None:
            return f"OpenSSH client program {prog!r} is not installed"
    return None


def sshd_available() -> bool:
    """True if sshd, ssh and ssh-keygen are installed."""
    return sshd_unavailable_reason() is None


def require_sshd() -> None:
    """In a test or fixture: skip (or fail, under CHAPERONE_REQUIRE_SSHD=1)
    when sshd is not available."""
    import pytest

    reason = sshd_unavailable_reason()
    if reason is None:
        return
    if REQUIRE_SSHD:
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(f"{reason} (set {REQUIRE_ENV}=1 to make this a failure)")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quote_config(value: str) -> str:
    """Quote a value for ssh_config / sshd_config (both accept "...")."""
    if '"' in value or "\n" in value:
        raise ValueError(f"cannot put {value!r} in an ssh config file")
    return f'"{value}"'


def _children(pid: int) -> List[int]:
    """Direct children of ``pid``, read from /proc (psutil if available)."""
    try:
        import psutil

        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=False)]
        except psutil.NoSuchProcess:
            return []
    except ImportError:
        pass
    result = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            result.append(int(entry))
    return result


class SSHD:
    """A real sshd on 127.0.0.1 (or ``listen_address``, in ``netns``); see
    the module docstring.

    Use ``with SSHD() as server:`` or ``start()`` / ``stop()``.
    """

    host_alias = "testhost"

    def __init__(self, max_sessions: int = 10, log_level: str = "INFO", *,
                 listen_address: str = "127.0.0.1", netns: Optional[str] = None,
                 host_alias: Optional[str] = None, max_startups: Optional[str] = "100:30:200",
                 extra_config: str = "") -> None:
        self.max_sessions = max_sessions
        #: More sshd_config lines (say ``SetEnv PATH=...``), appended as they are.
        self.extra_config = extra_config
        #: sshd's MaxStartups; None: sshd's own default (10:30:100, as on a stock host).
        self.max_startups = max_startups
        self.log_level = log_level
        #: The address sshd listens on (and clients connect to).
        self.listen_address = listen_address
        #: A network namespace to run sshd in (``ip netns exec NS``), or None.
        self.netns = netns
        if host_alias is not None:
            self.host_alias = host_alias
        self.port: Optional[int] = None
        self.tmpdir: Optional[str] = None
        self.config_file: Optional[str] = None  # the client ssh_config
        self.known_hosts: Optional[str] = None
        self.identity_file: Optional[str] = None
        self.host_key: Optional[str] = None
        self.sshd_config: Optional[str] = None
        self.log_file: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.sshd_path: Optional[str] = None

    # -- life cycle ---------------------------------------------------------

    def start(self, timeout: float = 15.0) -> "SSHD":
        reason = sshd_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.sshd_path = find_sshd()
        self.tmpdir = tempfile.mkdtemp(prefix="chaperone-sshd-")
        os.chmod(self.tmpdir, 0o755)
        if os.getuid() == 0 and not os.path.isdir("/run/sshd"):
            # Privilege separation directory, required when run as root.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            os.chmod("/run/sshd", 0o755)
        self.host_key = self._keygen("ssh_host_ed25519_key")
        self.identity_file = self._keygen("id_ed25519")
        authorized_keys = os.path.join(self.tmpdir, "authorized_keys")
        shutil.copyfile(self.identity_file + ".pub", authorized_keys)
        os.chmod(authorized_keys, 0o600)
        self.log_file = os.path.join(self.tmpdir, "sshd.log")
        self.sshd_config = os.path.join(self.tmpdir, "sshd_config")
        self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
        self.config_file = os.path.join(self.tmpdir, "ssh_config")

        last_error = ""
        for _attempt in range(5):  # the free port may be taken meanwhile
            self.port = free_port()
            self._write_configs(authorized_keys)
            self._check_config()
            log = open(self.log_file, "ab")
            try:
                self.proc = subprocess.Popen(
                    self._netns_prefix() + [self.sshd_path, "-D", "-e", "-f", self.sshd_config],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            finally:
                log.close()
            if self._wait_ready(timeout):
                return self
            last_error = self.log_tail()
            self._stop_proc()
        raise RuntimeError(f"sshd did not start; its log:\n{last_error}")

    def restart(self, timeout: float = 15.0) -> "SSHD":
        """Start sshd again after ``stop(remove=False)``: the same port,
        host key, user key and configs (a host coming back)."""
        log = open(self.log_file, "ab")
        try:
            self.proc = subprocess.Popen(
                self._netns_prefix() + [self.sshd_path, "-D", "-e", "-f", self.sshd_config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        if not self._wait_ready(timeout):
            raise RuntimeError("sshd did not start again; its log:\n%s" % self.log_tail())
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop sshd and its sessions; remove the temp dir unless ``remove=False``."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.kill_sessions(signal.SIGKILL)
            self._stop_proc()
        if remove and self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> "SSHD":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------

    def ssh_argv(self, *remote_args: str) -> List[str]:
        """``["ssh", "-F", config, "testhost", *remote_args]``."""
        return ["ssh", "-F", self.config_file, self.host_alias, *remote_args]

    def session_pids(self) -> List[int]:
        """Pids of the per-connection sshd processes (children of the listener)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return sorted(_children(self.proc.pid))

    def kill_sessions(self, sig: int = signal.SIGKILL) -> List[int]:
        """Send ``sig`` to every per-connection sshd process; return their pids."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def log_tail(self, n: int = 40) -> str:
        """The last lines of sshd's log (``-e``: it logs to stderr)."""
        try:
            with open(self.log_file, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, TypeError):
            return ""

    # -- internals ----------------------------------------------------------

    def _netns_prefix(self) -> List[str]:
        # `ip netns exec` execs the command (same pid), so self.proc is sshd.
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _keygen(self, name: str) -> str:
        path = os.path.join(self.tmpdir, name)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"chaperone-test-{name}",
             "-f", path],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        return path

    def _write_configs(self, authorized_keys: str) -> None:
        q = _quote_config
        with open(self.sshd_config, "w") as f:
            f.write(
                f"ListenAddress {self.listen_address}\n"
                f"Port {self.port}\n"
                f"HostKey {q(self.host_key)}\n"
                f"AuthorizedKeysFile {q(authorized_keys)}\n"
                f"PidFile {q(os.path.join(self.tmpdir, 'sshd.pid'))}\n"
                f"PasswordAuthentication no\n"
                f"KbdInteractiveAuthentication no\n"
                f"PubkeyAuthentication yes\n"
                f"PermitRootLogin prohibit-password\n"
                f"StrictModes no\n"
                f"UsePAM no\n"
                f"UseDNS no\n"
                f"MaxSessions {self.max_sessions}\n"
                + (f"MaxStartups {self.max_startups}\n" if self.max_startups else "") +
                f"PrintMotd no\n"
                f"PrintLastLog no\n"
                f"X11Forwarding no\n"
                f"LogLevel {self.log_level}\n"
                f"Subsystem sftp internal-sftp\n"
                + self.extra_config
            )
        with open(self.host_key + ".pub") as f:
            keytype, key = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write(f"[{self.listen_address}]:{self.port} {keytype} {key}\n")
        with open(self.config_file, "w") as f:
            f.write(
                f"Host {self.host_alias}\n"
                f"    HostName {self.listen_address}\n"
                f"    Port {self.port}\n"
                f"    User {self.user}\n"
                f"    IdentityFile {q(self.identity_file)}\n"
                f"    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {q(self.known_hosts)}\n"
                f"    GlobalKnownHostsFile /dev/null\n"
                f"    StrictHostKeyChecking yes\n"
                f"    UpdateHostKeys no\n"
                f"    BatchMode yes\n"
                f"    LogLevel ERROR\n"
            )

    def _check_config(self) -> None:
        res = subprocess.run(
            [self.sshd_path, "-t", "-f", self.sshd_config],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(f"sshd -t rejected {self.sshd_config}:\n{res.stderr}")

    def _wait_ready(self, timeout: float) -> bool:
        """Wait until sshd answers with its SSH banner."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.listen_address, self.port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def sshd_with_home(home, bashrc: Optional[str] = None) -> SSHD:
    """A started SSHD whose sessions get ``HOME=home`` (made; its
    ``.bashrc``, which bash reads for every command sshd runs, is
    ``bashrc`` when given).  The caller stops it."""
    os.makedirs(str(home), exist_ok=True)
    if bashrc is not None:
        with open(os.path.join(str(home), ".bashrc"), "w") as f:
            f.write(bashrc)
    server = SSHD(extra_config="SetEnv HOME=%s\n" % home)
    server.start()
    return server
