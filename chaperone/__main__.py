"""The ``chaperone`` command (and ``python -m chaperone``): the CLI, with a
head start for SSH.

Before anything else is imported, the command line is looked at: when it
will talk to a host over OpenSSH (``run HOST ...``, or ``status``/``logs``/
``wait``/``kill``/``clean ID`` of a run on a remote host), an SSH session
to that host starts in the background (``chaperone.transports.ssh.master.Standby``):
it connects, logs in and waits for its command on stdin.  The handshake
(most of what ``ssh HOST true`` costs) then overlaps Python loading click,
asyncio and the library, and the command's first agent call runs on that
session: no second connection, and no second session set up on it.  The
guess is only a guess: the transport adopts the session only if it was
started with exactly the options it would use itself
(``chaperone.transports.ssh.master.adopt_session``), and a wrong guess costs one
stopped process.  Nothing here may fail the command: any surprise means
no guess.
"""

import os
import sys

#: Options that take a value, and flags, of the subcommands (as in cli.py).
_RUN_VALUES = {"--id", "-e", "--env", "--cwd", "--timeout", "--kill-grace", "--stdin", "-p", "--port", "-l",
               "--login", "-i", "--identity", "--python", "--spool"}
_RUN_FLAGS = {"-d", "--detach", "--json", "--no-host-key-check"}
_ID_COMMANDS = {
    "status": (set(), {"--json"}),
    "logs": (set(), {"-f", "--follow", "--stderr"}),
    "wait": (set(), {"--json"}),
    "kill": ({"-s", "--signal", "--grace"}, set()),
    "clean": (set(), {"--force"}),
}


def _parse(args, values, flags, positionals):
    """(options, positionals) up to ``--`` or the ``positionals``-th
    positional argument; None when something is not understood."""
    opts, pos = {}, []
    i = 0
    while i < len(args) and len(pos) < positionals:
        arg = args[i]
        if arg == "--":
            break
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.partition("=")
            if name in values:
                if not eq:
                    i += 1
                    if i == len(args):
                        return None
                    value = args[i]
                opts.setdefault(name, []).append(value)
            elif name in flags and not eq:
                opts[name] = [True]
            else:
                return None
        else:
            pos.append(arg)
        i += 1
    return opts, pos


def _guess(argv):
    """The target of the SSH connection this command line will make, or None."""
    configs = []
    i = 0
    while i < len(argv) and argv[i] == "-F" and i + 1 < len(argv):
        configs.append(argv[i + 1])
        i += 2
    if i == len(argv) or len(configs) > 1:
        return None
    command, rest = argv[i], argv[i + 1:]
    if command == "run":
        parsed = _parse(rest, _RUN_VALUES, _RUN_FLAGS, 2)
        if parsed is None or not parsed[1] or parsed[1][0] == "local":
            return None
        opts, pos = parsed

        def last(*names):
            found = [v for n in names for v in opts.get(n, [])]
            return found[-1] if found else None

        from .transports.target import Target

        port = last("-p", "--port")
        return Target.parse(
            pos[0], config=configs, port=int(port) if port else None, user=last("-l", "--login"),
            identities=[v for n in ("-i", "--identity") for v in opts.get(n, [])],
            check_host_keys=not last("--no-host-key-check"), python=last("--python"), spool=last("--spool"))
    if command in _ID_COMMANDS:
        parsed = _parse(rest, *_ID_COMMANDS[command], 1)
        if parsed is None or not parsed[1]:
            return None
        from .records import Records, chaperone_home
        from .transports.target import Target

        db = chaperone_home() / "runs.db"
        if not db.exists():
            return None
        records = Records(db)
        try:
            rec = records.get(parsed[1][0])
        finally:
            records.close()
        if rec is None or rec.host == "local":
            return None
        target = Target.from_description(rec.transport)
        return None if len(target.config) > 1 else target
    return None


def _speculate(argv) -> None:
    try:
        guess = _guess(argv)
        if guess is None:
            return
        from .transports.ssh import master, options

        ssh = options.ssh_binary()
        if ssh is None or options.default_client() != "openssh":
            return
        target = guess
        master.speculate_session(options.ssh_options(ssh, target), target.destination,
                                 multiplex=not options.multiplexes_itself(target.config))
    except Exception:
        return


def main() -> None:
    _speculate(sys.argv[1:])
    from .cli import main as cli_main

    try:
        cli_main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write("%s\n" % code)
        code = 1
    # What must happen at exit happens (atexit, buffered output), then the
    # process ends without the interpreter's teardown of every module
    # (about 20 ms here, a tenth of a cold `run`).
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
