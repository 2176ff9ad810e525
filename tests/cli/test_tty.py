"""`chaperone run -t`: the program on a pseudo-terminal on the host, as under
`ssh -t` (issue 10 item 4).  The CLI runs on a real terminal made here (a
pty whose slave is its controlling terminal), against the test sshd: what
is typed reaches the program, Ctrl-C is one SIGINT, the window size
follows, the output is spooled, `~.` detaches, and the local terminal is
restored whatever happens.  The library's `tty=` and `resize()` too."""

import asyncio
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from support.helpers import cli_env, load_agent, run_async, wait_for

#: Counts SIGINT and SIGWINCH, says what it sees; ends after 2 SIGINTs or "q".
PROG = r"""
import os, signal, sys, select
def say(s):
    os.write(1, (s + "\n").encode())
n = [0]
def on_int(sig, frame):
    n[0] += 1
    say("SIGINT %d" % n[0])
signal.signal(signal.SIGINT, on_int)
signal.signal(signal.SIGWINCH, lambda s, f: say("WINCH %d %d" % os.get_terminal_size(0)[::-1]))
say("tty %s %s %d %d TERM=%s" % (os.isatty(0), os.isatty(1), *os.get_terminal_size(0)[::-1],
                                 os.environ.get("TERM")))
say("ctty %s" % (os.tcgetpgrp(0) == os.getpgrp()))
while n[0] < 2:
    try:
        r = select.select([0], [], [], 0.1)[0]
    except InterruptedError:
        continue
    if r:
        line = os.read(0, 100)
        say("got %r" % line)
        if line.startswith(b"q"):
            break
say("bye")
sys.exit(3)
"""


@pytest.fixture
def prog(tmp_path):
    p = tmp_path / "prog.py"
    p.write_text(PROG)
    return p


class Terminal:
    """A pty made here, the CLI's controlling terminal; the test is the
    person at the keyboard (writes to the master, reads the screen)."""

    def __init__(self, cmd, env, rows=30, cols=100):
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=self.slave, stdout=self.slave, stderr=self.slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        self.screen = b""

    def read_until(self, want: bytes, timeout=30.0) -> bytes:
        end = time.monotonic() + timeout
        while want not in self.screen:
            left = end - time.monotonic()
            assert left > 0, "waited for %r; the screen: %r" % (want, self.screen)
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: nobody has the terminal open any more
                    assert want in self.screen, "waited for %r; the screen: %r" % (want, self.screen)
        return self.screen

    def read_match(self, pattern: bytes, timeout=30.0):
        """Read until ``pattern`` (a regular expression) matches the screen."""
        end = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.screen)
            if found:
                return found
            assert time.monotonic() < end, "waited for %r; the screen: %r" % (pattern, self.screen)
            if select.select([self.master], [], [], 0.2)[0]:
                self.screen += os.read(self.master, 65536)

    def type(self, data: bytes):
        os.write(self.master, data)

    def resize(self, rows, cols):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def wait(self, timeout=30.0) -> int:
        code = self.proc.wait(timeout)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                self.screen += os.read(self.master, 65536)
        except OSError:
            pass
        return code

    def settings(self):
        return termios.tcgetattr(self.slave)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def cli(sshd, *args):
    return [sys.executable, "-m", "chaperone.cli", "-F", str(sshd.config_file)] + [str(a) for a in args]


@pytest.mark.timeout(90)
def test_a_terminal_on_the_host_typed_into_from_this_one(sshd, home, prog, tmp_path):
    """`chaperone run -t testhost python3 prog.py` on a terminal: the program
    has a terminal (stdin and stdout, its controlling one) of this one's
    size and TERM; a typed line reaches it (echoed, as a terminal does);
    each Ctrl-C is one SIGINT; a new window size is a SIGWINCH with it;
    its exit status is the CLI's; the output is spooled (stdout, with the
    terminal's \\r\\n); this terminal's settings are as they were."""
    spool = tmp_path / "spool"
    t = Terminal(cli(sshd, "run", "-t", "--spool", spool, "--id", "tty1", "testhost", "python3", prog),
                 cli_env(home, TERM="xterm-test"))
    try:
        t.read_until(b"ctty True")
        assert b"tty True True 30 100 TERM=xterm-test" in t.screen
        assert b"(a terminal there: ~. detaches)" in t.screen
        during = t.settings()
        assert not during[3] & termios.ECHO and not during[3] & termios.ICANON  # raw while attached
        t.type(b"hello\r")
        t.read_until(b"got b'hello\\n'")
        assert b"hello\r\n" in t.screen  # (echoed by the terminal there)
        t.resize(40, 120)
        t.read_until(b"WINCH 40 120")
        t.type(b"\x03")
        t.read_until(b"SIGINT 1")
        time.sleep(0.5)
        assert b"SIGINT 2" not in t.screen  # (one Ctrl-C, one SIGINT)
        t.type(b"\x03")
        t.read_until(b"bye")
        assert t.wait() == 3, t.screen
        assert t.settings() == t.before, "the terminal was not restored"
    finally:
        t.close()
    out = (spool / "tty1" / "stdout").read_bytes()
    assert b"got b'hello\\n'\r\n" in out and out.endswith(b"bye\r\n")
    assert (spool / "tty1" / "stderr").read_bytes() == b""


@pytest.mark.timeout(90)
def test_tilde_dot_detaches_and_the_program_goes_on(sshd, home, prog, tmp_path):
    """`~.` after a newline detaches as ssh's escape does: the terminal is
    restored at once, the CLI says how to re-attach and exits 130, and the
    program goes on (it still reads the input it was given, and `wait`
    returns its status).  `~~` types one `~`."""
    spool = tmp_path / "spool"
    t = Terminal(cli(sshd, "run", "-t", "--spool", spool, "--id", "tty2", "testhost", "python3", prog),
                 cli_env(home))
    try:
        t.read_until(b"ctty True")
        t.type(b"~~x\r")
        t.read_until(b"got b'~x\\n'")
        t.type(b"\r~.")
        assert t.wait() == 130, t.screen
        assert b"detached; run tty2 goes on" in t.screen
        assert t.settings() == t.before
    finally:
        t.close()
    env = cli_env(home)
    st = subprocess.run(cli(sshd, "status", "--json", "tty2"), env=env, capture_output=True, timeout=60)
    assert b'"running"' in st.stdout, st
    # `chaperone attach` gives it this terminal again (as docker attach):
    # a redraw (SIGWINCH), what is typed, Ctrl-C, its exit status.
    t = Terminal(cli(sshd, "attach", "tty2"), cli_env(home), rows=33, cols=90)
    try:
        t.read_until(b"attached to run tty2")
        t.read_until(b"WINCH 33 90")
        t.type(b"again\r")
        t.read_until(b"got b'again\\n'")
        assert b"got b'~x\\n'" not in t.screen  # (output from now on, not what was shown before)
        t.type(b"\x03")
        t.read_until(b"SIGINT 1")
        t.type(b"\x03")
        t.read_until(b"bye")
        assert t.wait() == 3, t.screen
        assert t.settings() == t.before
    finally:
        t.close()
    logs = subprocess.run(cli(sshd, "logs", "tty2"), env=env, capture_output=True, timeout=60).stdout
    assert b"got b'~x\\n'" in logs and b"^CSIGINT 1\r\n^CSIGINT 2\r\nbye\r\n" in logs  # (^C: the terminal's echo)
    ended = subprocess.run(cli(sshd, "attach", "tty2"), env=env, capture_output=True, timeout=60)
    assert ended.returncode == 1 and ended.stderr.startswith(b"chaperone: run tty2 has ended (done)"), ended


@pytest.mark.timeout(90)
def test_a_closed_terminal_detaches_and_attach_types_to_the_run_again(sshd, home, prog, tmp_path):
    """The window of a ``run -t`` closed (the terminal hung up, its reads
    fail): a detach, as ``~.`` is, not the end of the program's input; a
    later ``attach`` types to it again.  (Before, the end of the terminal
    ended the input: attach was output only, and stuck, as it had entered
    raw mode: Ctrl-C did nothing.)"""
    run_id = "tty-hup-%d-%d" % (os.getpid(), time.time())  # (the test host's spool is shared by test sessions)
    t = Terminal(cli(sshd, "run", "-t", "--id", run_id, "testhost", "python3", prog), cli_env(home))
    try:
        t.read_until(b"ctty True")
        os.close(t.master)  # (the window closed: the kernel hangs the terminal up)
        t.master = os.open("/dev/null", os.O_RDONLY)  # (for close())
        assert t.proc.wait(30) != 0, t.screen  # (what it says goes nowhere: the terminal is gone)
    finally:
        t.close()
    t = Terminal(cli(sshd, "attach", run_id), cli_env(home))
    try:
        t.read_until(b"attached to run " + run_id.encode())
        assert b"not open" not in t.screen, t.screen
        t.type(b"again\r")
        t.read_until(b"got b'again\\n'")
        t.type(b"\r~.")
        assert t.wait() == 130, t.screen
    finally:
        t.close()
    # output only (--no-stdin): what is typed is read and dropped, not left
    # for the shell once attach ends (here: the run is killed meanwhile)
    t = Terminal(cli(sshd, "attach", "--no-stdin", run_id), cli_env(home))
    try:
        t.read_until(b"attached to run " + run_id.encode())
        t.type(b"typed\r")
        time.sleep(0.5)
        subprocess.run(cli(sshd, "kill", "-s", "KILL", run_id), env=cli_env(home), capture_output=True,
                       timeout=60)
        assert t.wait() == 137, t.screen
        assert t.settings() == t.before
        left = select.select([t.slave], [], [], 0.2)[0] and os.read(t.slave, 100)
        assert not left, left
    finally:
        t.close()


@pytest.mark.timeout(90)
def test_attach_appends_to_a_stream_input_another_process_began(sshd, home, tmp_path):
    """A run reading piped input whose sender went away (killed): `attach`
    with piped input appends after what the host holds (each byte once)
    and its end is the program's end of file; the output from then on is
    printed, and the exit status is the program's."""
    env = cli_env(home)
    first = subprocess.Popen(cli(sshd, "run", "--spool", tmp_path / "spool", "--id", "s2", "testhost", "--", "sh",
                                 "-c", "cat; echo EOF; exit 4"),
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first.stdin.write(b"one\n")
        first.stdin.flush()
        assert first.stdout.read(4) == b"one\n"
    finally:
        first.kill()
        first.wait()
    more = subprocess.run(cli(sshd, "attach", "s2"), env=env, input=b"two\n", capture_output=True, timeout=60)
    assert more.returncode == 4, more
    assert more.stdout == b"two\nEOF\n"
    logs = subprocess.run(cli(sshd, "logs", "s2"), env=env, capture_output=True, timeout=60).stdout
    assert logs == b"one\ntwo\nEOF\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_the_terminal_is_restored_when_the_cli_is_stopped(sshd, home, prog, tmp_path, sig):
    """The terminal closed (SIGHUP) or the CLI told to stop (SIGTERM) while
    attached: this terminal's settings come back, the CLI exits 128+N, and
    the run goes on (it never depended on this process)."""
    t = Terminal(cli(sshd, "run", "-t", "--spool", tmp_path / "spool", "--id", "tty3", "testhost", "python3",
                     prog), cli_env(home))
    try:
        t.read_until(b"ctty True")
        t.proc.send_signal(sig)
        assert t.wait() == 128 + sig
        assert t.settings() == t.before
    finally:
        t.close()
    env = cli_env(home)
    st = subprocess.run(cli(sshd, "status", "--json", "tty3"), env=env, capture_output=True, timeout=60)
    assert b'"running"' in st.stdout, st
    subprocess.run(cli(sshd, "kill", "tty3"), env=env, capture_output=True, timeout=60)


@pytest.mark.timeout(60)
def test_t_without_a_terminal_is_ssh_s_warning_and_tt_forces_one(sshd, home, tmp_path):
    """As ssh: `-t` with piped stdin says a terminal will not be allocated
    and runs without one (the input is piped as usual); `-tt` allocates one
    anyway, and the piped bytes are what is typed there (^D: end of file)."""
    env = cli_env(home)
    check = "test -t 0 && echo TTY || echo NOTTY; cat"
    one = subprocess.run(cli(sshd, "run", "-t", "testhost", check), env=env, input=b"typed\n",
                         capture_output=True, timeout=60)
    assert one.returncode == 0, one
    assert b"Pseudo-terminal will not be allocated because stdin is not a terminal" in one.stderr
    assert one.stdout == b"NOTTY\ntyped\n"
    two = subprocess.run(cli(sshd, "run", "-tt", "testhost", check), env=env, input=b"typed\n\x04",
                         capture_output=True, timeout=60)
    assert two.returncode == 0, two
    assert b"TTY\r\n" in two.stdout and b"typed\r\n" in two.stdout
    assert b"Pseudo-terminal" not in two.stderr


def test_t_with_many_hosts_is_a_usage_error(home):
    r = subprocess.run([sys.executable, "-m", "chaperone.cli", "run", "-t", "-H", "a,b", "--", "top"],
                       env=cli_env(home), capture_output=True, timeout=60)
    assert r.returncode == 2
    assert b"-t goes with one host" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.timeout(60)
def test_library_tty_and_resize(sshd, tmp_path):
    """`start(host, cmd, tty={...})` runs it on a terminal of that size;
    `Run.resize()` is a SIGWINCH with the new size; a detached run on a
    terminal with no input still has one."""
    from chaperone import Chaperone

    async def main():
        ch = Chaperone(home=tmp_path / "home", ssh_config=[str(sshd.config_file)])
        try:
            run = await ch.start("testhost", "trap 'stty size' WINCH; stty size; echo TERM=$TERM; "
                                 "for i in $(seq 100); do sleep 0.1; done",
                                 tty={"rows": 12, "cols": 34, "term": "vt100"})
            await asyncio.get_running_loop().run_in_executor(None, lambda: None)
            got = b""
            for _ in range(100):
                got = await run.read("stdout")
                if b"TERM=" in got:
                    break
                await asyncio.sleep(0.1)
            assert got == b"12 34\r\nTERM=vt100\r\n"
            assert await run.resize(50, 160) is True
            for _ in range(100):
                got = await run.read("stdout")
                if b"50 160" in got:
                    break
                await asyncio.sleep(0.1)
            assert got.endswith(b"50 160\r\n"), got
            await run.signal("SIGKILL")
            await run.wait()
            assert await run.resize(10, 10) is False  # (it ended: nobody reads its terminal)
        finally:
            await ch.close()

    run_async(main(), 60)


def test_the_agent_checks_program_tty():
    agent = load_agent()
    ok = agent.validate_spec({"id": "a", "program": {"argv": ["x"], "tty": {"rows": 2, "cols": 3}}})
    assert ok["program"]["tty"] == {"rows": 2, "cols": 3, "term": None}
    assert agent.validate_spec({"id": "a", "program": {"argv": ["x"]}})["program"]["tty"] is None
    for bad in ({"rows": 0, "cols": 3}, {"rows": 2}, {"rows": 2, "cols": 3, "x": 1}, {"rows": "2", "cols": 3},
                {"rows": 2, "cols": 70000}, {"rows": 2, "cols": 3, "term": 5}, []):
        with pytest.raises(agent.AgentError, match="program.tty"):
            agent.validate_spec({"id": "a", "program": {"argv": ["x"], "tty": bad}})


@pytest.mark.timeout(60)
def test_no_command_is_the_login_shell_as_ssh_host(sshd, home, tmp_path):
    """`chaperone run HOST` with no command, as `ssh HOST`: the login shell,
    on a terminal when this one is one (its exit status is the CLI's);
    with piped input, the shell reads its commands from it, no terminal.
    `run -d HOST` without a command needs -t (a usage error says so)."""
    t = Terminal(cli(sshd, "run", "--spool", tmp_path / "spool", "testhost"), cli_env(home))
    try:
        t.read_until(b"(a terminal there: ~. detaches)")
        t.type(b"test -t 0 && echo on-a-tty; exit 5\r")
        t.read_until(b"on-a-tty")
        assert t.wait() == 5, t.screen
        assert t.settings() == t.before
    finally:
        t.close()
    env = cli_env(home)
    piped = subprocess.run(cli(sshd, "run", "--spool", tmp_path / "spool", "testhost"), env=env,
                           input=b"test -t 0 || echo no-tty; echo from-stdin\n", capture_output=True, timeout=60)
    assert piped.returncode == 0, piped
    assert piped.stdout.endswith(b"no-tty\nfrom-stdin\n"), piped.stdout  # (after what the login scripts print)
    detached = subprocess.run(cli(sshd, "run", "-d", "testhost"), env=env, capture_output=True, timeout=60)
    assert detached.returncode == 2 and b"needs a terminal: chaperone run -d -t testhost" in detached.stderr


@pytest.mark.timeout(90)
def test_a_shell_on_a_terminal_survives_a_dropped_connection(sshd, home, tmp_path):
    """The connection's sshd sessions killed while a shell runs on a
    terminal there: the CLI says so in one line, reconnects, and the same
    shell (same pid, its variables) takes what is typed next; nothing it
    printed is shown twice."""
    t = Terminal(cli(sshd, "run", "--spool", tmp_path / "spool", "testhost"), cli_env(home))
    try:
        t.read_until(b"(a terminal there: ~. detaches)")
        t.type(b"X=kept; echo pid=$$.\r")
        pid = t.read_match(rb"pid=(\d+)\.").group(1)
        assert sshd.kill_sessions(), "no session to kill"
        t.read_until(b"reconnecting")
        t.type(b"echo again=$X:$$.\r")
        t.read_until(b"again=kept:" + pid + b".")
        t.type(b"exit 6\r")
        assert t.wait() == 6, t.screen
        assert t.screen.count(b"pid=" + pid + b".") == 1, t.screen
        assert t.settings() == t.before
    finally:
        t.close()


def test_docker_s_it_is_a_terminal_not_an_identity_file():
    """`chaperone run -it HOST CMD` (docker's habit) reads as -t; ssh's `-i
    FILE` and `-iFILE` stay identity files."""
    from chaperone.cli.options import RUN, SSH, parse_options, split_run

    opts, host, words, _ = split_run(["-it", "gpu1", "bash"], RUN + SSH)
    assert (opts, host, words) == (["-t"], "gpu1", ["bash"])
    assert parse_options(opts, RUN + SSH) == {"tty": [True]}
    opts, host, words, _ = split_run(["gpu1", "-ti", "top"], RUN + SSH)
    assert (opts, host, words) == (["-t"], "gpu1", ["top"])
    opts, host, _, _ = split_run(["-i", "key", "-ikey2", "gpu1", "true"], RUN + SSH)
    assert parse_options(opts, RUN + SSH) == {"identity": ["key", "key2"]} and host == "gpu1"


def test_a_terminal_s_end_is_no_sighup_for_the_program(tmp_path):
    """The terminal's master side is read to its end (EIO: its last user
    closed it) before the program is reaped; closing it then hung the
    terminal up, and a program still on its way out got a SIGHUP: about 2
    runs in 100 of `cat` given `typed\\n^D` ended "killed by SIGHUP".  80
    such runs (one batched start) all exit 0; and the supervisor keeps the
    master open until close_spool."""
    import base64
    import json

    from support.helpers import AGENT, load_agent, wait_state

    root = tmp_path / "spool"
    docs = [{"id": "h%d" % i, "program": {"argv": ["test -t 0 && echo TTY; cat"], "shell": True,
                                          "tty": {"rows": 24, "cols": 80},
                                          "stdin": {"data": base64.b64encode(b"typed\n\x04").decode()}}}
            for i in range(80)]
    res = subprocess.run([sys.executable, str(AGENT), "start"], input=json.dumps(docs).encode(),
                         env=dict(os.environ, CHAPERONE_SPOOL=str(root)), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ends = [wait_state(root, d["id"], timeout=30) for d in docs]
    assert [(st["state"], st["return_code"], st["signal"]) for st in ends] == [("done", 0, None)] * 80

    ag = load_agent()
    sup = ag.Supervisor(ag.Run(str(root), "x"), {"id": "x", "config": {}}, None)
    master, slave = os.openpty()
    os.close(slave)
    sup.tty_fd, sup.pipes = master, {master: "stdout"}
    poller = select.poll()
    poller.register(master, select.POLLIN)
    sup.close_pipe(master, poller)
    assert sup.pipes == {} and sup.tty_fd is None
    os.fstat(master)  # (still open)
    sup.close_spool()
    with pytest.raises(OSError):
        os.fstat(master)


@pytest.mark.timeout(60)
def test_t_with_json_on_a_terminal_is_a_usage_error(home):
    """`run -t --json` from a terminal: the screen and a JSON object cannot
    share stdout; a one-line usage error saying what works (-d -t --json)."""
    t = Terminal([sys.executable, "-m", "chaperone.cli", "run", "-t", "--json", "local", "--", "true"],
                 cli_env(home))
    try:
        assert t.wait() == 2, t.screen
        assert b"-t and --json do not go together" in t.screen and b"Traceback" not in t.screen
        assert t.settings() == t.before
    finally:
        t.close()


@pytest.mark.timeout(60)
def test_capital_t_wins_over_t(home):
    """`run -t -T` on a terminal: no terminal there (as ssh, -T wins), the
    program reads /dev/null, and this terminal is never put in raw mode."""
    t = Terminal([sys.executable, "-m", "chaperone.cli", "run", "-t", "-T", "local", "--", "sh", "-c",
                  "test -t 0 || echo no-tty-there"], cli_env(home))
    try:
        assert t.wait() == 0, t.screen
        assert b"no-tty-there" in t.screen and b"~. detaches" not in t.screen
        assert t.settings() == t.before
    finally:
        t.close()
