"""The many-host fixture (tests/support/fleet_hosts.py): 20 real sshd on
127.0.0.2..21, and the fleet code run over them with plain ssh: 20 hosts
with one down, one with a changed host key and one whose connection drops
mid-run; every other host's output exact, each failure named, the exit
status as documented."""

import asyncio
import io
import os
import subprocess
import threading

import pytest

from chaperone.fleet.fanout import Fanout, HostFailure
from chaperone.fleet.inventory import load_inventory, select_hosts
from chaperone.fleet.output import HostOutcome, exit_status, gather, outcome_from_result, summary_table
from support.fleet_hosts import MAX_HOSTS, FleetHosts, fleet_hosts  # noqa: F401  (the fixture)


def ssh(fleet, name, *cmd, timeout=30):
    return subprocess.run(fleet.ssh_argv(name, *cmd), stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)


def test_files_and_bounds(fleet_hosts):
    f = fleet_hosts
    assert f.names == ["h%02d" % i for i in range(1, 21)]
    assert f.start_seconds is not None
    print("fleet of 20 started in %.2f s" % f.start_seconds)
    keys = open(f.known_hosts).read().splitlines()
    assert len(keys) == 20 and len({k.split()[2] for k in keys}) == 20      # a host key each
    assert [k.split()[0] for k in keys][:2] == ["[127.0.0.2]:%d" % f.server("h01").port,
                                                 "[127.0.0.3]:%d" % f.server("h02").port]
    cfg = open(f.config_file).read()
    assert "Host h20\n    HostName 127.0.0.21\n" in cfg and "StrictHostKeyChecking yes" in cfg
    assert open(f.hosts_file).read().split() == f.names
    with pytest.raises(ValueError):
        FleetHosts(MAX_HOSTS + 1)


def test_each_host_has_its_address_and_home(fleet_hosts):
    res = ssh(fleet_hosts, "h07", 'echo "$HOME"; echo "$SSH_CONNECTION"')
    assert res.returncode == 0, res.stderr
    home, conn = res.stdout.decode().splitlines()
    assert home == fleet_hosts.server("h07").home
    assert conn.split()[2:] == ["127.0.0.8", str(fleet_hosts.server("h07").port)]


def test_down_and_up(fleet_hosts):
    fleet_hosts.down("h03")
    try:
        res = ssh(fleet_hosts, "h03", "true")
        assert res.returncode == 255 and b"Connection refused" in res.stderr
    finally:
        fleet_hosts.up("h03")
    assert ssh(fleet_hosts, "h03", "true").returncode == 0


def test_changed_host_key(fleet_hosts):
    fleet_hosts.change_host_key("h05")
    try:
        res = ssh(fleet_hosts, "h05", "echo", "never")
        assert res.returncode == 255 and res.stdout == b""
        assert b"Host key verification failed" in res.stderr
    finally:
        fleet_hosts.restore_host_key("h05")
    assert ssh(fleet_hosts, "h05", "true").returncode == 0


def test_connection_dropped_mid_run(fleet_hosts):
    proc = subprocess.Popen(fleet_hosts.ssh_argv("h09", "echo start; sleep 20; echo end"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"start\n"
        assert fleet_hosts.kill_sessions("h09")
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 255 and out == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


PAYLOAD = b"\xff\xfe\x00binary, not UTF-8\n" + b"line\n" * 3 + b"no newline at the end"
COMMAND = "printf '\\377\\376\\000binary, not UTF-8\\n'; printf 'line\\n%.0s' 1 2 3; echo started >&2; " \
          "sleep 1; printf 'no newline at the end'"


def test_twenty_hosts_with_three_failures(fleet_hosts, tmp_path):
    """The issue's test: every other host's output exact, each failure named
    in the summary, the exit status per the documented rule (255: a host was
    not reached)."""
    f = fleet_hosts
    inv_file = tmp_path / "inventory.yaml"
    inv_file.write_text("groups:\n  fleet: {hosts: 'h[01-20]'}\n")
    hosts = select_hosts(["fleet"], inventory=load_inventory([str(inv_file)]))
    assert [h.name for h in hosts] == f.names
    f.down("h03")
    f.change_host_key("h05")
    dropped = threading.Event()

    async def task(host):
        proc = await asyncio.create_subprocess_exec(*f.ssh_argv(host.name, COMMAND), stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = await proc.stderr.readline()               # "started": the command runs
        if host.name == "h09" and err == b"started\n":
            await asyncio.get_running_loop().run_in_executor(None, f.kill_sessions, "h09")
            dropped.set()
        out, rest = await proc.communicate()
        err += rest
        if proc.returncode == 255:
            raise HostFailure((err.decode(errors="replace").strip().splitlines() or ["ssh failed"])[-1], 255)
        return HostOutcome(host.name, "done", proc.returncode, stdout=out, stderr=err, hostname=host.hostname)

    async def main():
        outcomes = []
        async with Fanout(hosts, task, forks=20, timeout=60) as fan:
            async for r in fan:
                outcomes.append(outcome_from_result(r))
        return outcomes

    try:
        outcomes = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        f.restore_host_key("h05")
        f.up("h03")
    assert dropped.is_set()
    by = {o.name: o for o in outcomes}
    assert sorted(by) == f.names
    failed = {"h03", "h05", "h09"}
    for name in set(f.names) - failed:
        assert (by[name].state, by[name].status, by[name].stdout, by[name].stderr) == ("done", 0, PAYLOAD,
                                                                                      b"started\n"), name
    assert "Connection refused" in by["h03"].reason
    assert "Host key verification failed" in by["h05"].reason
    assert by["h09"].status == 255 and by["h09"].stdout == b""
    table = summary_table(outcomes)
    assert table.splitlines()[1].startswith("h[01-02,04,06-08,10-20]  done")
    for name in failed:
        assert any(line.startswith(name + " ") and " 255 " in line for line in table.splitlines()), table
    assert exit_status(outcomes) == 255
    out, err = io.BytesIO(), io.BytesIO()
    gather(outcomes, out, err)
    text = out.getvalue()
    assert text.startswith(b"-" * 15 + b"\nh[01-02,04,06-08,10-20] (17)\n" + b"-" * 15 + b"\n" + PAYLOAD + b"\n")
    assert err.getvalue().startswith(b"started\n")
    assert os.path.exists(f.config_file)


def test_a_host_with_a_port_is_one_host_in_a_pattern():
    """``-H ssh://me@h:2222`` and ``-H me@h:2222`` name one host each, as
    on every command that connects (before: ``ssh``, ``//me@h`` and
    ``2222``); ``web:db`` stays two names (Ansible's ``:``)."""
    from chaperone.fleet.patterns import select

    assert select("ssh://me@127.0.0.1:2222") == ["ssh://me@127.0.0.1:2222"]
    assert select("me@h1:2222,h2") == ["h2", "me@h1:2222"]
    assert sorted(select("ssh://me@h:22:web")) == ["ssh://me@h:22", "web"]
    assert select("web:db") == ["db", "web"]
