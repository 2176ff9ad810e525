"""The network-namespace test host: a host in a network namespace of its
own, reached over a veth pair, whose link a test takes down
(tests/faults/test_netns.py, tests/serve/test_serve_restart.py).  Needs
root and OpenSSH: skipped otherwise (a failure under
``CHAPERONE_REQUIRE_SSHD=1`` as root)."""

import contextlib
import os
import secrets
import shutil
import socket
import subprocess

import pytest

from support.sshd import REQUIRE_ENV, REQUIRE_SSHD, SSHD, require_sshd

# Each test host claims a /30 of 10.231.0.0/16 (10.231.N.0/30 for N in
# OCTETS) by adding its guard route, which fails if another holds it: test
# processes running at once (pytest-xdist) each get their own.
OCTETS = range(77, 127)
PREFIX = 30
GUARD_METRIC = "4242"
ALIAS = "nshost"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, check=check)


def _cannot(reason):
    """Skip, or fail when CHAPERONE_REQUIRE_SSHD=1 (we are root by then)."""
    if REQUIRE_SSHD:
        pytest.fail("%s, and %s=1 requires it" % (reason, REQUIRE_ENV), pytrace=False)
    pytest.skip("%s (set %s=1 as root to make this a failure)" % (reason, REQUIRE_ENV))


class NetnsHost:
    """A network namespace with sshd in it, reached over a veth pair."""

    def __init__(self):
        tag = secrets.token_hex(4)
        self.ns = "chtest-" + tag
        self.veth = "chth" + tag  # root-namespace side (<= 15 characters)
        self.peer = "chtn" + tag  # inside the namespace
        self.sshd = None
        self.made_ns = False
        self.guard = False

    # -- life cycle ----------------------------------------------------------

    def setup(self):
        if shutil.which("ip") is None:
            _cannot("iproute2 (`ip`) is not installed")
        # While the veth is down its connected route is gone: without this
        # guard, traffic for the test host would follow the default route
        # out of the machine.  Unreachable instead: it fails here, at once.
        # (Adding it claims the subnet: it fails when the subnet is taken.)
        in_use = _ip("-4", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
        for n in OCTETS:
            if "10.231.%d." % n in in_use:
                continue
            self.subnet = "10.231.%d.0/%d" % (n, PREFIX)
            if _ip("route", "add", "unreachable", self.subnet, "metric", GUARD_METRIC, check=False).returncode == 0:
                self.host_addr, self.ns_addr = "10.231.%d.1" % n, "10.231.%d.2" % n
                self.guard = True
                break
        else:
            _cannot("no /30 of 10.231.77.0-10.231.126.0 is free on this machine")
        res = _ip("netns", "add", self.ns, check=False)
        if res.returncode != 0:
            _cannot("cannot create a network namespace: %s" % res.stderr.strip())
        self.made_ns = True
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.peer, "netns", self.ns)
        _ip("addr", "add", "%s/%d" % (self.host_addr, PREFIX), "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.ns, "addr", "add", "%s/%d" % (self.ns_addr, PREFIX), "dev", self.peer)
        _ip("-n", self.ns, "link", "set", self.peer, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")  # the callback tunnel listens there
        self.sshd = SSHD(listen_address=self.ns_addr, netns=self.ns, host_alias=ALIAS)
        self.sshd.start()
        return self

    def teardown(self):
        try:
            if self.sshd is not None:
                self.sshd.stop()
        finally:
            if self.made_ns:
                _ip("netns", "del", self.ns, check=False)
                _ip("link", "del", self.veth, check=False)  # gone with the namespace, normally
            if self.guard:
                _ip("route", "del", "unreachable", self.subnet, "metric", GUARD_METRIC, check=False)

    # -- helpers -------------------------------------------------------------

    @property
    def config_file(self):
        return self.sshd.config_file

    def link(self, up: bool):
        _ip("link", "set", self.veth, "up" if up else "down")
        if not up:
            # Nothing for the test host may leave the machine meanwhile.
            route = _ip("route", "get", self.ns_addr, check=False)
            assert route.returncode != 0, "during the outage %s is routed: %s" % (self.ns_addr, route.stdout)

    @contextlib.contextmanager
    def outage(self):
        """The link is down inside the block, and up again after it, whatever happens."""
        try:
            self.link(False)
            yield
        finally:
            self.link(True)

    def reachable(self, timeout=1.0) -> bool:
        try:
            with socket.create_connection((self.ns_addr, self.sshd.port), timeout=timeout) as s:
                s.settimeout(timeout)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def size_inside(self, path) -> int:
        """A file's size, read from inside the namespace (the same filesystem)."""
        res = subprocess.run(["ip", "netns", "exec", self.ns, "stat", "-c", "%s", str(path)],
                             capture_output=True, text=True, timeout=10)
        return int(res.stdout) if res.returncode == 0 else 0


@pytest.fixture(scope="module")
def nshost():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    require_sshd()
    host = NetnsHost()
    try:
        host.setup()
        assert host.reachable(), "sshd in %s is not reachable:\n%s" % (host.ns, host.sshd.log_tail())
        yield host
    finally:
        host.teardown()
