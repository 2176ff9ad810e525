"""``Scheduler``: the name of :class:`chaperone.Chaperone` with push
updates in earlier versions.  ``Scheduler(...)`` is ``Chaperone(push=True,
...)``; everything is documented there."""

from __future__ import annotations

from typing import Optional, Sequence

from .api import Chaperone, Run

__all__ = ["Scheduler"]


class Scheduler(Chaperone):
    """``Chaperone(push=True)``: each agent calls back over HTTPS."""

    def __init__(self, home=None, **kw):
        kw.setdefault("push", True)
        super().__init__(home, **kw)

    async def start(self, host, argv: Optional[Sequence[str]] = None, *, command: Optional[str] = None,
                    **kw) -> Run:
        """:meth:`Chaperone.start` with ``argv`` or ``command=`` (a shell command line)."""
        if (argv is None) == (command is None):
            raise ValueError("give either argv or command")
        return await super().start(host, command if command is not None else argv, **kw)
