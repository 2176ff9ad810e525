"""The click application: the ``chaperone`` group and the helpers its
commands share.  The commands (:mod:`.run`, :mod:`.manage`, ``serve``)
register themselves on it; :func:`chaperone.cli.application` loads them.

Every command and option is documented in docs/cli.md.  Exit status of
``run`` and ``wait``: the program's own; ``128+N`` when it was killed by
signal N; 127 (not found) or 126 (not executable) when it could not be
started; 255 when chaperone itself failed or lost the run (as ssh); 2 for
bad usage; 4 for an unknown run id.

Heavy modules (asyncio, pydantic, asyncssh) are imported inside the commands,
so ``chaperone --help`` starts fast.
"""

from __future__ import annotations

import sys

import click

from .options import SSH, Opt, arity, ssh_settings

EXIT_FAILURE = 255
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


#: The command being run ("chaperone run"), for the help hint of a usage
#: error raised after click's context is gone.
_COMMAND = ["chaperone"]


def fail(message: str, code: int = EXIT_FAILURE):
    """One line on stderr, then exit ``code``.  A usage error (2) ends by
    saying where help is, as click's own do."""
    if code == 2 and "(Try '" not in message:
        ctx = click.get_current_context(silent=True)
        message = "%s (Try '%s --help'.)" % (message.rstrip("."), ctx.command_path if ctx else _COMMAND[-1])
    click.echo("chaperone: %s" % message, err=True)
    sys.exit(code)


def add_options(table):
    """Click options from a table of :class:`~chaperone.cli.options.Opt`."""
    def decorate(f):
        for opt in reversed(table):
            if opt.value:
                f = click.option(*opt.flags, opt.dest, multiple=opt.multiple, metavar=opt.metavar,
                                 help=opt.help)(f)
            elif opt.count:
                f = click.option(*opt.flags, opt.dest, count=True, help=opt.help,
                                 callback=_verbose if opt.dest == "verbose" else None)(f)
            else:
                f = click.option(*opt.flags, opt.dest, is_flag=True, help=opt.help)(f)
        return f
    return decorate


def _verbose(ctx, param, value):
    """``-v``: how much the SSH clients say, for this whole process."""
    if value:
        from ..transports.ssh.options import set_verbose

        set_verbose(value)
    return value


def _kill_values():
    """kill's options that take a value: its own and the SSH ones (from
    the one table of options)."""
    return {"-s", "--signal", "--grace"} | {flag for flag, takes in arity(SSH).items() if takes}


def _kill_flag(arg: str) -> str:
    """kill(1)'s habit: ``kill -9 ID``, ``kill -KILL ID``, ``kill -SIGINT ID``
    are ``kill -s N ID`` (one word, so that ``-s9`` is click's)."""
    name = arg[1:]
    if not arg.startswith("-") or arg.startswith("--") or len(name) < 1:
        return arg
    if name.isdigit():  # (any number: a bad one is then "unknown signal", not "no such option -9")
        return "-s" + name
    if len(name) >= 3 and name == name.upper() and name.replace("+", "").replace("-", "").isalnum() \
            and name[0].isalpha():
        return "-s" + name  # (-KILL, -SIGINT, -BOGUS: a signal name, known or not)
    return arg


def chaperone_for(params: dict, **kw):
    """The Chaperone a command works with: the ssh config files (``-F``
    before the command and on it), host key checking, and the SSH options
    given on the command line, which also win over a recorded run's."""
    from ..api import Chaperone

    ctx = click.get_current_context()
    configs = list(ctx.find_root().params.get("ssh_config") or ()) + list(params.get("ssh_config") or ())
    settings = ssh_settings(params)
    if configs:
        settings["config"] = tuple(configs)
    if params.get("no_host_key_check"):
        settings["check_host_keys"] = False
    return Chaperone(ssh_config=configs or None, python=params.get("python"),
                     check_host_keys=not params.get("no_host_key_check"), overrides=settings, **kw)


def run_async(params: dict, coro_fn, **kw):
    """Run ``coro_fn(ch)`` with a Chaperone; every error is one line."""
    import asyncio

    async def main():
        ch = chaperone_for(params, **kw)
        try:
            return await coro_fn(ch)
        finally:
            records, ch._records = ch._records, None
            if records is not None:
                leave_open(records)
            await ch.close()

    return guarded(lambda: asyncio.run(main()))


#: Records left open until the process ends (see :func:`leave_open`).
_OPEN: list = []


def leave_open(records) -> None:
    """Keep ``records`` open until the process ends instead of closing them
    now.  Closing SQLite's last connection checkpoints the WAL into the
    database and deletes it (fsyncs: about 10 ms here, at the end of every
    command), and the next command to write makes it again; left open, the
    ``chaperone`` entry point ends with ``os._exit`` (chaperone.__main__)
    and the WAL stays, part of the database as after any exit.  SQLite
    still checkpoints it as it grows (every 1,000 pages)."""
    _OPEN.append(records)


def _broken_pipe():
    """Nothing reads the output any more (``| head``): exit 141 (SIGPIPE's
    status), at once.  (An exit through the interpreter's clean-up would
    collect the SSH client's subprocess transport after its event loop
    closed, and Python prints "Exception ignored ... Event loop is closed"
    with a traceback on stderr.)"""
    import os

    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(141)


def guarded(fn):
    """``fn()`` with run_async's rule for errors (one line, never a
    traceback), for a command's part that needs no event loop."""
    from ..errors import ChaperoneError

    try:
        return fn()
    except ChaperoneError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        _broken_pipe()
    except OSError as e:
        fail(_os_error(e))
    except ValueError as e:
        fail(str(e) or type(e).__name__)
    except Exception as e:  # never a traceback: one line, and how to see more
        fail("internal error: %s: %s (please report it)" % (type(e).__name__, e))


def served_call(fn):
    """``fn()`` (a command through ``chaperone serve``), its errors as one
    line: the same rule as every command (:func:`guarded`)."""
    return guarded(fn)


def _os_error(e: OSError) -> str:
    import errno

    if e.errno == errno.ENOSPC:
        return "no space left on this machine's disk%s: free some, then try again (nothing spooled is lost)" % (
            " (%s)" % e.filename if e.filename else "")
    return "%s%s" % (e.strerror or e, ": %s" % e.filename if e.filename else "")


class Group(click.Group):
    """One-line usage errors that say how to get help; no tracebacks."""

    def main(self, args=None, **kw):
        try:
            return super().main(args=args, standalone_mode=False, **kw)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            sys.exit(130)
        except click.ClickException as e:
            message = e.format_message()
            if isinstance(e, click.UsageError):
                if type(e).__name__ == "NoArgsIsHelpError" or message.startswith("Usage:"):
                    # (no command at all: the help, as docker and git print it)
                    sys.stderr.write(message.rstrip("\n") + "\n")
                    sys.exit(2)
                path = e.ctx.command_path if e.ctx is not None else "chaperone"
                if len(_COMMAND[-1]) > len(path):  # (an option's value missing: click names the group)
                    path = _COMMAND[-1]
                fail("%s (Try '%s --help'.)" % (message.rstrip("."), path), 2)
            fail(message, 1)
        except BrokenPipeError:
            _broken_pipe()
        except Exception as e:  # never a traceback
            from ..errors import ChaperoneError

            if isinstance(e, ChaperoneError):
                fail(str(e), e.exit_code)
            fail("internal error: %s: %s (please report it)" % (type(e).__name__, e))

    def resolve_command(self, ctx, args):
        # docker's words for the same things
        aliases = {"rm": "clean", "inspect": "status", "stop": "kill", "list": "ps", "ls": "ps"}
        if args and args[0] in aliases:
            rest = list(args[1:])
            if args[0] == "inspect" and "--json" not in rest and not any(
                    a in ("-f", "--format") or a.startswith("--format=") for a in rest):
                rest.insert(0, "--json")  # (docker inspect prints JSON)
            if args[0] == "stop":
                # docker stop: SIGTERM, then SIGKILL after -t/--time seconds (10)
                rest = ["--grace" if a in ("-t", "--time") else a for a in rest]
                if "--grace" not in rest and not any(a.startswith("--grace=") for a in rest):
                    rest[:0] = ["--grace", "10"]
                rest[:0] = ["--wait"]  # (docker stop returns once it has stopped)
            args = [aliases[args[0]]] + rest
        if args and args[0] == "kill":
            # (a value of an option is what it is: --grace -1 stays -1)
            values = _kill_values()
            args = ["kill"] + [a if args[i] in values else _kill_flag(a) for i, a in enumerate(args[1:])]
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            _COMMAND.append("%s %s" % (ctx.command_path, command.name))
        return name, command, rest


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="chaperone", message="chaperone %(version)s")
@click.option("-F", "ssh_config", multiple=True, metavar="FILE", help="SSH config file (as ssh -F).")
@click.option("-v", "--verbose", "verbose", count=True, callback=_verbose,
              help="Say how hosts are reached, with ssh's own -v messages (-vv, -vvv: more).")
def cli(ssh_config, verbose):
    """Run programs on this machine or remote hosts over SSH, and never lose them.

    \b
      chaperone run HOST CMD...        run it there (HOST: local, or as for ssh)
      chaperone run -d HOST -- ARGV... start it detached; print its id
      chaperone run -t HOST htop       on a terminal there (as ssh -t); ~. detaches
      chaperone attach ID              back to it (its terminal, its input)
      chaperone ps                     the runs that are running (-a: all)
      chaperone logs -f ID             its output, to the end
      chaperone wait ID                exit with its exit status
      chaperone kill ID                SIGTERM to its whole tree, then SIGKILL

    Shell completion: eval "$(_CHAPERONE_COMPLETE=bash_source chaperone)"
    (zsh_source, fish_source for those shells; see docs/cli.md).
    """


def ssh_options(f):
    """The options that say how to reach a host, for commands that connect."""
    return add_options(SSH)(f)



__all__ = ["cli", "Opt"]
