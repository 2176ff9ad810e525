"""The library as a scheduler author uses it: one API (typed results, a
Run handle, shell command lines and exact argvs), how a host is named and
reached (the user's own ~/.ssh/config for both SSH clients), many starts
at once against a stock sshd, and records that tell one story."""

import asyncio
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from support.helpers import run_async, with_ssh_dir

from chaperone import Chaperone
from chaperone.errors import ConnectFailed, ConnectionLost, NoSuchRun, StartFailed, StartPending, UsageError
from chaperone.states import START_GRACE
from chaperone.models import RunInfo, RunState
from chaperone.transports.target import Target, parse_host

CLIENTS = ["openssh", "asyncssh"]


# Naming hosts -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("gpu1", ("gpu1", None, "gpu1", None)),
    ("me@gpu1", ("me@gpu1", "me", "gpu1", None)),
    ("gpu1:2222", ("gpu1", None, "gpu1", 2222)),
    ("me@10.0.0.5:22", ("me@10.0.0.5", "me", "10.0.0.5", 22)),
    ("ssh://me@gpu1:2200", ("me@gpu1", "me", "gpu1", 2200)),
    ("ssh://gpu1/", ("gpu1", None, "gpu1", None)),
    ("[::1]:2222", ("::1", None, "::1", 2222)),
    ("fe80::1", ("fe80::1", None, "fe80::1", None)),
    ("local", ("local", None, "local", None)),
])
def test_host_arguments_as_ssh_users_write_them(text, expected):
    assert parse_host(text) == expected


@pytest.mark.parametrize("text, hint", [
    ("gpu1:http", "not a port number"),
    ("gpu1:0", "not a port number"),
    ("http://gpu1", "only ssh:// URLs"),
    ("gpu1:/tmp/x", "a path?"),
    ("/tmp/x", "'/' is not allowed"),
    ("@gpu1", "user name before '@' is empty"),
    ("-oProxyCommand=x", "cannot start with '-'"),
    ("gpu 1", "spaces"),
    ("", "empty"),
    ("ssh://[::1", "']' is missing"),
])
def test_bad_host_arguments_are_refused_with_a_hint(text, hint):
    with pytest.raises(UsageError, match="invalid host") as e:
        parse_host(text)
    assert hint in str(e.value)


def test_settings_win_over_the_argument_and_targets_round_trip_through_records():
    t = Target.parse("me@gpu1:2222", user="you", identities=["k"], options=["Compression=yes"], jump="bastion",
                     spool="/scratch/runs")
    assert (t.name, t.destination, t.user, t.port) == ("me@gpu1", "gpu1", "you", 2222)
    assert Target.from_description(json.loads(json.dumps(t.describe()))) == t
    # Records written by the previous version (host "user@host", ssh settings by their old names).
    old = {"host": "bob@gpu1", "ssh": {"port": 22, "username": None, "config": [], "known_hosts": None,
                                       "check_host_keys": True, "python": None, "client_keys": None, "root": None}}
    back = Target.from_description(old)
    assert (back.name, back.destination, back.user, back.port) == ("bob@gpu1", "gpu1", "bob", 22)
    assert Target.parse("local").local and not Target.parse("localhost").local


# Connecting: the errors both clients share, and retries --------------------------------


def test_a_connection_dropped_before_login_is_safe_to_retry():
    from chaperone.transports.ssh.via_openssh import ssh_error

    t = Target("testhost")
    dropped = ssh_error(t, b"kex_exchange_identification: read: Connection reset by peer\n", False)
    assert isinstance(dropped, ConnectFailed) and dropped.retry_safe
    assert "before login" in str(dropped) and "MaxStartups" in str(dropped)
    closed = ssh_error(t, b"Connection closed by 127.0.0.1 port 22\n", False)
    assert isinstance(closed, ConnectFailed) and closed.retry_safe
    # Once the agent said something, the run may have started: never "retry safe".
    lost = ssh_error(t, b"Connection to 127.0.0.1 closed by remote host.\n", True)
    assert isinstance(lost, ConnectionLost) and not getattr(lost, "retry_safe", False)
    refused = ssh_error(t, b"ssh: connect to host 127.0.0.1 port 9: Connection refused\n", False)
    assert isinstance(refused, ConnectFailed) and refused.transient and not refused.retry_safe
    auth = ssh_error(t, b"bob@127.0.0.1: Permission denied (publickey).\n", False)
    assert "authentication failed for testhost (as bob@127.0.0.1)" in str(auth)
    unknown = ssh_error(t, b"No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict "
                           b"checking.\nHost key verification failed.\n", False)
    assert "host key verification failed for testhost" in str(unknown) and "ssh-keyscan" in str(unknown)


def test_retries_back_off_with_jitter_then_give_up(monkeypatch):
    from chaperone.transports.ssh import common

    delays = []

    async def fake_sleep(seconds):
        delays.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 4:
            raise ConnectFailed("dropped", retry_safe=True)
        return "connected"

    assert run_async(common.retrying(flaky)) == "connected"
    assert len(delays) == 3 and all(0 <= d <= common.RETRY_CAP for d in delays)

    async def always():
        raise ConnectFailed("dropped", retry_safe=True)

    with pytest.raises(ConnectFailed):
        run_async(common.retrying(always))
    assert len(delays) == 3 + common.CONNECT_RETRIES

    async def refused():  # not retry-safe: once
        attempts.append(1)
        raise ConnectFailed("refused", transient=True)

    attempts.clear()
    with pytest.raises(ConnectFailed):
        run_async(common.retrying(refused))
    assert len(attempts) == 1
    assert all(0 <= common.retry_delay(n, random.random) <= common.RETRY_CAP for n in range(1, 30))


# The user's own ~/.ssh/config, read by both clients -----------------------------------

USER_CONFIG_CLIENT = textwrap.dedent("""
    import asyncio, json, sys
    from chaperone import Chaperone

    async def main():
        async with Chaperone(sys.argv[1], ssh_client=sys.argv[2]) as ch:
            out = {}
            for host in sys.argv[3:]:
                run = await ch.start(host, "echo $(id -un) $SSH_CONNECTION", ssh={"spool": sys.argv[1] + "/spool"})
                st = await run.wait()
                out[host] = [st.state, st.return_code, (await run.read()).decode()]
            print(json.dumps(out))

    asyncio.run(main())
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", CLIENTS)
def test_both_clients_read_the_users_ssh_config(sshd, tmp_path, client):
    """Host aliases from ~/.ssh/config (through Include), HostName, Port set
    by a Match block, User, IdentityFile, UserKnownHostsFile and ProxyJump:
    the library reaches them with either client, as `ssh ALIAS` would,
    with no -F and no settings of its own."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"):
        pytest.skip("needs root and unshare for a private ~/.ssh")
    ssh_dir = tmp_path / "dotssh"
    (ssh_dir / "config.d").mkdir(parents=True)
    os.chmod(ssh_dir, 0o700)
    key = ssh_dir / "id_test"
    key.write_bytes(open(sshd.identity_file, "rb").read())
    os.chmod(key, 0o600)
    (ssh_dir / "known_hosts_test").write_bytes(open(sshd.known_hosts, "rb").read())
    (ssh_dir / "config").write_text(textwrap.dedent("""\
        Include ~/.ssh/config.d/*.conf
        Match originalhost gpu1,jumped
            Port {port}
        Host *
            StrictHostKeyChecking yes
            BatchMode yes
            LogLevel ERROR
        """).format(port=sshd.port))
    (ssh_dir / "config.d" / "hosts.conf").write_text(textwrap.dedent("""\
        Host gpu1
            HostName {addr}
            User {user}
            IdentityFile ~/.ssh/id_test
            IdentitiesOnly yes
            UserKnownHostsFile ~/.ssh/known_hosts_test
        Host jumped
            HostName {addr}
            User {user}
            IdentityFile ~/.ssh/id_test
            IdentitiesOnly yes
            UserKnownHostsFile ~/.ssh/known_hosts_test
            ProxyJump gpu1
        """).format(addr=sshd.listen_address, user=sshd.user))
    for f in ssh_dir.rglob("*"):
        os.chmod(f, 0o700 if f.is_dir() else 0o600)
    home = tmp_path / "home"
    env = dict(os.environ, CHAPERONE_SSH_CLIENT=client)
    res = with_ssh_dir(ssh_dir, [sys.executable, "-c", USER_CONFIG_CLIENT, str(home), client, "gpu1", "jumped"],
                        env)
    assert res.returncode == 0, res.stderr.decode()
    out = json.loads(res.stdout)
    for host in ("gpu1", "jumped"):
        state, code, text = out[host]
        assert (state, code) == ("done", 0), (host, out)
        user, client_addr, client_port, server_addr, server_port = text.split()
        assert (user, server_addr, int(server_port)) == (sshd.user, sshd.listen_address, sshd.port)
    # The same config through the CLI (its own default client choice aside).
    cli = with_ssh_dir(ssh_dir, [sys.executable, "-m", "chaperone", "run", "--spool", str(home / "spool"),
                                  "gpu1", "--", "echo", "$HOME"], dict(env, CHAPERONE_HOME=str(home)))
    assert (cli.returncode, cli.stdout) == (0, b"$HOME\n"), cli.stderr.decode()


# Many starts at once on a stock sshd -------------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("client", CLIENTS)
def test_twenty_pushed_starts_at_once_on_a_stock_sshd(stock_sshd, tmp_path, client, capfd):
    """Chaperone(push=True).start of 20 runs at once on one host: all
    start, over one connection for the calls (one transport per host), no
    traceback on stderr."""
    async def main():
        async with Chaperone(tmp_path / "home", push=True, ssh_config=[stock_sshd.config_file],
                             ssh_client=client, config={"retry_frequency": 0.5}) as ch:
            spool = {"spool": str(tmp_path / "spool")}

            async def one(i):
                await asyncio.sleep(random.random() * 0.2)  # not all in one turn: not one batch
                return await ch.start("testhost", ["sh", "-c", "echo run %d" % i], ssh=spool)

            runs = await asyncio.gather(*(one(i) for i in range(20)))
            states = await asyncio.gather(*(r.wait() for r in runs))
            outs = [ch.push.mirror(r.id).read("stdout") for r in runs]
            transports = {id(ch.transport_for(ch.record(r.id))) for r in runs}
            return states, outs, transports

    states, outs, transports = run_async(main(), 140)
    assert [(s.state, s.return_code) for s in states] == [("done", 0)] * 20
    assert outs == [b"run %d\n" % i for i in range(20)]
    assert len(transports) == 1
    assert "Traceback" not in capfd.readouterr().err


CONNECT_STORM = textwrap.dedent("""
    import asyncio, json, sys
    from chaperone import Chaperone

    async def one(i):
        # A Chaperone each: a connection each, all set up at once.
        async with Chaperone(sys.argv[1], ssh_config=[sys.argv[2]], ssh_client=sys.argv[3]) as ch:
            run = await ch.start("testhost", ["true"], id="storm-%d" % i, ssh={"spool": sys.argv[1] + "/spool"})
            return run.state.state

    async def main():
        results = await asyncio.gather(*(one(i) for i in range(int(sys.argv[4]))), return_exceptions=True)
        print(json.dumps([r if isinstance(r, str) else "%s: %s" % (type(r).__name__, r) for r in results]))

    asyncio.run(main())
""")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("client", CLIENTS)
def test_a_connection_storm_is_retried_not_lost(stock_sshd, tmp_path, client):
    """30 connections to one stock sshd at once: sshd drops those past its
    MaxStartups before login; each is retried with backoff and jitter, so
    every start goes through, and none is reported as a lost connection."""
    n = 30
    res = subprocess.run([sys.executable, "-c", CONNECT_STORM, str(tmp_path / "home"), stock_sshd.config_file,
                          client, str(n)], capture_output=True, timeout=140)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    results = json.loads(res.stdout)
    assert results == ["running"] * n or all(r in ("running", "done") for r in results), results
    assert "Traceback" not in res.stderr.decode()


# One API ------------------------------------------------------------------------------


def test_one_api_typed_results_shell_lines_and_exact_argv(tmp_path):
    """A string is a shell command line (as `ssh HOST 'CMD'`); a list is an
    exact argv, never interpreted by a shell.  Results are pydantic models;
    the Run handle carries the verbs."""
    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            shell = await ch.start("local", "echo $((6 * 7)) | tr 4 x; exit 3")
            exact = await ch.start("local", ["echo", "$HOME", "*", "a b"])
            st1, st2 = await shell.wait(), await exact.wait()
            assert isinstance(st1, RunState) and isinstance(shell.state, RunState)
            info = shell.info()
            assert isinstance(info, RunInfo)
            assert (info.state, info.exit_code, info.command, info.argv) == (
                "done", 3, "echo $((6 * 7)) | tr 4 x; exit 3", None)
            assert exact.info().argv == ["echo", "$HOME", "*", "a b"]
            assert await ch.get(shell.id[:-1]).read() == b"x2\n"  # a unique prefix of the id
            again = await ch.start("local", "echo $((6 * 7)) | tr 4 x; exit 3", id=shell.id)
            assert again.id == shell.id  # the same run again: harmless
            with pytest.raises(UsageError, match="already used"):
                await ch.start("local", ["true"], id=shell.id)
            with pytest.raises(UsageError):
                await ch.start("local", "   ")
            with pytest.raises(UsageError, match="timeout must be a number of seconds"):
                await ch.start("local", ["true"], timeout="x")  # (was a bare ValueError)
            return st1, st2, await exact.read(), [r.id for r in ch.runs()]

    st1, st2, out, ids = run_async(main())
    assert (st1.exit_code, st1.final) == (3, True)
    assert (st2.exit_code, out) == (0, b"$HOME * a b\n")
    assert len(ids) == 2


def test_a_start_that_never_reached_its_host_is_failed_everywhere(tmp_path):
    """A start that cannot connect raises at once, is recorded `failed`
    with its own error (not `running`, never `lost` later), can be looked
    at and cleaned without reaching the host, and a refresh leaves it be."""
    from support.sshd import free_port

    port = free_port()  # nothing listens there

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            with pytest.raises(ConnectFailed, match="refused"):
                await ch.start("127.0.0.1:%d" % port, ["true"], id="never")
            rec = ch.record("never")
            assert rec.state == "failed" and "refused" in rec.error
            with pytest.raises(StartFailed, match="never started.*refused"):
                await ch.status("never")
            with pytest.raises(StartFailed):
                await ch.wait("never")
            unreachable = await ch.refresh()
            assert ch.record("never").state == "failed" and unreachable == {}
            info = ch.get("never").info()
            assert (info.state, info.exit_code) == ("failed", 255) and "refused" in info.error
            await ch.clean("never")  # no host needed
            with pytest.raises(NoSuchRun):
                ch.record("never")

    run_async(main())


def test_a_start_recorded_but_never_answered_is_settled_by_the_host(tmp_path):
    """A run recorded `starting` (this process died before the host
    answered) that its host never heard of becomes `failed`, with why; one
    the host has becomes what the host says.  reattach() goes on past an
    unreachable host."""
    from support.sshd import free_port

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            ok = await ch.start("local", ["true"], id="real")
            await ok.wait()
            target = ch.target("local")
            ch.records.add("ghost", "local", target.describe(), ["true"])
            # (made longer ago than a start may take: the process that made it is gone; a younger
            # one may have its start on its way, from another process: left starting, see below)
            ch.records.db.execute("UPDATE runs SET created = created - ? WHERE id = 'ghost'", (START_GRACE + 1,))
            ch.records.add("young", "local", target.describe(), ["true"])
            ch.records.add("away", "127.0.0.1:%d" % free_port(),
                           Target.parse("127.0.0.1:%d" % free_port()).describe(), ["true"])
            ch.records.mark("away", "running")
            ch.records.db.execute("UPDATE runs SET state = 'running' WHERE id = 'real'")
            ids = await ch.reattach()
            assert ids == ["real"]
            assert ch.record("real").state == "done"
            assert ch.record("ghost").state == "failed" and "never reached" in ch.record("ghost").error
            assert ch.record("young").state == "starting"
            with pytest.raises(StartPending, match="is starting"):
                await ch.status("young")
            assert ch.record("away").state == "running"  # unreachable: left for later

    run_async(main())


@pytest.mark.timeout(120)
def test_the_same_id_from_many_processes_at_once(tmp_path):
    """Idempotent by id: 40 `run -d --id same` at once on one
    CHAPERONE_HOME all succeed and all see the one run."""
    from support.helpers import CLI, cli_env

    env = cli_env(tmp_path)
    procs = [subprocess.Popen(CLI + ["run", "-d", "--id", "same", "local", "--", "true"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
             for _ in range(40)]
    results = [(p.wait(100), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [r[:2] for r in results] == [(0, b"same\n")] * 40, [r for r in results if r[0]][:3]


def test_offsets_and_stream_names_are_checked_alike_everywhere(tmp_path):
    """events() takes offsets for some streams (the others from 0), as
    logs() and push do; read() takes stdout or stderr only, and offsets
    >= 0, as output() and logs() do: a UsageError, not an agent's usage
    text or its framing."""
    from chaperone.errors import UsageError
    from chaperone.protocol import OutputChunk

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            run = await ch.start("local", ["sh", "-c", "printf 0123456789; printf ERR >&2"])
            await run.wait()
            got = [(e.stream, e.offset, e.data) async for e in run.events({"stdout": 5})
                   if isinstance(e, OutputChunk)]
            errors = []
            for call in (lambda: run.read("both"), lambda: run.read("stdin"), lambda: run.read("stdout", -1),
                         lambda: run.read("stdout", 0, -1)):
                try:
                    await call()
                except UsageError as e:
                    errors.append(str(e))
            for offsets in ({"stdout": -1}, {"both": 0}):
                try:
                    [e async for e in run.events(offsets)]
                except UsageError as e:
                    errors.append(str(e))
            return got, errors

    got, errors = run_async(main())
    assert sorted(got) == [("stderr", 0, b"ERR"), ("stdout", 5, b"56789")]
    assert len(errors) == 6, errors


def test_run_gives_the_final_state_once_after_the_output(tmp_path):
    """run()'s events: the final state once, after every byte of output,
    just before End (the start's answer can be final already when the
    program ends at once: it was given first, then again after the output:
    a consumer stopping at the first final state lost the output)."""
    from chaperone.protocol import End, OutputChunk, StateUpdate

    async def main():
        shapes = set()
        async with Chaperone(tmp_path / "home") as ch:
            for _ in range(12):
                events = [e async for e in ch.run("local", ["sh", "-c", "echo a; echo E >&2; exit 3"])]
                finals = [i for i, e in enumerate(events) if isinstance(e, StateUpdate) and e.final]
                outputs = [i for i, e in enumerate(events) if isinstance(e, OutputChunk)]
                assert len(finals) == 1 and finals[0] > max(outputs) and isinstance(events[-1], End), events
                assert finals[0] == len(events) - 2 and events[finals[0]].state["return_code"] == 3
                shapes.add(tuple(type(e).__name__ for e in events))
        return shapes

    assert run_async(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["openssh", "asyncssh"])
def test_processes_lists_the_whole_tree_then_what_an_ended_run_left(sshd, tmp_path, client):
    """``processes()`` (docker top): the program first, its children, and a
    child that left its process group (setsid), from the host, typed; once
    the run is killed, nothing; a run that ended but left a child in its
    group: that child.  Over a real sshd, with both SSH clients."""
    tag = "%d%d" % (os.getpid(), random.randrange(10 ** 6))

    async def main():
        async with Chaperone(tmp_path / "home", ssh_config=[str(sshd.config_file)], ssh_client=client) as ch:
            run = await ch.start("testhost", ["sh", "-c", "sleep 41%s & (setsid sleep 42%s &); sleep 43%s; :"
                                              % (tag, tag, tag)], id="top-" + tag)
            for _ in range(100):
                procs = await run.processes()
                if len(procs) == 4:
                    break
                await asyncio.sleep(0.05)
            st = await run.status()
            await run.signal("KILL")
            await run.wait()
            after = await run.processes()
            left = await ch.start("testhost", ["sh", "-c", "sleep 44%s & exit 0" % tag], id="left-" + tag)
            await left.wait()
            leftover = await left.processes()
            await left.signal("KILL")
            return procs, st, after, leftover

    procs, st, after, leftover = run_async(main())
    assert [type(p).__name__ for p in procs] == ["Process"] * 4
    assert procs[0].pid == st.pid and procs[0].argv[:2] == ["sh", "-c"]
    argvs = {" ".join(p.argv): p for p in procs[1:]}
    assert set(argvs) == {"sleep 41" + tag, "sleep 42" + tag, "sleep 43" + tag}, argvs
    assert argvs["sleep 41" + tag].pgid == st.pid and argvs["sleep 42" + tag].pgid != st.pid  # (left the group)
    assert all(p.rss > 0 and p.elapsed >= 0 and p.state in "RSD" for p in procs)
    assert after == []
    assert [p.argv for p in leftover] == [["sleep", "44" + tag]]


def test_library_errors_name_the_librarys_own_spelling(tmp_path):
    """A library user is told the library's option, not only the CLI's:
    ``clean()`` of a running run says ``force=True``."""
    from chaperone.errors import ChaperoneError

    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            run = await ch.start("local", ["sleep", "30"])
            try:
                with pytest.raises(ChaperoneError, match=r"force=True"):
                    await run.clean()
            finally:
                await run.clean(force=True)

    run_async(main())


def test_records_can_be_read_from_another_thread(tmp_path):
    """``get`` and ``runs`` (records only, no I/O) from a worker thread, as
    a scheduler's threads call them (before: sqlite3.ProgrammingError,
    "objects created in a thread can only be used in that same thread")."""
    async def main():
        async with Chaperone(tmp_path / "home") as ch:
            run = await ch.start("local", ["true"], id="threaded")
            await run.wait()
            got = await asyncio.to_thread(ch.get, "threaded")
            listed = await asyncio.to_thread(ch.runs)
            return got.id, [r.id for r in listed]

    assert run_async(main()) == ("threaded", ["threaded"])
