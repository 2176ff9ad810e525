"""Shared fixtures.  ``tests/`` is put on ``sys.path`` so ``from support.sshd import SSHD`` works (tests/support: what the tests share)."""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from support.sshd import SSHD, require_sshd, sshd_with_home  # noqa: E402


@pytest.fixture(scope="session")
def sshd():
    """A real OpenSSH server on 127.0.0.1, shared by the whole session.

    Skipped if sshd is not installed (a failure under CHAPERONE_REQUIRE_SSHD=1).
    ``sshd.config_file`` is an ssh_config with ``Host testhost``.
    """
    require_sshd()
    server = SSHD()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stock_sshd():
    """An sshd with OpenSSH's default MaxStartups (10:30:100): past 10
    connections that have not logged in yet, it drops new ones, as a stock
    host does."""
    require_sshd()
    server = SSHD(max_startups=None, log_level="ERROR")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def noisy_host(tmp_path):
    """A host whose login scripts print to stdout and to stderr before any
    command runs (bash reads ~/.bashrc for a command sent by sshd), with a
    home of its own (no agent there yet)."""
    require_sshd()
    server = sshd_with_home(tmp_path / "remote-home",
                            "echo 'Welcome! (login noise on stdout)'\necho 'stderr noise' >&2\n")
    try:
        yield server
    finally:
        server.stop()
