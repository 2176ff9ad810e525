"""`chaperone serve` as a real process, for the serve tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.helpers import cli_env, wait_for  # noqa: F401 (the tests import it from here)

from chaperone.serve.client import ServeClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``chaperone [-F CONFIG] serve --port PORT --heartbeat H`` with its own
    ``CHAPERONE_HOME``; :meth:`kill` and :meth:`start` again keep the port,
    the home and the token (a restart)."""

    def __init__(self, home, heartbeat=1.0, ssh_config=None, port=None):
        self.home = Path(home)
        self.heartbeat = heartbeat
        self.ssh_config = ssh_config
        self.port = port or free_port()
        self.proc = None
        self.token = None
        self.url = "http://127.0.0.1:%d/" % self.port

    def argv(self, *extra):
        argv = [sys.executable, "-m", "chaperone"]
        if self.ssh_config:
            argv += ["-F", str(self.ssh_config)]
        return argv + ["serve", "--port", str(self.port), "--heartbeat", str(self.heartbeat), *extra]

    def start(self, timeout=30.0):
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.home / ("serve-%d.log" % time.monotonic_ns()), "wb")
        self.proc = subprocess.Popen(self.argv(), env=cli_env(self.home), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        assert "serving" in line, "serve did not start: %r %s" % (line, self.log_text())
        sign_in = self.proc.stdout.readline().decode().strip()
        assert "?token=" in sign_in, sign_in
        self.sign_in_url = sign_in
        self.token = sign_in.split("?token=", 1)[1]
        return self

    def log_text(self):
        try:
            self.log.flush()
            return Path(self.log.name).read_text(errors="replace")
        except Exception:
            return ""

    @property
    def client(self) -> ServeClient:
        return ServeClient(self.url, self.token)

    def wait_attached(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.server()["attached"]:
                return
            time.sleep(0.05)
        raise AssertionError("the server did not re-attach its runs in %s s" % timeout)

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def stop(self):
        self.kill(signal.SIGTERM)


def raw(port, method, path, headers=None, body=None):
    """One HTTP request with exactly these headers (no Host added unless
    given); (status, headers, json-or-bytes)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(data)
    except ValueError:
        pass
    return resp.status, dict(resp.getheaders()), data


def kill_runs(home):
    """SIGKILL every process left by runs spooled under ``home``."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(home) in cmd and p.pid != os.getpid():
            try:
                p.kill()
            except psutil.Error:
                pass
