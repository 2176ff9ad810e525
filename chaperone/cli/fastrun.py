"""``chaperone run local ...`` in the foreground, without click, asyncio or
pydantic: the head start (``chaperone.__main__``) tries it first.

The normal path (``chaperone.cli.run``) starts the agent as a subprocess
(``start --follow``) and reads its frames in an event loop.  Here the same
agent code runs in this process: its validator checks program.json, its
``start_one`` creates the spool and forks the detached supervisor (which
then starts the program exactly as always), and its ``follow`` streams the
spool files, handing each frame to :class:`_Frames`, which writes the output
and records each state as the normal path does.  Same records, output
bytes, exit statuses, messages and Ctrl-C rule (the first sends SIGINT with
the agent's own ``signal`` command, the second detaches: 130).

Only the plain case is taken: ``run local`` with ``--id`` (new ids only),
``-e``, ``--cwd``, ``--timeout``, ``--kill-grace``, ``-q``, ``-n``, ``-T``,
and nothing piped to stdin, no server running.  Anything else, or any
surprise before the run is recorded, returns to the normal path, which then
does (and says) what it always did.  ``CHAPERONE_FAST_RUN=0`` turns this off.
"""

import os
import sys

#: run's options (chaperone.cli.options dests) this path handles.
HANDLED = ("run_id", "env", "cwd", "timeout", "kill_grace", "no_stdin", "no_tty", "quiet")
OFF = ("0", "off", "no", "false")


class _Detach(BaseException):
    """A second Ctrl-C."""


def _write(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _plan(argv):
    """What to run, or None for the normal path."""
    if len(argv) < 3 or argv[0] != "run" or os.environ.get("CHAPERONE_FAST_RUN", "").lower() in OFF:
        return None
    from ..transports.target import is_local
    from . import options as o

    opts, host, words, exact = o.split_run(argv[1:], o.RUN + o.SSH)
    if host is None or not is_local(host) or not words:
        return None
    parsed = o.parse_options(opts, o.RUN + o.SSH)
    if parsed is None or any(k not in HANDLED for k in parsed):
        return None
    if not parsed.get("no_stdin"):
        import stat

        try:
            mode = os.fstat(0).st_mode
        except OSError:
            mode = None
        if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
            return None  # stdin is given to the program: the normal path's business
    if exact:
        argv_, shell = list(words), False
        from ..records import shell_join  # (shlex would load re: ~8 ms)

        display = shell_join(argv_)
    else:
        display = " ".join(words)
        if not display.strip():
            return None
        argv_, shell = [display], True  # (program.shell: the login shell runs it, as api._argv says)
    env = {}
    for pair in parsed.get("env", ()):
        name, sep, value = pair.partition("=")
        if not sep or not name or "\0" in pair:
            return None
        env[name] = value
    config = {}
    if parsed.get("timeout") or parsed.get("kill_grace"):
        from ..errors import UsageError
        from .display import run_limits

        try:
            timeout, grace = run_limits((parsed.get("timeout") or [None])[-1], (parsed.get("kill_grace") or [None])[-1])
        except UsageError:
            return None  # (the normal path says so)
        if grace is not None:
            config["kill_grace"] = grace
        if timeout is not None:
            config["timeout"] = float(timeout)
    cwd = os.path.join(os.getcwd(), os.path.expanduser(parsed["cwd"][-1])) if parsed.get("cwd") else os.getcwd()
    run_id = parsed["run_id"][-1] if parsed.get("run_id") else None
    if not run_id:
        if parsed.get("run_id"):
            return None  # (--id '': the normal path says what it says)
        import time

        run_id = time.strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()  # (api.new_run_id)
    doc = {"id": run_id, "program": {"argv": argv_, "cwd": cwd, "env": env, "stdin": None, "shell": shell},
           "callback": None, "config": config}
    typing = not parsed.get("no_stdin") and os.isatty(0)  # (the program meets /dev/null: as run.py, say so)
    return doc, shell, display, (bool(parsed.get("quiet")), typing)


def attempt(argv) -> None:
    """Run ``chaperone ARGV`` here and end the process, or return (nothing
    done) for the normal path to take it."""
    try:
        plan = _plan(argv)
        if plan is None:
            return
        doc, shell, display, said = plan  # (said: -q, and whether to say there is no terminal)
        from ..agent_source import agent_module
        from ..records import Records, home_dir, use_json
        from ..transports.target import Target

        agent = agent_module()
        use_json(agent.dumps, agent.loads)  # (json's own text, without loading json: see use_json)
        try:
            spec = agent.validate_spec(doc)
        except agent.AgentError:
            return
        home = home_dir()
        if not os.path.isabs(home) or os.path.normpath(home) != home:
            return  # (the normal path spells it as pathlib does)
        if os.path.exists(os.path.join(home, "serve", "server.json")):
            return  # a server may run: the normal path decides
        target = Target.parse("local")
        target = target.replace(spool=os.path.join(home, "spool"))
        root = agent.ensure_root(target.spool)
        before = agent.open_fds()
        db = os.path.join(home, "runs.db")
        records = Records(db)
        if records.exists(spec["id"]):  # (re-attaching: the normal path)
            return
        records.add(spec["id"], target.name, target.describe(), spec["program"]["argv"], command=display,
                    shell=shell, group=None)
        after = agent.open_fds()
        db_fds = []  # (SQLite's: the supervisor must not keep them)
        for fd in (after or ()):
            if before is not None and fd not in before:
                try:
                    if os.readlink("/proc/self/fd/%d" % fd).startswith(db):
                        db_fds.append(fd)
                except OSError:
                    pass
    except Exception:
        return
    # Recorded: from here on this path finishes the run, as the normal one would.
    _finish(agent, records, root, spec, said, db_fds)


def _exit(code):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _say(text):
    try:
        _write(2, (text + "\n").encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def _sorted(agent, state):
    """The state as the normal path records it (through sorted JSON)."""
    return agent.loads(agent.dumps(state, sort_keys=True))


class _Frames:
    """The agent's ``follow`` output, handled here: output to this process's
    stdout/stderr, each state into the records; Ctrl-C's SIGINT sent between
    frames."""

    def __init__(self, agent, records, root, run, supervisor):
        self.agent = agent
        self.root = root
        self.records = records
        self.run = run
        self.supervisor = supervisor  # our child: its exit wakes the wait
        self.state = {}
        self.last = (b"", 1)  # (the output's last byte, and the fd it went to)
        self.interrupts = 0
        self.pending = False
        self._pidfd = None

    def frame(self, kind, offset, data):
        if kind == b"1":
            _write(1, data)
        elif kind == b"2":
            _write(2, data)
        if kind in (b"1", b"2") and data:
            self.last = (bytes(data[-1:]), int(kind))
        elif kind == b"S":
            self.state = self.agent.loads(data.decode("utf-8"))
            self.records.update(self.run.id, self.state)
        if self.pending:
            self.send_sigint()

    def wake_on(self, run):
        """The agent's follow asks its output to wake when a file of the run
        is written (an inotify descriptor, through ctypes); not here: loading
        ctypes made `run local -- true` slower (0.154 s against 0.086 s
        median), and the supervisor's pidfd already ends the wait at the end.
        Output waits for the follow's next look."""

    def close(self):
        if self._pidfd is not None and self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = None

    def idle(self, seconds):
        """Wait ``seconds``, or less: the supervisor (our child) exiting ends it."""
        if self.pending:
            self.send_sigint()
        if self.supervisor is not None:
            if self._pidfd is None:
                try:
                    self._pidfd = os.pidfd_open(self.supervisor)
                except (AttributeError, OSError):
                    self._pidfd = -1
            if self._pidfd >= 0:
                import select

                poll = select.poll()
                poll.register(self._pidfd, select.POLLIN)
                if poll.poll(seconds * 1000.0):
                    try:
                        os.waitpid(self.supervisor, os.WNOHANG)  # (no zombie left)
                    except ChildProcessError:
                        pass
                    os.close(self._pidfd)
                    self._pidfd = -1
                    self.supervisor = None
                return
        import time

        time.sleep(seconds)

    def on_sigint(self, signum, frame):
        self.interrupts += 1
        if self.interrupts == 1:
            _say("\nchaperone: sending SIGINT to run %s (Ctrl-C again to detach)" % self.run.id)
            self.pending = True
        else:
            raise _Detach()

    def send_sigint(self):
        """The agent's ``signal ID SIGINT``, as ``chaperone kill`` sends it;
        its answer recorded."""
        self.pending = False
        agent = self.agent
        replies = []

        class Reply(object):
            def __init__(self, marker):
                pass

            def json(self, obj):
                replies.append(obj)

        class Args(object):
            root, id, signal, grace = self.root, self.run.id, "SIGINT", None

        saved, agent.Output = agent.Output, Reply
        try:
            agent.cmd_signal(Args, None)
        except agent.AgentError as e:
            _say("chaperone: could not send SIGINT: %s" % agent.one_line(e))
        except OSError as e:
            _say("chaperone: could not send SIGINT: %s" % agent.one_line(e))
        finally:
            agent.Output = saved
        if replies:
            self.records.update(self.run.id, _sorted(agent, replies[-1]))


#: The hint of run.py for a program that would read this terminal (the same words).
NO_TERMINAL = " (no terminal there: stdin is /dev/null; -t gives it this terminal, --stdin - what you type)"


def _finish(agent, records, root, spec, said, db_fds):
    """Start the recorded run, stream it to its end, exit with its status.

    The records are not closed at the end: closing the last connection
    checkpoints SQLite's WAL into the database and deletes it (two fsyncs,
    about 10 ms here), and the next process to write makes it again (as
    much again).  What was committed is in the WAL, which SQLite reads as
    part of the database, as after any process's exit."""
    import _signal as signal  # (the C module: `signal` builds its enums at import)

    run_id = spec["id"]
    quiet, typing = said
    try:
        if not quiet and sys.stderr.isatty():
            _say("chaperone: run %s on local%s" % (run_id, NO_TERMINAL if typing else ""))
        try:
            run, claimed = agent.claim(root, spec)
            if claimed:
                agent.prepare_fork()
                st = agent.started_state(run, agent.spawn(run, spec, close=db_fds))
            else:
                st = agent.wait_for_start(run.require())
        except (agent.AgentError, OSError) as e:
            # (as the normal path records and says a start the agent refused)
            message = agent.one_line(e)
            records.mark(run_id, "failed", message)
            _say("chaperone: %s" % message)
            _exit(255)
        supervisor = st.get("agent_pid") if claimed and st.get("state") == "running" else None
        records.update(run_id, _sorted(agent, st))
        frames = _Frames(agent, records, root, run, supervisor)
        signal.signal(signal.SIGINT, frames.on_sigint)
        try:
            agent.follow(run, frames, {"stdout": 0, "stderr": 0}, st)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        state = frames.state
        from ..states import exit_code_for

        from .display import end_note, mid_line

        note = end_note(run_id, state)
        if note:
            _say(("\n" if mid_line(*frames.last) else "") + note)
        code = exit_code_for(state)
    except _Detach:
        from .display import detached_note

        _say("\n" + detached_note(run_id))
        code = 130
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 141
    except agent.AgentError as e:
        _say("chaperone: %s" % agent.one_line(e))
        code = 255
    except OSError as e:
        _say("chaperone: %s%s" % (e.strerror or e, ": %s" % e.filename if e.filename else ""))
        code = 255
    except Exception as e:  # never a traceback
        _say("chaperone: internal error: %s: %s (please report it)" % (type(e).__name__, e))
        code = 255
    _exit(code if code is not None else 255)
