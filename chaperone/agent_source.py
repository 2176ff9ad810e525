"""The agent file shipped to hosts: its bytes and content hash."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: Python source that runs the agent file ``sys.argv[0]`` with the
#: arguments ``sys.argv[1:]`` (each bootstrap sets sys.argv so first): loaded
#: as a module, so that its bytecode is cached (a hash-checked ``.pyc``)
#: instead of compiled at every call (``importlib.machinery``'s loader:
#: ``importlib.util`` costs ~6 ms more); its exit status without the
#: interpreter's teardown (~8 ms): what sys.stdout/sys.stderr hold is
#: flushed (a failed flush is status 120, as at a normal exit), then
#: ``os._exit``.
RUN_AGENT = (
    "from importlib.machinery import SourceFileLoader\n"
    "_m=type(sys)('chaperone_agent')\n"
    "_m.__file__=sys.argv[0]\n"
    "SourceFileLoader('chaperone_agent',_m.__file__).exec_module(_m)\n"
    "_c=_m.main()\n"
    "try:\n"
    "    sys.stdout.flush()\n"
    "    sys.stderr.flush()\n"
    "except Exception:\n"
    "    _c=120\n"
    "import os\n"
    "os._exit(_c)\n"
)


@functools.lru_cache(maxsize=1)
def agent_path() -> Path:
    """``remote/agent.py``: in the wheel it is ``chaperone/_remote/agent.py``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_remote" / "agent.py", here.parent / "remote" / "agent.py"):
        if candidate.is_file():
            return candidate
    try:  # an installed wheel maps remote/ to the chaperone._remote package
        from importlib.resources import files

        path = Path(str(files("chaperone._remote").joinpath("agent.py")))
        if path.is_file():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    raise FileNotFoundError("the chaperone agent (remote/agent.py) is missing from this install")


@functools.lru_cache(maxsize=1)
def agent_bytes() -> bytes:
    return agent_path().read_bytes()


@functools.lru_cache(maxsize=1)
def agent_hash() -> str:
    return hashlib.sha256(agent_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def agent_module():
    """``remote/agent.py`` loaded as a module (stdlib only, bytecode cached):
    the library validates program.json with the agent's own validator, which
    tests prove equal to ``chaperone.models`` (and is much faster to import
    than pydantic)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaperone._agent", agent_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
