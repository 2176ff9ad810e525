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


def main() -> None:
    from .app import cli

    cli.main(prog_name="chaperone")


def __getattr__(name):
    if name == "cli":
        from .app import cli

        return cli
    raise AttributeError(name)
