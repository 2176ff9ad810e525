"""Many hosts from the command line: ``run -H PATTERN``, and group ids and
patterns wherever run ids are taken.  (Placeholder: built on chaperone.fleet.)"""

from __future__ import annotations

from typing import Iterable, List


def run_many(words, exact, params) -> int:
    from .app import fail

    fail("run -H (many hosts) is not available yet", 2)


def expand_ids(ch, run_ids: Iterable[str]) -> List[str]:
    """The run ids meant by ``run_ids`` (each a run id or unique prefix, for now)."""
    return list(run_ids)
