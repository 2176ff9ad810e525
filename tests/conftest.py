"""Shared fixtures.  ``tests/`` is put on ``sys.path`` so ``from support.sshd import SSHD`` works (tests/support: what the tests share)."""

import os
import sys
import time

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from support.sshd import SSHD, require_sshd, sshd_with_home  # noqa: E402

#: Where runs on the test sshd (which logs in as this user, in this user's
#: home) are spooled, and this user's own records of runs.
HOST_RUNS = os.path.join(os.path.expanduser("~"), ".chaperone", "runs")
USER_RECORDS = os.path.join(os.path.expanduser("~"), ".chaperone", "runs.db")


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # (the controller, or a run without xdist)
        session.config._runs_before = set(os.listdir(HOST_RUNS)) if os.path.isdir(HOST_RUNS) else set()


def pytest_sessionfinish(session, exitstatus):
    """The runs the tests left on the test sshd's host (this user's
    ~/.chaperone/runs: 40 or so per session, some of 256 MiB) are removed
    once they are over: only those made during this session, and none this
    user recorded (a run of their own, started meanwhile, stays)."""
    before = getattr(session.config, "_runs_before", None)
    if before is None or not os.path.isdir(HOST_RUNS):
        return
    import json
    import shutil
    import sqlite3

    mine = set()
    if os.path.exists(USER_RECORDS):
        try:
            db = sqlite3.connect("file:%s?mode=ro" % USER_RECORDS, uri=True, timeout=5)
            try:
                mine = {row[0] for row in db.execute("SELECT id FROM runs")}
            finally:
                db.close()
        except sqlite3.Error:
            return  # (cannot tell which are the user's: keep everything)
    for name in set(os.listdir(HOST_RUNS)) - before - mine:
        path = os.path.join(HOST_RUNS, name)
        try:
            with open(os.path.join(path, "state.json")) as f:
                over = json.loads(f.read()).get("state") in ("done", "error", "lost")
            # (ended a while ago: another test session on this machine, started after this one, may
            # still be reading a run it has just made)
            over = over and os.path.getmtime(os.path.join(path, "state.json")) < time.time() - 120
        except (OSError, ValueError):
            continue  # (being made, or not a run)
        if over:
            shutil.rmtree(path, ignore_errors=True)


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
def late_noisy_host(tmp_path):
    """A host whose login script leaves a job behind that prints after the
    session's command ends (sshd waits for it: it holds the session's
    stdout).  The job waits for the command (bash execs it: ``$$``), so the
    noise comes after the agent's whole reply however slow the machine is
    (a fixed delay landed in the middle of a run's frames on a slow CI
    machine)."""
    require_sshd()
    server = sshd_with_home(tmp_path / "late-home",
                            "(while kill -0 $$ 2>/dev/null; do sleep 0.05; done; echo 'late noise') &\n")
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
