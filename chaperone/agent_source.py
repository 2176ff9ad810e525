"""The agent file shipped to hosts: its bytes and content hash."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


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
