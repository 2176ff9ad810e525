"""chaperone: run programs on remote hosts over SSH and never lose them.

The library is the product; the ``chaperone`` command is a thin shell over it.
Imports are lazy so that ``import chaperone`` (and the CLI) start fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "build_command": "chaperone.command",
    "build_program": "chaperone.command",
    "Chaperone": "chaperone.api",
    "Run": "chaperone.api",
    "ChaperoneError": "chaperone.errors",
    "Process": "chaperone.models",
    "ProgramSpec": "chaperone.models",
    "RunState": "chaperone.models",
}

__all__ = ["Chaperone", "ChaperoneError", "Process", "ProgramSpec", "Run", "RunState", "__version__",
           "build_command", "build_program"]  # (as a literal: type checkers read it; test_packaging checks it)

TYPE_CHECKING = False
if TYPE_CHECKING:  # (for type checkers: the names as they are, re-exported; at run time, loaded when first used)
    from .api import Chaperone as Chaperone, Run as Run
    from .command import build_command as build_command, build_program as build_program
    from .errors import ChaperoneError as ChaperoneError
    from .models import Process as Process, ProgramSpec as ProgramSpec, RunState as RunState


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'chaperone' has no attribute %r" % name)
    import importlib

    return getattr(importlib.import_module(module), name)
