"""The wire format, defined once.

* :class:`ProgramSpec` is ``program.json``: what the agent reads on stdin.
* :class:`RunState` is ``state.json``: what the agent writes in the spool and
  prints on stdout.
* :class:`OutputAck` is the scheduler's answer to an output callback.

``remote/agent.py`` mirrors these in plain dicts (it is stdlib-only);
``tests/library/test_protocol.py`` proves that the two agree, and
``docs/protocol.md`` documents them with their JSON Schema
(``python -m chaperone.models`` prints it).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .protocol import STREAMS  # noqa: F401 - part of the wire format, re-exported

PROTOCOL_VERSION = 1

#: A run id: starts with a letter or digit, then letters, digits, ``._-``;
#: never ``/`` nor ``..``.  The agent uses the same pattern.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)



def check_run_id(value: str) -> str:
    if not isinstance(value, str) or not _RUN_ID_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid run id {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)


class StdinPath(_Strict):
    """The program reads this file on the agent's host."""

    path: str


class StdinData(_Strict):
    """The program reads these bytes (base64), copied into the spool first."""

    data: str

    @field_validator("data")
    @classmethod
    def _base64(cls, v: str) -> str:
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        return v


class StdinStream(_Strict):
    """The program reads its input as it comes: the client appends it to
    the spool (agent command ``stdin``), the supervisor feeds it to the
    program's pipe as it grows, and closes the pipe once the client says
    the input ended (one end of file)."""

    stream: Literal[True]


class Tty(_Strict):
    """The program runs on a pseudo-terminal on the host (as under ``ssh
    -t``): its stdin, stdout and stderr are that terminal, its controlling
    terminal; what it writes is spooled as stdout (stderr stays empty);
    its input (``stdin``) is what is typed into the terminal."""

    #: The window's size (the agent's ``control`` op ``resize`` changes it).
    rows: int = Field(ge=1, le=65535)
    cols: int = Field(ge=1, le=65535)
    #: TERM for the program (unless ``env`` sets one), as ssh passes the client's.
    term: Optional[str] = None


def _no_nul(v: str, what: str) -> str:
    if "\0" in v:
        raise ValueError("%s contains a NUL character" % what)
    return v


class Program(_Strict):
    #: The program and its arguments, executed directly; with ``shell``,
    #: exactly one string: the command line.
    argv: List[str] = Field(min_length=1)
    #: Working directory; ``null`` means the agent's home directory.
    cwd: Optional[str] = None
    #: Variables to set (a string) or unset (``null``).
    env: Dict[str, Optional[str]] = Field(default_factory=dict)
    #: Inherit the agent's environment: all of it (true), none (false),
    #: or only the named variables.
    env_inherit: Union[bool, List[str]] = True
    stdin: Union[None, StdinPath, StdinData, StdinStream] = None
    umask: Optional[int] = Field(default=None, ge=0, le=0o777)
    #: ``argv`` is one shell command line, run as sshd runs a command: by
    #: the login shell of the agent's user (its passwd entry's shell, else
    #: ``/bin/sh``) as ``SHELL -c LINE``.
    shell: bool = False
    #: A terminal on the host (:class:`Tty`); null: none (pipes or files).
    tty: Optional[Tty] = None

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: List[str]) -> List[str]:
        if v and v[0] == "":
            raise ValueError("empty program name")
        for arg in v:
            _no_nul(arg, "argument")
        return v

    @model_validator(mode="after")
    def _shell_line(self) -> "Program":
        if self.shell and len(self.argv) != 1:
            raise ValueError("argv: a shell command (shell: true) is exactly one string, the command line")
        return self

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else _no_nul(v, "cwd")

    @field_validator("env")
    @classmethod
    def _env(cls, v: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
        for name, value in v.items():
            if name == "" or "=" in name or "\0" in name:
                raise ValueError("invalid variable name %r" % name)
            if value is not None:
                _no_nul(value, "value of %s" % name)
        return v


class Callback(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)

    #: Base URL, e.g. ``https://127.0.0.1:8443/api/v1/agent/``; the agent
    #: appends ``<id>/output/<stream>``, ``<id>/state``, ``<id>/completed``.
    url: str
    #: Per-run secret, sent as ``Authorization: Bearer <token>``.
    token: str = Field(min_length=32)
    #: PEM certificate the server must present, exactly.
    cert: str

    @field_validator("url")
    @classmethod
    def _https(cls, v: str) -> str:
        if not v.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return v
    #: Seconds between heartbeats while the program runs.
    heartbeat: float = Field(default=30.0, gt=0)


class Config(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, defer_build=True)

    #: Seconds after which the program's group gets SIGTERM, then SIGKILL.
    timeout: Optional[float] = Field(default=None, gt=0)
    #: Largest output callback body, in bytes.
    output_buffer: int = Field(default=16 << 20, gt=0)
    #: Longest wait, in seconds, before buffered output is sent.
    output_latency: float = Field(default=0.2, ge=0)
    #: Longest wait, in seconds, between callback retries.
    retry_frequency: float = Field(default=10.0, gt=0)
    #: Seconds between SIGTERM and SIGKILL on timeout, and on a kill with
    #: SIGTERM that names no grace of its own.
    kill_grace: float = Field(default=10.0, ge=0)
    #: Seconds the callback sender keeps trying after the program ended.
    callback_timeout: float = Field(default=86400.0, gt=0)
    #: How the program's stdout and stderr reach the spool: ``"file"``, they
    #: are the spool files (the supervisor moves no bytes); ``"pipe"``,
    #: pipes the supervisor copies into them.
    capture: Literal["file", "pipe"] = "file"


class ProgramSpec(_Strict):
    """``program.json``."""

    version: Literal[1] = PROTOCOL_VERSION
    id: str
    program: Program
    callback: Optional[Callback] = None
    config: Config = Field(default_factory=Config)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_run_id(v)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("unsupported version %r" % (v,))
        return v


RUSAGE_FIELDS = (
    "ru_utime", "ru_stime", "ru_maxrss", "ru_ixrss", "ru_idrss", "ru_isrss",
    "ru_minflt", "ru_majflt", "ru_nswap", "ru_inblock", "ru_oublock",
    "ru_msgsnd", "ru_msgrcv", "ru_nsignals", "ru_nvcsw", "ru_nivcsw",
)


class Rusage(_Strict):
    ru_utime: float
    ru_stime: float
    ru_maxrss: int
    ru_ixrss: int
    ru_idrss: int
    ru_isrss: int
    ru_minflt: int
    ru_majflt: int
    ru_nswap: int
    ru_inblock: int
    ru_oublock: int
    ru_msgsnd: int
    ru_msgrcv: int
    ru_nsignals: int
    ru_nvcsw: int
    ru_nivcsw: int


# The states of a run and exit_code_for live in chaperone.states (stdlib only:
# light to import); re-exported here.
from .states import (AGENT_FINAL_STATES, AGENT_STATES, FINAL_STATES, RECORD_STATES, STATES,  # noqa: E402,F401
                     exit_code_for)

StateName = Literal["running", "done", "error", "lost"]
AnyStateName = Literal["starting", "running", "unknown", "done", "error", "lost", "failed"]



class RunState(_Strict):
    """``state.json``; also the body of the ``state`` and ``completed`` callbacks."""

    version: Literal[1] = PROTOCOL_VERSION
    id: str
    #: Host name as the agent's host sees itself.
    host: str
    state: StateName
    #: Supervisor process: pid, start time in clock ticks since boot
    #: (``/proc/PID/stat`` field 22), and the kernel boot id.  All three must
    #: match for the supervisor to count as alive.
    agent_pid: Optional[int] = None
    agent_start: Optional[int] = None
    boot_id: Optional[str] = None
    #: Who recorded the run: ``MACHINE-ID/HOSTNAME/PIDNS`` (the machine id,
    #: the host name, the inode of the agent's pid namespace).  Only an
    #: agent with the same host_id judges the run (finds it lost, signals it).
    host_id: Optional[str] = None
    #: The program's pid and process group (its own session), and its start
    #: time in clock ticks since boot: nothing is signalled by these numbers
    #: unless the process (or its group) is proven to be still the program's.
    pid: Optional[int] = None
    pgid: Optional[int] = None
    pid_start: Optional[int] = None
    #: Exit status when it exited, or the signal name when killed.
    return_code: Optional[int] = None
    signal: Optional[str] = None
    #: True when the agent ended the program because ``config.timeout`` passed.
    timed_out: bool = False
    #: Why the program never started (``error``) or why the run is ``lost``.
    error: Optional[str] = None
    #: The errno behind ``error`` for a program that could not be started.
    errno: Optional[int] = None
    rusage: Optional[Rusage] = None
    start_time: str
    end_time: Optional[str] = None
    #: When it became final, in clock ticks since boot (as ``pid_start``).
    end_ticks: Optional[int] = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    #: The run's spool directory on the agent's host.
    spool: str
    #: A remark of the agent that reported this state, not recorded in the
    #: spool: e.g. the run was recorded by another host (shown as recorded
    #: there), the spool's file system is full, or a signal went to what an
    #: ended run left behind.
    note: Optional[str] = None

    @property
    def final(self) -> bool:
        """Whether the run is over (it never leaves this state)."""
        return self.state in FINAL_STATES

    @property
    def exit_code(self) -> Optional[int]:
        """The shell-like exit status (see :func:`exit_code_for`)."""
        return exit_code_for(self)


class Process(_Strict):
    """One process of a run, on its host, now: the agent's ``procs`` answer
    (:meth:`chaperone.Chaperone.processes`, ``chaperone top``)."""

    pid: int
    ppid: int
    pgid: int
    #: /proc's state letter: R running, S sleeping, D disk, T stopped, Z zombie ...
    state: str
    #: CPU seconds so far, user and system.
    cpu: float
    #: Resident memory, bytes.
    rss: int
    #: Seconds since it started.
    elapsed: float
    argv: List[str]


class RunInfo(BaseModel):
    """A run as chaperone shows it: ONE object for every ``--json`` of the
    CLI (``run``, ``status``, ``wait``, ``ps``), the library's
    :meth:`chaperone.Run.info` and the local server's API.  Documented in
    docs/cli.md with its JSON Schema."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    #: The run id.
    id: str
    #: The host as the user named it (``local``, an ssh config alias, ``user@host``).
    host: str
    #: The command as typed (a shell command line, or the argv quoted for a shell).
    command: str
    #: The exact argv when one was given; None for a shell command line.
    argv: Optional[List[str]] = None
    state: AnyStateName
    #: Shell-like exit status: the program's code, 128+N for signal N, 127/126
    #: not started, 255 lost or never started; None while not over.
    exit_code: Optional[int] = None
    return_code: Optional[int] = None
    signal: Optional[str] = None
    timed_out: bool = False
    #: Why it never started, or was lost.
    error: Optional[str] = None
    #: When chaperone was asked to start it (ISO 8601, UTC).
    created: str
    start_time: Optional[str] = None
    end_time: Optional[str] = None
    #: Seconds it ran (so far, while running).
    duration: Optional[float] = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    pid: Optional[int] = None
    #: The host's own name for itself (as the agent saw it).
    remote_host: Optional[str] = None
    #: The run's spool directory on its host.
    spool: Optional[str] = None
    #: When its state was last read from the host or pushed by its agent (ISO 8601, UTC).
    last_seen: Optional[str] = None
    #: Its host has gone quiet (``chaperone serve``: no heartbeat or poll
    #: for a while); a badge, never a state.
    silent: bool = False
    #: The group of runs started together (``run -H``), if any.
    group: Optional[str] = None


class StdinAck(_Strict):
    """``agent.py stdin``'s answer, first and after each frame: the input
    the spool holds."""

    #: Bytes of the input held in the spool (a client resumes there).
    held: int = Field(ge=0)
    #: The input's end is recorded (the program gets end of file once it read all of it).
    end: bool
    #: The run is over: nothing reads the input any more (stop sending).
    closed: bool
    #: The program reads it on a terminal (``program.tty``): it is what is typed.
    tty: bool = False


class OutputAck(_Strict):
    """Answer to an output append: the number of bytes the scheduler holds."""

    offset: int = Field(ge=0)


def json_schemas() -> dict:
    return {
        "program.json": ProgramSpec.model_json_schema(),
        "state.json": RunState.model_json_schema(),
        "output-ack": OutputAck.model_json_schema(),
        "stdin-ack": StdinAck.model_json_schema(),
    }


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(json_schemas(), indent=2))
