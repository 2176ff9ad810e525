"""Bad input: one line on stderr (no traceback), a non-zero exit, and no
half-made run left behind (no spool directory, no record)."""

import json
import os

import pytest

from support.helpers import agent, cli, one_line_error, ps_ids, spool_root

GOOD_PROGRAM = {"argv": ["true"]}


def spec(**top):
    s = {"id": "bad", "program": dict(GOOD_PROGRAM)}
    s.update(top)
    return s


def with_program(**fields):
    prog = dict(GOOD_PROGRAM)
    prog.update(fields)
    return spec(program=prog)


HUGE = json.dumps({"id": "huge", "program": {"argv": ["echo", "A" * (17 << 20)]}}).encode()

BAD_PROGRAM_JSON = {
    "empty": (b"", "empty"),
    "blank": (b"  \n\t ", "empty"),
    "not-json": (b"{this is not json", "not valid JSON"),
    "not-utf8": (b'{"id": "\xff\xfe"}', "not valid JSON"),
    "a-list": (b"[]", "expected a JSON object"),
    "truncated": (json.dumps(spec())[:-5].encode(), "not valid JSON"),
    "argv-string": (with_program(argv="echo hi"), "argv"),
    "argv-empty": (with_program(argv=[]), "argv"),
    "argv-ints": (with_program(argv=["echo", 1]), "argv[1]"),
    "env-int": (with_program(env={"A": 1}), "env"),
    "env-list": (with_program(env=["A=1"]), "env"),
    "timeout-string": (spec(config={"timeout": "5"}), "timeout"),
    "timeout-negative": (spec(config={"timeout": -1}), "timeout"),
    "grace-bool": (spec(config={"kill_grace": True}), "kill_grace"),
    "timeout-infinity": (b'{"id": "bad", "program": {"argv": ["true"]}, "config": {"timeout": Infinity}}',
                         "timeout"),
    "timeout-1e400": (b'{"id": "bad", "program": {"argv": ["true"]}, "config": {"timeout": 1e400}}', "timeout"),
    "grace-nan": (b'{"id": "bad", "program": {"argv": ["true"]}, "config": {"kill_grace": NaN}}', "kill_grace"),
    "heartbeat-huge-int": (spec(callback={"url": "https://x/", "token": "t" * 43, "cert": "c",
                                          "heartbeat": 10 ** 400}), "heartbeat"),
    "unknown-top": (spec(bogus=1), "bogus"),
    "unknown-program": (with_program(bogus=1), "bogus"),
    "unknown-config": (spec(config={"bogus": 1}), "bogus"),
    "unknown-stdin": (with_program(stdin={"path": "/dev/null", "extra": 1}), "extra"),
    "unknown-callback": (spec(callback={"url": "https://x/", "token": "t" * 43, "cert": "c", "x": 1}), "'x'"),
    "missing-id": ({"program": GOOD_PROGRAM}, "id"),
    "missing-program": ({"id": "bad"}, "program"),
    "id-dotdot": (spec(id="../x"), "invalid run id"),
    "id-slash": (spec(id="a/b"), "invalid run id"),
    "id-dots": (spec(id=".."), "invalid run id"),
    "id-int": (spec(id=5), "invalid run id"),
    "id-trailing-newline": (spec(id="abc\n"), "invalid run id"),
    "version-2": (spec(version=2), "version"),
    "stdin-bad-base64": (with_program(stdin={"data": "not base64!"}), "base64"),
    "short-token": (spec(callback={"url": "https://x/", "token": "short", "cert": "c"}), "token"),
    "huge": (HUGE, "too large"),
}


@pytest.mark.timeout(60)
def test_agent_start_rejects_bad_program_json(tmp_path):
    root = tmp_path / "spool"
    failures = []
    for name, (data, words) in sorted(BAD_PROGRAM_JSON.items()):
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        res = agent(root, "start", input=data)
        try:
            assert res.returncode != 0
            line = one_line_error(res.stderr)
            assert line.startswith("chaperone-agent: ")
            assert words in line, line
            assert res.stdout == b""
            # nothing was made: not the run, not a half-built temp dir
            assert not root.exists() or os.listdir(str(root)) == []
            assert not (tmp_path / "x").exists() and not (tmp_path / "a").exists()
        except AssertionError as e:
            failures.append("%s: %s (stderr %r)" % (name, e, res.stderr[:300]))
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(30)
def test_agent_unknown_and_invalid_ids(tmp_path):
    root = tmp_path / "spool"
    root.mkdir()
    for args in (["status", "nosuch"], ["follow", "nosuch"], ["signal", "nosuch", "TERM"],
                 ["clean", "nosuch"], ["output", "nosuch", "--stream", "stdout"]):
        res = agent(root, *args)
        assert res.returncode == 4, (args, res.stderr)
        assert "no such run: nosuch" in one_line_error(res.stderr)
        assert res.stdout == b""
    for bad in ("../x", "a/b", "..", ".hidden", "x" * 129, "a\nb", "abc\n", "/etc"):
        res = agent(root, "status", bad)
        assert res.returncode == 2, (bad, res.stderr)
        assert "invalid run id" in one_line_error(res.stderr)
    for args in (["signal", "x", "BOGUS"], ["signal", "x", "SIG_IGN"], ["signal", "x", "0"],
                 ["bogus-command"], [], ["status"], ["status", "-x"],
                 ["output", "x", "--stream", "stdin"], ["follow", "x", "--stdout-offset", "z"]):
        res = agent(root, *args)
        assert res.returncode != 0, args
        one_line_error(res.stderr)
    assert os.listdir(str(root)) == []


@pytest.mark.timeout(60)
def test_cli_rejects_bad_runs_without_leaving_anything(home, tmp_path):
    cases = [
        (["--id", "../x"], ["true"], "invalid"),
        (["--id", "a/b"], ["true"], "invalid"),
        (["--id", ".."], ["true"], "invalid"),
        (["--id", "e1", "-e", "NOVALUE"], ["true"], "NOVALUE"),
        (["--id", "e2", "-e", "=x"], ["true"], "=x"),
        (["--id", "e3", "--stdin", str(tmp_path / "missing")], ["cat"], "missing"),
        (["--id", "e4", "--timeout", "-1"], ["true"], "timeout"),
    ]
    for opts, argv, words in cases:
        res = cli(home, "run", "local", *opts, "--", *argv)
        assert res.returncode == 2, opts  # bad usage
        line = one_line_error(res.stderr)
        assert words in line, (opts, line)
        assert res.stdout == b""
    spool = spool_root(home)
    assert not spool.exists() or os.listdir(str(spool)) == []
    assert not (home / "x").exists() and not (home / "a").exists()
    assert ps_ids(home) == []


@pytest.mark.timeout(60)
def test_cli_unknown_run_ids(home):
    for cmd in (["status"], ["logs"], ["logs", "-f"], ["wait"], ["kill"], ["clean"]):
        res = cli(home, cmd[0], "nosuch", *cmd[1:])
        assert res.returncode == 4, cmd  # errors.NoSuchRun
        assert "no such run: nosuch" in one_line_error(res.stderr), cmd
        assert res.stdout == b""
    res = cli(home, "status", "../x")
    assert res.returncode not in (0, None)
    assert "invalid run id" in one_line_error(res.stderr)
    assert ps_ids(home) == []


@pytest.mark.timeout(60)
def test_cli_bad_signal_names(home):
    res = cli(home, "run", "local", "--id", "ok", "--", "true")
    assert res.returncode == 0
    for sig in ("BOGUS", "SIG_DFL", ""):
        res = cli(home, "kill", "ok", "-s", sig)
        assert res.returncode == 2, sig
        assert "unknown signal" in one_line_error(res.stderr), sig
        assert res.stdout == b""
    # the run is untouched
    assert json.loads(cli(home, "status", "ok", "--json").stdout)["return_code"] == 0


@pytest.mark.timeout(30)
def test_cli_invalid_id_on_other_commands_is_usage_error(home):
    res = cli(home, "status", "a/b")
    assert "invalid run id" in one_line_error(res.stderr)
    assert res.returncode == 2


#: (arguments, exit status, what the one line says): each a usage error that
#: says what to do and where help is.
USAGE = [
    (["run", "--timeout", "1h30", "local", "--", "true"], "each number after the first needs its unit, as in 1h30m",
     "chaperone run"),
    (["run", "--kill-grace", "inf", "local", "--", "true"], "a finite number of seconds", "chaperone run"),
    (["run", "--id", "", "local", "--", "true"], "invalid run id ''", "chaperone run"),
    (["run", "--id", "bad id", "local", "--", "true"], "invalid run id 'bad id'", "chaperone run"),
    (["run", "--stdin", "/", "local", "--", "cat"], "cannot read --stdin /: it is a directory", "chaperone run"),
    (["run", "-e", "NOEQUALS", "local", "--", "true"], "expected NAME=VALUE", "chaperone run"),
    (["logs", "--tail", "-1", "x"], "invalid --tail '-1'", "chaperone logs"),
    (["ps", "-n", "-1"], "-1 is not in the range", "chaperone ps"),
    (["kill", "-s", "BOGUS", "x"], "unknown signal 'BOGUS'", "chaperone kill"),
    # an option's value missing: the command's help, not the group's
    (["logs", "--tail"], "Option '--tail' requires an argument", "chaperone logs"),
    (["run", "--id"], "Option '--id' requires an argument", "chaperone run"),
]


@pytest.mark.parametrize("args, says, command", USAGE, ids=[" ".join(a[:3]) for a, _, _ in USAGE])
def test_usage_errors_say_what_and_where_help_is(home, args, says, command):
    res = cli(home, *args)
    line = one_line_error(res.stderr)
    assert res.returncode == 2, (args, res.stderr)
    assert says in line and line.endswith("(Try '%s --help'.)" % command), line
    assert "invalid invalid" not in line
    assert ps_ids(home) == []  # (nothing started, nothing recorded)


def test_no_command_prints_the_help_not_a_line_of_it(home):
    res = cli(home)
    err = res.stderr.decode()
    assert res.returncode == 2 and err.startswith("Usage: chaperone") and "Commands:" in err, err
    assert "(Try" not in err and not err.startswith("chaperone:")


@pytest.mark.parametrize("timeout", ["0", "inf"])
def test_a_timeout_of_0_or_inf_is_none(home, timeout):
    """As ``timeout 0 CMD``: no time limit (was: an error naming config.timeout)."""
    res = cli(home, "run", "-q", "--timeout", timeout, "local", "--", "sh", "-c", "echo ran")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"ran\n", b"")


def test_run_json_prints_the_run_of_a_start_that_failed(home):
    """``run --json``: the run's object at the end, as docs/cli.md says,
    also when its start failed (state failed, the error), besides the one
    line on stderr (before: nothing on stdout)."""
    res = cli(home, "run", "--json", "--id", "jsonfail", "nosuch.invalid", "--", "true")
    assert res.returncode == 255 and one_line_error(res.stderr).startswith("chaperone: unknown host")
    obj = json.loads(res.stdout)
    assert (obj["id"], obj["state"]) == ("jsonfail", "failed") and "unknown host" in obj["error"]
