"""The states of a run and the exit status they mean: stdlib only, light
to import (``chaperone ps`` and the fast local ``run`` use it without
loading pydantic); :mod:`chaperone.models` re-exports it."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Optional

#: The states of a run, in one place.  On the host (``state.json``, the
#: agent): ``running``; then ``done`` (it ran and ended: ``return_code``, or
#: ``signal``), ``error`` (the agent could not start it: ``errno``) or
#: ``lost`` (its supervisor is gone without a result).  In local records
#: only, before the host answered a start: ``starting`` (sent, no answer
#: yet), ``unknown`` (the connection broke after the start was sent: the
#: next look at the host decides) and ``failed`` (the start never reached
#: the host, or was refused: nothing ran).  docs/protocol.md explains each.
AGENT_STATES = ("running", "done", "error", "lost")
RECORD_STATES = ("starting", "unknown", "failed")
STATES = ("starting", "running", "unknown", "done", "error", "lost", "failed")
#: States a run never leaves.
FINAL_STATES = ("done", "error", "lost", "failed")
#: The final states an agent writes.
AGENT_FINAL_STATES = tuple(s for s in FINAL_STATES if s in AGENT_STATES)
#: Seconds a ``starting`` record may wait for its start to reach its host:
#: a look at the host (``status``, ``ps``, another process) that does not
#: find the run within them leaves it ``starting`` (its start may still be
#: on its way: connecting, retried); after them it is ``failed``.
START_GRACE = 120.0


def start_in_flight(state: str, created: float, now: float) -> bool:
    """Whether a record in ``state`` made at ``created`` may still have its
    start on its way to the host (not to be settled as ``failed`` yet)."""
    return state == "starting" and now - created < START_GRACE


def exit_code_for(state) -> Optional[int]:
    """The shell-like exit status of a run in ``state`` (a RunState or its
    dict): the program's own code, ``128+N`` when killed by signal N,
    127/126 when it could not be started (not found / not executable, as a
    shell), 255 when chaperone lost it or never started it; None while it
    is not over."""
    get = state.get if isinstance(state, dict) else (lambda k, d=None: getattr(state, k, d))
    name = get("state")
    if name == "done":
        sig = get("signal")
        if sig:
            # signal.Signals[sig], from the C module: `signal` builds its
            # enums at import (the fast `run local` path ends here).
            import _signal

            number = getattr(_signal, sig, None) if isinstance(sig, str) and not sig.startswith("_") and (
                sig.isupper() and sig.startswith("SIG") and not sig.startswith("SIG_")
                or sig.startswith("CTRL_")) else None
            return 128 + number if isinstance(number, int) and not isinstance(number, bool) else 255
        return int(get("return_code") or 0)
    if name == "error":
        import errno

        return 127 if get("errno") in (errno.ENOENT, errno.ENOTDIR) else 126
    if name in ("lost", "failed"):
        return 255
    return None
