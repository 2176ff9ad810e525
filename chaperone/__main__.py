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

def _guess(argv):
    """The target of the SSH connection this command line will make, or
    None.  It reads the command line with the CLI's own option table
    (chaperone.cli.options), and recorded runs with the records' own code."""
    from .cli import options as o
    from .transports.target import is_local

    configs = []
    i = 0
    while i < len(argv) and argv[i] == "-F" and i + 1 < len(argv):
        configs.append(argv[i + 1])
        i += 2
    if i == len(argv):
        return None
    command, rest = argv[i], argv[i + 1:]
    if command == "run":
        opts, host, words, _ = o.split_run(rest, o.RUN + o.SSH)
        parsed = o.parse_options(opts, o.RUN + o.SSH)
        if parsed is None or host is None or is_local(host) or not words or "hosts" in parsed \
                or "verbose" in parsed:  # (-v: the ssh started here would not be verbose)
            return None
        from .transports.target import Target

        configs += parsed.get("ssh_config", [])
        if len(configs) > 1:
            return None
        settings = o.ssh_settings(parsed)
        return Target.parse(host, config=configs, check_host_keys="no_host_key_check" not in parsed,
                            **settings)
    if command in o.ID_COMMANDS:
        extra = tuple(o.Opt((name,), name) for name in o.ID_VALUES)
        flags = ("-f", "--follow", "--json", "--stdout", "--stderr", "--force", "-a", "-q")
        extra += tuple(o.Opt((name,), name, value=False) for name in flags)
        ids = [a for a in rest if not a.startswith("-")]
        opts = [a for a in rest if a not in ids[:1]]
        parsed = o.parse_options(opts[:len(opts)], o.SSH + extra) if ids else None
        if parsed is None or len(ids) != 1 or "verbose" in parsed:
            return None
        # (an option's value would be taken for the id: only clear cases)
        if any(a in ids for a in sum((v for v in parsed.values() if isinstance(v, list)), [])):
            return None
        from .records import Records, chaperone_home
        from .transports.target import Target

        db = chaperone_home() / "runs.db"
        if not db.exists():
            return None
        records = Records(db)
        try:
            rec = records.get(ids[0])
        finally:
            records.close()
        if rec is None or is_local(rec.host):
            return None
        target = Target.from_description(rec.transport)
        settings = o.ssh_settings(parsed)
        configs += parsed.get("ssh_config", [])
        if configs:
            settings["config"] = tuple(configs)
        if "no_host_key_check" in parsed:
            settings["check_host_keys"] = False
        target = target.replace(**settings) if settings else target
        return None if len(target.config) > 1 else target
    return None


def _speculate(argv) -> None:
    try:
        from .fleet.headstart import speculate_argv

        if speculate_argv(argv):  # run -H: sessions to many hosts
            return
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
    if sys.argv[1:2] == ["run"]:
        try:
            from .cli.fastrun import attempt
        except Exception:
            pass
        else:
            attempt(sys.argv[1:])  # `run local CMD`: runs it and exits, or returns
    elif "logs" in sys.argv[1:4] or "status" in sys.argv[1:4]:
        try:
            from .cli.fastlogs import attempt as deliver
            from .cli.fastcall import status_attempt
        except Exception:
            pass
        else:
            # (one remote run: `logs ID > file`, ssh writes the file; `status ID`,
            # one agent call: each exits, or returns for the normal path)
            deliver(sys.argv[1:])
            status_attempt(sys.argv[1:])
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
