"""The head start's direct agent calls: one command line, one run on a
host reached with OpenSSH, one ``ssh`` call made here, before click,
asyncio, pydantic or the library load (each is tens of milliseconds of
imports on the way of a call that takes a round trip).

* ``chaperone logs ID > file``: see chaperone/cli/fastlogs.py.
* ``chaperone status [--json] ID``: the agent's ``status ID``, the record
  updated with what it says, printed as the normal path prints it
  (display.status_table, or the RunInfo object).

Only the plain case: ``[-F CFG]... COMMAND [FLAGS] ID``, the exact id of a
run recorded here that reached its host, no server running.  Anything else,
or a call that fails (no such run, the agent not on the host yet, no
connection), returns to the normal path before anything is printed, which
then does (and says) what it always did.  ``CHAPERONE_FAST_CALLS=0`` turns
them off.
"""

import os
import sys

OFF = ("0", "off", "no", "false")


def plan(argv, command, flags=()):
    """(record, target, flags given) for ``[-F CFG]... COMMAND [FLAGS] ID``
    naming a remote run recorded here; else None."""
    if os.environ.get("CHAPERONE_FAST_CALLS", "").lower() in OFF:
        return None
    configs, i = [], 0
    while argv[i:i + 1] == ["-F"] and i + 1 < len(argv):
        configs.append(argv[i + 1])
        i += 2
    if argv[i:i + 1] != [command]:
        return None
    rest = argv[i + 1:]
    given = [a for a in rest if a in flags]
    ids = [a for a in rest if a not in flags]
    if len(ids) != 1 or ids[0].startswith("-"):
        return None
    from ..records import Records, chaperone_home

    home = chaperone_home()
    if (home / "serve" / "server.json").exists() or not (home / "runs.db").exists():
        return None
    records = Records(home / "runs.db")
    try:
        rec = records.get(ids[0])
    finally:
        records.close()
    from ..transports.target import Target, is_local

    if rec is None or is_local(rec.host) or rec.state in ("starting", "unknown", "failed"):
        return None
    target = Target.from_description(rec.transport)
    if configs:
        target = target.replace(config=tuple(configs))
    if len(target.config) > 1:
        return None
    return rec, target, given


def ssh_argv(target, args):
    """``ssh ... HOST`` running the agent with ``args`` (as the OpenSSH
    transport would), or None where this is not the SSH client in use."""
    from ..transports.ssh import options
    from ..transports.ssh.remote import agent_command

    ssh = options.ssh_binary()
    if ssh is None or options.default_client() != "openssh":
        return None
    command = agent_command(target.python or "python3", target.spool, args)
    return options.direct_argv(options.ssh_options(ssh, target), target.destination, command,
                               not options.multiplexes_itself(target.config))


def ssh_failed(target, code, stderr):
    """The error of an ``ssh`` that exited 255 before the agent answered,
    as the normal path would report it; None to hand the call to the
    normal path instead (any other status, or a failure worth retrying,
    which it retries: a connection dropped before login)."""
    from ..transports.ssh.failures import SSH_FAILED, ssh_error

    if code != SSH_FAILED:
        return None
    error = ssh_error(target, stderr, False)
    return None if getattr(error, "retry_safe", False) else error


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def say(text):
    """One line on stderr."""
    try:
        write_all(2, (text + "\n").encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def attempt(argv, command, flags, call) -> None:
    """``call(record, target, flags given)`` for ``[-F CFG]... COMMAND
    [FLAGS] ID`` (see :func:`plan`), then exit with its status; return
    (for the normal path) where the plan or the call gives None, or the
    call fails before it decided."""
    try:
        planned = plan(argv, command, flags)
        code = None if planned is None else call(*planned)
    except KeyboardInterrupt:
        code = 130
    except Exception:
        return
    finish(code)


def new_marker():
    return "CHAPERONE-" + os.urandom(8).hex()


def finish(code):
    """Exit now with ``code`` (None: return, for the normal path)."""
    if code is None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _read_all(pipes):
    """Everything the pipes hold until each is closed."""
    import select

    data = {p: [] for p in pipes}
    open_ = list(pipes)
    while open_:
        ready, _, _ = select.select(open_, [], [])
        for p in ready:
            chunk = os.read(p.fileno(), 65536)
            if chunk:
                data[p].append(chunk)
            else:
                open_.remove(p)
    return tuple(b"".join(data[p]) for p in pipes)


def status_attempt(argv) -> None:
    """``chaperone status [--json] ID``: print and exit, or return."""
    attempt(argv, "status", ("--json",), _status)


def _status(rec, target, flags):
    import json

    from ..transports.ssh.process import DEVNULL, PIPE, close_fd, watched

    marker = new_marker()
    argv = ssh_argv(target, ["--marker", marker, "status", rec.id])
    if argv is None:
        return None
    proc, lifeline = watched(argv, stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
    try:
        # (a few hundred bytes; no deadline, as the normal path's `status
        # ID` has none: ssh's ConnectTimeout and keepalives bound a dead host)
        out, err = _read_all((proc.stdout, proc.stderr))
        code = proc.wait()
    finally:
        close_fd(lifeline)  # (the watchdog ends ssh if it still runs)
    needle = b"\n" + marker.encode() + b"\n"
    at = out.find(needle)
    failed = ssh_failed(target, code, err) if at < 0 else None
    if failed is None and (code != 0 or at < 0):
        return None  # (the normal path says why, or ships the agent)
    from ..records import Records, chaperone_home

    records = Records(chaperone_home() / "runs.db")
    try:
        if failed is None:
            state = json.loads(out[at + len(needle):])
            if not isinstance(state, dict) or state.get("id") != rec.id or not isinstance(state.get("state"), str):
                return None
            records.update(rec.id, state)
        info = records.get(rec.id).info()
    finally:
        records.close()
    from .display import print_json, status_table

    if failed is not None:  # (as the normal path: the error, then the run as last seen)
        say("chaperone: run %s: %s" % (rec.id, failed))
    if flags:
        print_json(info)
    else:
        sys.stdout.write(status_table([info], {rec.id} if failed is not None else None) + "\n")
    if failed is None:
        return 0
    from ..errors import ConnectionLost

    # (docs/cli.md: 1 when a host could not be reached, as the normal path)
    return 1 if getattr(failed, "transient", False) or isinstance(failed, ConnectionLost) else failed.exit_code
