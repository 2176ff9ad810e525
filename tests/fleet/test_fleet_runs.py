"""One command on many real hosts (tests/support/fleet_hosts.py: 20 sshd on
127.0.0.2..21) through chaperone itself: ``chaperone run -H`` (the
installed entry point, head start included) and the library's
``Chaperone.run_many``/``start_many``.

* 20 hosts, one down, one with a changed host key, one whose sshd drops the
  connection mid-run: every other host's output exact (the dropped one's
  too: chaperone reconnects), each failure named in the summary, exit 255
  by the rule; the inventory's per-host env reaches the runs; then the
  group operations on the group id (status, logs prefixed by host,
  GROUP/PATTERN, wait with run -H's exit status, clean; -d, kill, wait);
* Ctrl-C (a real SIGINT to the CLI): once, every run gets SIGINT; twice,
  detached and the runs go on;
* the library: back-pressure (a consumer that holds back stops the
  starts), a host that never answers fails alone after start_timeout.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from chaperone.fleet.output import NO_NEWLINE
from support.fleet_hosts import fleet_hosts  # noqa: F401  (the fixture)

#: The CLI as a user runs it: the entry point's head start included.
CHAPERONE = [sys.executable, "-m", "chaperone"]

PAYLOAD = b"\xff\xfe\x00binary, not UTF-8\n" + b"line\n" * 3
COMMAND = ("printf '\\377\\376\\000binary, not UTF-8\\n'; printf 'line\\n%.0s' 1 2 3; echo \"role=$ROLE\"; "
           "echo started >&2; sleep 2; printf 'no newline at the end'")


@pytest.fixture(scope="module")
def ssh_config(fleet_hosts, tmp_path_factory):
    """The fleet's ssh_config with the cheap key exchange: the tests make
    some 200 connections, and OpenSSH 9.2's default (sntrup761x25519)
    costs the client ~150 ms of CPU each, curve25519 ~15 ms (see
    docs/hosts.md)."""
    path = tmp_path_factory.mktemp("fleet-config") / "ssh_config"
    with open(fleet_hosts.config_file) as f:
        text = f.read()
    path.write_text(text + "    KexAlgorithms curve25519-sha256\n")   # (in the last block: Host *)
    return str(path)


def cli(home, config, *args, timeout=60, **kw):
    env = dict(os.environ, CHAPERONE_HOME=str(home))
    env.pop("CHAPERONE_SSH_CLIENT", None)
    return subprocess.run(CHAPERONE + ["-F", config] + [str(a) for a in args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, **kw)


def popen(home, config, *args):
    env = dict(os.environ, CHAPERONE_HOME=str(home))
    env.pop("CHAPERONE_SSH_CLIENT", None)
    return subprocess.Popen(CHAPERONE + ["-F", config] + [str(a) for a in args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def by_host(data: bytes, width: int = 3):
    """Prefixed lines (``hNN: line``) as {host: [line, ...]}, in order."""
    out = {}
    for line in data.splitlines(keepends=True):
        name, sep, rest = line.partition(b":")
        assert sep and rest[:1] == b" ", line
        out.setdefault(name.decode(), []).append(rest[1 + width - len(name):])
    return out


def expected_lines(role: str):
    return [l + b"\n" for l in (PAYLOAD + b"role=" + role.encode() + b"\n").split(b"\n")[:-1]] + [
        b"no newline at the end\n", NO_NEWLINE + b"\n"]


def group_of(home):
    """The one group id recorded under ``home`` (from the records)."""
    from chaperone.records import Records

    records = Records(home / "runs.db")
    try:
        groups = {rec.group for rec in records.all()}
    finally:
        records.close()
    assert len(groups) == 1, groups
    return groups.pop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_twenty_hosts_down_rekeyed_dropped_and_the_group(fleet_hosts, ssh_config, tmp_path):
    f, c = fleet_hosts, ssh_config
    inv = tmp_path / "inventory.yaml"
    inv.write_text("groups:\n  fleet: {hosts: 'h[01-20]', env: {ROLE: worker}}\nhosts:\n  h02: {env: {ROLE: special}}\n")
    home = tmp_path / "home"
    f.down("h03")
    f.change_host_key("h05")
    dropped = threading.Event()
    try:
        proc = popen(home, c, "run", "--inventory", inv, "-H", "fleet", "--", "sh", "-c", COMMAND)
        err = bytearray()

        def read_err():
            for line in iter(proc.stderr.readline, b""):
                err.extend(line)
                if line == b"h09: started\n" and not dropped.is_set():
                    assert f.kill_sessions("h09")
                    dropped.set()

        reader = threading.Thread(target=read_err, daemon=True)
        reader.start()
        out = proc.stdout.read()
        proc.wait(timeout=120)
        reader.join(10)
    finally:
        f.restore_host_key("h05")
        f.up("h03")
    err = bytes(err)
    assert dropped.is_set(), err
    assert proc.returncode == 255, err       # the rule: a host not reached counts 255
    lines = by_host(out)
    ok = [n for n in f.names if n not in ("h03", "h05")]
    assert sorted(lines) == ok, err
    for name in ok:                          # every byte of every other host, the dropped one's too
        assert lines[name] == expected_lines("special" if name == "h02" else "worker"), (name, err)
    summary = err[err.rindex(b"HOST "):].decode()
    rows = {row.split()[0]: row for row in summary.splitlines()[1:]}
    assert "connection to h03 refused" in rows["h03"] and " failed " in rows["h03"] and " 255 " in rows["h03"]
    assert "host key" in rows["h05"].lower() and " failed " in rows["h05"] and " 255 " in rows["h05"]
    assert " done " in rows["h09"] and "reconnected" in rows["h09"], summary
    # ... and it was said when it happened, as one run says it (before: nothing until the summary)
    assert [line for line in err.splitlines() if line.startswith(b"h09: chaperone: ")
            and line.endswith(b"; reconnecting")], err
    assert rows["h[01-02,04,06-08,10-20]"].split()[1:3] == ["done", "0"], summary

    # The group: one id in every run's record.
    group = group_of(home)
    res = cli(home, c, "status", group)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(group.encode() + b"-h") == 20 and b"failed" in res.stdout
    res = cli(home, c, "logs", group, "--stdout")
    assert res.returncode == 0, res.stderr
    logs = by_host(res.stdout)
    assert sorted(logs) == ok and logs["h07"] == expected_lines("worker")
    assert b"h03: chaperone: never started" in res.stderr
    res = cli(home, c, "logs", group + "/h[01-02]")
    assert res.returncode == 0, res.stderr
    assert sorted(by_host(res.stdout)) == ["h01", "h02"]
    assert by_host(res.stderr) == {"h01": [b"started\n"], "h02": [b"started\n"]}
    res = cli(home, c, "wait", group)
    assert res.returncode == 255, res.stderr      # as run -H: h03 and h05 never started
    res = cli(home, c, "wait", group + "/!h03:!h05")
    assert res.returncode == 0, res.stderr
    res = cli(home, c, "clean", group)
    assert res.returncode == 0 and res.stdout.count(b"cleaned ") == 20, res.stderr
    assert cli(home, c, "ps", "-a", "-q").stdout == b""

    # Detached: the group id on stdout; kill and wait take it.
    res = cli(home, c, "run", "-d", "-H", "h[01-04]", "--", "sleep", "60")
    assert res.returncode == 0, res.stderr
    group = res.stdout.decode().strip()
    assert group == group_of(home)
    res = cli(home, c, "kill", group)
    assert res.returncode == 0 and res.stdout.count(b"sent SIGTERM") == 4, res.stderr
    res = cli(home, c, "wait", group)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr


@pytest.mark.timeout(120)
def test_ctrl_c_once_forwards_twice_detaches(fleet_hosts, ssh_config, tmp_path):
    c = ssh_config
    home = tmp_path / "home"
    trap = 'trap "echo got INT; exit 5" INT; echo ready; sleep 30 & wait'
    proc = popen(home, c, "run", "-H", "h[01-05]", "--", "sh", "-c", trap)
    seen = [proc.stdout.readline() for _ in range(5)]
    assert sorted(seen) == [b"h%02d: ready\n" % i for i in range(1, 6)]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err             # every host: the trap's exit 5
    assert sorted(out.splitlines()) == [b"h%02d: got INT" % i for i in range(1, 6)], err
    assert b"sending SIGINT to every run" in err

    deaf = 'trap "echo got INT" INT; echo ready; sleep 30; sleep 30'
    proc = popen(home, c, "run", "-H", "h[06-08]", "--", "sh", "-c", deaf)
    assert sorted(proc.stdout.readline() for _ in range(3)) == [b"h%02d: ready\n" % i for i in (6, 7, 8)]
    proc.send_signal(signal.SIGINT)
    for _ in range(3):
        assert proc.stdout.readline().endswith(b": got INT\n")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"h[06-08]  detached" in err and b"its runs go on" in err, err
    res = cli(home, c, "ps", "--json")
    running = [r for r in json.loads(res.stdout) if r["host"] in ("h06", "h07", "h08")]
    assert [r["state"] for r in running] == ["running"] * 3     # detached, not killed
    assert cli(home, c, "kill", "-s", "KILL", running[0]["group"]).returncode == 0


@pytest.mark.timeout(120)
def test_library_back_pressure_and_a_host_that_never_answers(fleet_hosts, ssh_config, tmp_path):
    """A consumer that holds back stops new starts once ``buffer`` results
    wait for it; a host that accepts TCP and never speaks SSH fails alone
    after start_timeout, with the reason."""
    from chaperone import Chaperone
    from chaperone.fleet.inventory import parse_inventory
    from chaperone.transports.target import Target

    f = fleet_hosts
    names = f.names[:12]
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)  # (never accepted: ssh waits for a banner that never comes)
    try:
        async def main():
            async with Chaperone(home=tmp_path / "home", ssh_config=[ssh_config], ssh_client="openssh") as ch:
                inv = parse_inventory("hosts:\n  h01: {env: {WHO: one}}\n", "inv.yaml")
                async with ch.run_many(names, 'echo "$WHO"', inventory=inv, forks=3, buffer=2) as many:
                    it = many.__aiter__()
                    first = await it.__anext__()
                    # The consumer holds back: once 2 results wait, no new run starts.
                    started, later, deadline = -1, 0, time.monotonic() + 12
                    while started != later and time.monotonic() < deadline:
                        started = later
                        await asyncio.sleep(1.5)
                        later = len(ch.group(many.group))
                    rest = [r async for r in it]
                results = {r.name: r for r in [first] + rest}
                assert sorted(results) == names and all(r.succeeded for r in results.values())
                assert results["h01"].stdout == b"one\n" and results["h02"].stdout == b"\n"
                assert started == later < len(names), (started, later)   # (without: all 12 start)

                t0 = time.monotonic()
                mute_host = Target("mute", hostname="127.0.0.1", port=mute.getsockname()[1],
                                   config=(ssh_config,))
                async with ch.start_many(["h04", mute_host], ["sleep", "1"], start_timeout=2) as many:
                    got = {r.name: r async for r in many}
                assert time.monotonic() - t0 < 8
                assert got["h04"].state == "running" and got["h04"].run.id == many.run_ids["h04"]
                assert got["mute"].state == "timeout" and got["mute"].status == 124
                assert "no answer from mute within 2 s" in got["mute"].reason
                assert (await got["h04"].run.wait()).exit_code == 0

        asyncio.run(main())
    finally:
        mute.close()


@pytest.mark.timeout(120)
def test_group_logs_timestamps_and_since(fleet_hosts, ssh_config, tmp_path):
    """`logs -t GROUP` starts each host's lines with when they were written
    (after the host's prefix), `logs --since T GROUP` shows only what each
    wrote from then on; `-f` with them too.  (Both were ignored for a
    group: every line, no time.)"""
    import datetime

    home = tmp_path / "home"
    home.mkdir()
    res = cli(home, ssh_config, "run", "-d", "-q", "-H", "h[01-03]", "--", "sh", "-c",
              "echo early; sleep 1.5; echo late")
    assert res.returncode == 0, res.stderr
    group = res.stdout.decode().strip()
    assert cli(home, ssh_config, "wait", group).returncode == 0
    stamped = cli(home, ssh_config, "logs", "-t", group)
    assert stamped.returncode == 0, stamped.stderr
    lines = stamped.stdout.decode().splitlines()
    assert len(lines) == 6, lines
    times = {}
    for line in lines:
        host, stamp, text = line.split(" ", 2)
        when = datetime.datetime.strptime(stamp[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        times.setdefault(host, {})[text] = when
    assert sorted(times) == ["h01:", "h02:", "h03:"]
    for host, seen in times.items():
        assert 1.2 < seen["late"] - seen["early"] < 5, (host, seen)
    cut = max(seen["early"] for seen in times.values()) + 0.5
    since = cli(home, ssh_config, "logs", "--since", "%.3f" % cut, group)
    assert since.returncode == 0, since.stderr
    assert since.stdout.decode().splitlines() == ["h01: late", "h02: late", "h03: late"]
    follow = cli(home, ssh_config, "logs", "-f", "--since", "%.3f" % cut, group)
    assert follow.stdout == since.stdout
    tail = cli(home, ssh_config, "logs", "--tail", "1", "-t", group)
    assert [line.split(" ", 2)[::2] for line in tail.stdout.decode().splitlines()] == [
        ["h01:", "late"], ["h02:", "late"], ["h03:", "late"]]


@pytest.mark.timeout(120)
def test_run_many_hosts_stdin_of_any_size_as_it_comes(fleet_hosts, ssh_config, tmp_path):
    """`producer | chaperone run -H` gives every host the same bytes, as
    they come (a host answers the first line before the rest is written),
    of any size (20 MiB that are not text: it was refused over 12 MiB);
    `run -d --stdin - -H` returns once every host holds all of it."""
    import hashlib

    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, CHAPERONE_HOME=str(home))
    env.pop("CHAPERONE_SSH_CLIENT", None)
    p = subprocess.Popen(CHAPERONE + ["-F", ssh_config, "run", "-H", "h[01-02]", "--", "sh", "-c",
                                      "head -n 1; sha256sum"],
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(b"first\n")
        p.stdin.flush()
        got = b""
        while got.count(b"first\n") < 2:  # (both hosts answer before the rest is written)
            chunk = os.read(p.stdout.fileno(), 65536)
            assert chunk, (got, p.stderr.read())
            got += chunk
        rest = bytes(range(256)) * (20 * 4096)  # 20 MiB
        p.stdin.write(rest)
        p.stdin.close()
        got += p.stdout.read()
        assert p.wait(90) == 0, p.stderr.read()
    finally:
        p.kill()
        p.wait()
    digest = hashlib.sha256(rest).hexdigest().encode()
    lines = by_host(got)
    assert lines["h01"] == lines["h02"] == [b"first\n", digest + b"  -\n"], lines
    data = tmp_path / "in.bin"
    data.write_bytes(rest)
    with open(data, "rb") as f:
        res = subprocess.run(CHAPERONE + ["-F", ssh_config, "run", "-d", "-q", "--stdin", "-", "-H", "h[01-02]",
                                          "--", "sh", "-c", "sha256sum"],
                             env=env, stdin=f, capture_output=True, timeout=90)
    assert res.returncode == 0, res.stderr
    group = res.stdout.decode().strip()
    assert cli(home, ssh_config, "wait", group).returncode == 0
    assert by_host(cli(home, ssh_config, "logs", group).stdout) == {h: [digest + b"  -\n"] for h in ("h01", "h02")}


def test_a_host_never_reached_contributes_255_as_the_cli_says(tmp_path):
    """run_many: a host whose start never happened (an unknown name) has
    state ``failed`` and exit_status 255, as the CLI's summary and JSON
    say (before: None in the library, 255 in the CLI)."""
    from chaperone import Chaperone

    async def main():
        async with Chaperone(home=tmp_path / "home") as ch:
            async with ch.run_many(["local", "nosuch.invalid"], ["true"]) as many:
                return {r.name: r async for r in many}

    got = asyncio.run(main())
    assert (got["local"].state, got["local"].exit_status) == ("done", 0)
    assert (got["nosuch.invalid"].state, got["nosuch.invalid"].exit_status) == ("failed", 255), got


@pytest.mark.timeout(90)
def test_one_host_name_at_several_ports_is_several_hosts(sshd, tmp_path):
    """pssh's habit, one host at several ports (containers on localhost):
    a host file's ``127.0.0.1:PORT`` lines are each a host, named as
    written (before: the first line only ran, in silence), and ``-H
    127.0.0.1:PORT`` is one host at that port (before: hosts
    ``127.0.0.1`` and ``PORT``)."""
    from support.sshd import free_port

    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host 127.0.0.1\n    User %s\n    IdentityFile %s\n    IdentitiesOnly yes\n"
                   "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    BatchMode yes\n"
                   "    LogLevel ERROR\n" % (sshd.user, sshd.identity_file))
    dead = free_port()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1:%d\n127.0.0.1:%d\n" % (sshd.port, dead))
    home = tmp_path / "home"
    home.mkdir()
    res = cli(home, str(cfg), "run", "--hostfile", hosts, "--", "echo", "hi")
    out, err = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 255, err  # (one host refused)
    assert "127.0.0.1:%d: hi" % sshd.port in out.replace("  ", " "), out
    assert "127.0.0.1:%d" % dead in err and "refused" in err, err
    res = cli(home, str(cfg), "run", "-H", "127.0.0.1:%d" % sshd.port, "--", "echo", "hi")
    assert (res.returncode, res.stdout.split()[-1:]) == (0, [b"hi"]), res.stderr
    assert b"2222" not in res.stderr and str(sshd.port).encode() in res.stdout + res.stderr, (res.stdout, res.stderr)
