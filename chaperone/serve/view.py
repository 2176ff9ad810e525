"""One run as the API shows it: ONE JSON object made by ONE function.

Every route and every event that shows a run calls :func:`run_view` (the
lead will turn it into the pydantic model of every ``--json``).
"""

from __future__ import annotations

import datetime
from typing import Mapping, Optional

from ..api import exit_code_for
from .files import now_iso

#: States after which a run changes no more.  ``failed``: its start failed
#: (chaperone could not reach the host or the agent refused it).
FINAL = ("done", "error", "lost", "failed")
#: Every state a run can be in, as records and agents name them.
STATES = ("starting", "running", "unknown") + FINAL

#: The fields of a run view, in order (docs/api.md documents each).
FIELDS = ("id", "host", "command", "argv", "state", "exit_code", "return_code", "signal", "timed_out", "error",
          "created", "start_time", "end_time", "duration", "stdout_bytes", "stderr_bytes", "pid", "last_heard",
          "silent", "group")


def _parse_time(text) -> Optional[float]:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def run_view(record, state: Optional[Mapping], *, held: Mapping[str, int], last_heard: Optional[float],
             silent: bool, now: float) -> dict:
    """The run ``record`` (a :class:`chaperone.records.Record`) with its
    latest known ``state`` (state.json as a dict, or None before the first
    one), the bytes of output the server ``held`` per stream, when its agent
    was ``last_heard`` from (epoch seconds, None: not since this server
    started) and whether its host is ``silent``."""
    st = dict(state or record.last or {})
    name = st.get("state") or record.state
    if record.state in FINAL and name not in FINAL:
        name = record.state  # marked lost or failed here, after its last state
    final = name in FINAL
    if name == "failed":
        exit_code = 255  # chaperone could not start it, as ssh's 255
    elif final:
        exit_code = exit_code_for(st) if st else 255
    else:
        exit_code = None
    start = _parse_time(st.get("start_time"))
    end = _parse_time(st.get("end_time"))
    if start is None:
        duration = None
    elif end is not None:
        duration = max(0.0, end - start)
    elif final:
        duration = None  # ended, but when is not known
    else:
        duration = max(0.0, now - start)
    return {
        "id": record.id,
        "host": record.host,
        "command": record.command,
        "argv": list(record.argv),
        "state": name,
        "exit_code": exit_code,
        "return_code": st.get("return_code"),
        "signal": st.get("signal"),
        "timed_out": bool(st.get("timed_out", False)),
        "error": st.get("error") if st.get("error") is not None else record.error,
        "created": now_iso(record.created),
        "start_time": st.get("start_time"),
        "end_time": st.get("end_time"),
        "duration": None if duration is None else round(duration, 3),
        "stdout_bytes": max(int(held.get("stdout", 0)), int(st.get("stdout_bytes") or 0)),
        "stderr_bytes": max(int(held.get("stderr", 0)), int(st.get("stderr_bytes") or 0)),
        "pid": st.get("pid"),
        "last_heard": None if last_heard is None else now_iso(last_heard),
        "silent": bool(silent) and not final,
        "group": None,
    }
