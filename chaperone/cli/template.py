"""``--format TEMPLATE`` (``ps``, ``status``, ``inspect``), the subset of
docker's Go templates its users type, over a run's JSON object
(docs/cli.md has the object):

* ``{{.Field}}``: a field, by its JSON name (``{{.exit_code}}``) or in
  docker's spelling (``{{.ExitCode}}``, ``{{.ID}}``); docker's ``.Names``
  and ``.Name`` are the id, ``.Status`` the state as the table shows it
  (``exited 0``), ``.CreatedAt`` the creation time; a field that is null
  prints nothing; ``{{.argv}}`` and other lists print their items joined by
  spaces;
* ``{{json .}}`` and ``{{json .Field}}``: JSON;
* ``{{upper .Field}}``, ``{{lower .Field}}``;
* a leading ``table``: a header row (the fields' names) and aligned
  columns, as ``docker ps --format 'table {{.ID}}\\t{{.Status}}'``;
* ``\\t`` and ``\\n`` written as two characters are a tab and a newline.

Anything else (``range``, ``if``, pipelines, a field no run has) is a
usage error that lists the fields.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Dict, List, Sequence

from ..errors import UsageError

#: docker's names that are not a JSON field's name in another spelling.
ALIASES = {"names": "id", "name": "id", "createdat": "created", "exitcode": "exit_code",
           "runningfor": "duration", "container": "id", "containerid": "id"}

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)
_FUNCS: Dict[str, Callable[[str], str]] = {"upper": str.upper, "lower": str.lower}


def _key(name: str, fields: Sequence[str]) -> str:
    """The JSON field a template's ``.Name`` means."""
    folded = name.replace("_", "").lower()
    if folded in ALIASES:
        return ALIASES[folded]
    for field in fields:
        if field.replace("_", "").lower() == folded:
            return field
    if folded == "status":
        return "status"
    raise UsageError("--format: no field %r in a run; its fields: %s (or docker's ID, Names, Status, ExitCode, "
                     "CreatedAt)" % (name, ", ".join(sorted(fields))))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


class Template:
    """A parsed ``--format`` template; :meth:`render` fills it for one run."""

    def __init__(self, text: str, fields: Sequence[str], status: Callable[[dict], str]):
        text = text.replace("\\t", "\t").replace("\\n", "\n")
        self.table = text.startswith("table")
        if self.table:
            text = text[len("table"):].lstrip(" ")
        self.parts: List[Any] = []  # str, or (function, key) with key None for "."
        self.status = status
        at = 0
        for m in _ACTION.finditer(text):
            self.parts.append(text[at:m.start()])
            self.parts.append(self._action(m.group(1), fields))
            at = m.end()
        self.parts.append(text[at:])
        if "{{" in text[at:] or "}}" in text[at:]:
            raise UsageError("--format: %r is not closed ({{.Field}})" % text)

    def _action(self, action: str, fields: Sequence[str]):
        words = action.split()
        func = None
        if len(words) == 2 and (words[0] == "json" or words[0] in _FUNCS):
            func, words = words[0], words[1:]
        if len(words) != 1 or not words[0].startswith("."):
            raise UsageError("--format: {{%s}} is not understood: use {{.Field}}, {{json .}}, {{json .Field}}, "
                             "{{upper .Field}} or {{lower .Field}}" % action)
        name = words[0][1:]
        if name == "":
            if func != "json":
                raise UsageError("--format: {{.}} is the whole run: write {{json .}}")
            return func, None
        if "." in name:
            raise UsageError("--format: {{%s}}: a run's fields have no fields of their own" % action)
        return func, _key(name, fields)

    def headers(self) -> List[str]:
        """The header row of a ``table`` template: each column's fields."""
        out, cell = [], []
        for part in self.parts:
            if isinstance(part, str):
                pieces = part.split("\t")
                for piece in pieces[:-1]:
                    cell.append(piece)
                    out.append("".join(cell).strip().upper() or " ")
                    cell = []
                cell.append(pieces[-1])
            else:
                func, key = part
                cell.append((key or "run").upper().replace("_", " "))
        out.append("".join(cell).strip().upper() or " ")
        return out

    def render(self, info: dict) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            func, key = part
            value = info if key is None else (self.status(info) if key == "status" else info.get(key))
            if func == "json":
                out.append(json.dumps(value, sort_keys=True))
            elif func:
                out.append(_FUNCS[func](_text(value)))
            else:
                out.append(_text(value))
        return "".join(out)


def formatted(template: str, infos: Sequence[dict], fields: Sequence[str], status: Callable[[dict], str]) -> str:
    """``infos`` (runs' JSON objects) through ``template``: a line each, or a
    table (header and aligned columns) for ``table ...``."""
    t = Template(template, fields, status)
    lines = [t.render(info) for info in infos]
    if not t.table:
        return "\n".join(lines)
    from .display import table

    headers = t.headers()
    rows = [(line.split("\t") + [""] * len(headers))[:len(headers)] for line in lines]
    return table(rows, headers, width=1 << 30)
