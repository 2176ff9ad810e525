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

#: The fields of a run view (chaperone.models.RunInfo; docs/cli.md documents each).
FIELDS = ("id", "host", "command", "argv", "state", "exit_code", "return_code", "signal", "timed_out", "error",
          "created", "start_time", "end_time", "duration", "stdout_bytes", "stderr_bytes", "pid", "remote_host",
          "spool", "last_seen", "silent", "group")


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
    started) and whether its host is ``silent``: the one object of a run
    (:class:`chaperone.models.RunInfo`, as every ``--json`` of the CLI)."""
    st = dict(state or record.last or {})
    name = st.get("state") or record.state
    if record.state in FINAL and name not in FINAL:
        name = record.state  # marked lost or failed here, after its last state
    view = record.info()
    if name != view["state"] or st:
        final = name in FINAL
        view.update(state=name, return_code=st.get("return_code") if name == "done" else None,
                    signal=st.get("signal") if name == "done" else None,
                    timed_out=bool(st.get("timed_out", False)) if name == "done" else False,
                    start_time=st.get("start_time"), end_time=st.get("end_time"), pid=st.get("pid"),
                    remote_host=st.get("host"), spool=st.get("spool"))
        if name == "failed":
            view["exit_code"] = 255  # chaperone could not start it, as ssh's 255
        elif final:
            view["exit_code"] = exit_code_for(st) if st else 255
        else:
            view["exit_code"] = None
        if st.get("error") is not None:
            view["error"] = st["error"]
    start, end = _parse_time(view["start_time"]), _parse_time(view["end_time"])
    if start is None:
        duration = None
    elif end is not None:
        duration = max(0.0, end - start)
    elif name in FINAL:
        duration = None  # ended, but when is not known
    else:
        duration = max(0.0, now - start)
    view["duration"] = None if duration is None else round(duration, 3)
    view["stdout_bytes"] = max(int(held.get("stdout", 0)), int(st.get("stdout_bytes") or 0))
    view["stderr_bytes"] = max(int(held.get("stderr", 0)), int(st.get("stderr_bytes") or 0))
    if last_heard is not None:
        view["last_seen"] = now_iso(last_heard)
    view["silent"] = bool(silent) and name not in FINAL
    return view
