"""The ``chaperone`` command: small click commands over :mod:`chaperone.api`.

Every command and option is documented in docs/cli.md.  Exit status of
``run`` and ``wait``: the program's own; ``128+N`` when it was killed by
signal N; 127 (not found) or 126 (not executable) when it could not be
started; 255 when chaperone itself failed or lost the run (as ssh); 2 for
bad usage; 4 for an unknown run id.

This package's ``__init__`` and :mod:`.options` are light (no click): the
head start (``chaperone.__main__``) reads the command line with them
before anything heavy is loaded; the click application is :mod:`.app`.
"""


def application():
    """The click group with every command on it."""
    from ..serve.command import serve
    from . import attach, manage, run  # noqa: F401 - the commands register themselves on app.cli
    from .app import cli

    if "serve" not in cli.commands:
        cli.add_command(serve)
    return cli


def main() -> None:
    application().main(prog_name="chaperone")


def __getattr__(name):
    if name == "cli":
        return application()
    raise AttributeError(name)
