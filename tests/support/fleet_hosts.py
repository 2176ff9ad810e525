"""Many real hosts for the tests: N OpenSSH servers on this machine, one per
loopback address 127.0.0.2 .. 127.0.0.(N+1), each with its own host key and
its own HOME (so spools and agents are apart as on separate machines).

    with FleetHosts(20) as fleet:
        subprocess.run(["ssh", "-F", fleet.config_file, "h07", "uname"])
        fleet.down("h03")               # connection refused from now on
        fleet.change_host_key("h05")    # ssh refuses it: REMOTE HOST IDENTIFICATION HAS CHANGED
        fleet.drop_connections("h09", after=0.5)  # its sessions die mid-run

One ``ssh_config`` (``Host h01`` .. ``hNN`` with HostName, Port, User, one
shared IdentityFile, StrictHostKeyChecking yes, BatchMode yes) and one
``known_hosts`` serve them all; ``fleet.hosts_file`` lists the names, one a
line.  Servers start in parallel (one user key for all, generated once).
Bounded: at most :data:`MAX_HOSTS` (50) hosts.  ``start_seconds`` says how
long the start took.

Uses tests/support/sshd.py's :class:`SSHD` (``listen_address=127.0.0.K``); every
address of 127.0.0.0/8 answers on Linux's ``lo`` without configuration, so
nothing on the machine changes.  The pytest fixture ``fleet_hosts`` (in
fleet_hosts.py itself; ``from fleet_hosts import fleet_hosts`` in a test module) is a
module-scoped fleet of 20.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

from support.sshd import SSHD, _quote_config, sshd_unavailable_reason

#: The most hosts one fleet may have.
MAX_HOSTS = 50


def loopback_reason(address: str) -> Optional[str]:
    """Why ``address`` cannot be listened on here, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
    except OSError as e:
        return "cannot listen on %s: %s" % (address, e.strerror or e)
    return None


class _HostSSHD(SSHD):
    """One host of the fleet: the shared user key instead of its own, and
    a HOME of its own for its sessions."""

    def __init__(self, shared_identity: str, **kw) -> None:
        super().__init__(log_level="ERROR", **kw)
        self.shared_identity = shared_identity
        self.home: Optional[str] = None

    def _keygen(self, name: str) -> str:
        if name == "id_ed25519":
            return self.shared_identity
        return super()._keygen(name)

    def _write_configs(self, authorized_keys: str) -> None:
        super()._write_configs(authorized_keys)
        self.home = os.path.join(self.tmpdir, "home")
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        with open(self.sshd_config, "a") as f:
            f.write("SetEnv HOME=%s\n" % self.home)


class FleetHosts:
    """N real sshd, one per 127.0.0.K (see the module docstring)."""

    def __init__(self, n: int = 20, *, first_octet: int = 2, prefix: str = "h") -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError("a fleet has 1 to %d hosts, not %d" % (MAX_HOSTS, n))
        if first_octet < 2 or first_octet + n - 1 > 254:
            raise ValueError("addresses 127.0.0.%d.. do not fit" % first_octet)
        self.n = n
        width = max(2, len(str(n)))
        self.names: List[str] = ["%s%0*d" % (prefix, width, i + 1) for i in range(n)]
        self.addresses: Dict[str, str] = {name: "127.0.0.%d" % (first_octet + i)
                                          for i, name in enumerate(self.names)}
        self.servers: Dict[str, _HostSSHD] = {}
        self.tmpdir: Optional[str] = None
        self.config_file: Optional[str] = None
        self.known_hosts: Optional[str] = None
        self.hosts_file: Optional[str] = None
        self.identity_file: Optional[str] = None
        self.start_seconds: Optional[float] = None
        self._saved_keys: Dict[str, bytes] = {}
        self._timers: List[threading.Timer] = []

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> "FleetHosts":
        reason = sshd_unavailable_reason() or loopback_reason(self.addresses[self.names[-1]])
        if reason:
            raise RuntimeError(reason)
        t0 = time.monotonic()
        self.tmpdir = tempfile.mkdtemp(prefix="chaperone-fleet-")
        os.chmod(self.tmpdir, 0o755)
        self.identity_file = os.path.join(self.tmpdir, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chaperone-fleet",
                        "-f", self.identity_file], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for name in self.names:
            self.servers[name] = _HostSSHD(self.identity_file, listen_address=self.addresses[name], host_alias=name)
        try:
            with ThreadPoolExecutor(max_workers=min(16, self.n)) as pool:
                list(pool.map(lambda s: s.start(timeout), self.servers.values()))
        except BaseException:
            self.stop()
            raise
        self._write_client_files()
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        servers = list(self.servers.values())
        if servers:
            with ThreadPoolExecutor(max_workers=min(16, len(servers))) as pool:
                list(pool.map(lambda s: s.stop(), servers))
        self.servers.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self) -> "FleetHosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_client_files(self) -> None:
        q = _quote_config
        self.config_file = os.path.join(self.tmpdir, "ssh_config")
        self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
        self.hosts_file = os.path.join(self.tmpdir, "hosts")
        user = next(iter(self.servers.values())).user
        with open(self.known_hosts, "w") as kh, open(self.config_file, "w") as cfg:
            for name in self.names:
                s = self.servers[name]
                with open(s.host_key + ".pub") as f:
                    keytype, key = f.read().split()[:2]
                kh.write("[%s]:%d %s %s\n" % (s.listen_address, s.port, keytype, key))
                cfg.write("Host %s\n    HostName %s\n    Port %d\n" % (name, s.listen_address, s.port))
            cfg.write(
                "Host *\n"
                "    User %s\n"
                "    IdentityFile %s\n"
                "    IdentitiesOnly yes\n"
                "    UserKnownHostsFile %s\n"
                "    GlobalKnownHostsFile /dev/null\n"
                "    StrictHostKeyChecking yes\n"
                "    UpdateHostKeys no\n"
                "    BatchMode yes\n"
                "    ConnectTimeout 10\n"
                "    LogLevel ERROR\n" % (user, q(self.identity_file), q(self.known_hosts)))
        with open(self.hosts_file, "w") as f:
            f.write("".join(n + "\n" for n in self.names))

    # -- helpers for tests ---------------------------------------------------------------

    def ssh_argv(self, name: str, *remote_args: str) -> List[str]:
        return ["ssh", "-F", self.config_file, name, *remote_args]

    def server(self, name: str) -> SSHD:
        return self.servers[name]

    def down(self, name: str) -> None:
        """Stop the host's sshd (and its sessions): connection refused."""
        self.servers[name].stop(remove=False)

    def up(self, name: str, timeout: float = 15.0) -> None:
        """Start a stopped host again, on its address, port and host key."""
        s = self.servers[name]
        if s.proc is not None and s.proc.poll() is None:
            return
        log = open(s.log_file, "ab")
        try:
            s.proc = subprocess.Popen([s.sshd_path, "-D", "-e", "-f", s.sshd_config], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        if not s._wait_ready(timeout):
            raise RuntimeError("sshd of %s did not start again:\n%s" % (name, s.log_tail()))

    def change_host_key(self, name: str, timeout: float = 15.0) -> None:
        """Give the host a new host key (sshd re-reads it on SIGHUP); the
        shared known_hosts keeps the old one, so ssh refuses the host."""
        s = self.servers[name]
        with open(s.host_key, "rb") as f:
            self._saved_keys.setdefault(name, f.read())
        tmp = os.path.join(s.tmpdir, "new_host_key")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.replace(tmp, s.host_key)
        os.replace(tmp + ".pub", s.host_key + ".pub")
        self._reload(s, timeout)

    def restore_host_key(self, name: str, timeout: float = 15.0) -> None:
        """Undo :meth:`change_host_key`."""
        s = self.servers[name]
        key = self._saved_keys.pop(name, None)
        if key is None:
            return
        with open(s.host_key, "wb") as f:
            f.write(key)
        subprocess.run(["ssh-keygen", "-y", "-f", s.host_key], check=True, stdin=subprocess.DEVNULL,
                       stdout=open(s.host_key + ".pub", "wb"))
        self._reload(s, timeout)

    def _reload(self, s: SSHD, timeout: float) -> None:
        # sshd -D re-executes itself on SIGHUP (same pid, new keys); wait
        # until the new listener answers with the new key.
        want = open(s.host_key + ".pub").read().split()[1]
        os.kill(s.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run(["ssh-keyscan", "-T", "2", "-t", "ed25519", "-p", str(s.port), s.listen_address],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if want in res.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError("sshd of %s did not come back with its new key:\n%s" % (s.host_alias, s.log_tail()))

    def kill_sessions(self, name: str) -> List[int]:
        """Kill the host's per-connection sshd processes now (the clients'
        connections drop); returns their pids."""
        return self.servers[name].kill_sessions(signal.SIGKILL)

    def drop_connections(self, name: str, after: float) -> threading.Timer:
        """Kill the host's sessions ``after`` seconds from now (mid-run)."""
        t = threading.Timer(after, self.kill_sessions, args=(name,))
        t.daemon = True
        self._timers.append(t)
        t.start()
        return t


def _fixture():
    try:
        import pytest
    except ImportError:  # (benchmarks/fleet.py uses FleetHosts without pytest)
        return None

    from support.sshd import require_sshd

    @pytest.fixture(scope="module")
    def fleet_hosts():
        """A module's fleet of 20 real hosts (h01..h20 on 127.0.0.2..21).
        Use it with ``from fleet_hosts import fleet_hosts`` in a test module.
        Tests that break a host (down, change_host_key) put it back."""
        require_sshd()
        reason = loopback_reason("127.0.0.21")
        if reason:
            pytest.skip(reason)
        fleet = FleetHosts(20).start()
        try:
            yield fleet
        finally:
            fleet.stop()

    return fleet_hosts


fleet_hosts = _fixture()
