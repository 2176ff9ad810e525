"""OpenSSH control masters: one background ``ssh -N -M`` connection that
later ``ssh -S SOCKET HOST CMD`` calls share (no handshake of their own).

Stdlib only and light to import: the CLI starts a master for the host it
is about to use before it imports anything else (:func:`speculate`), so the
SSH handshake runs while Python loads the rest of chaperone; the transport
then adopts that master if it was started with the very same options
(:func:`adopt`), else stops it.

A master never outlives the process that started it: it runs under a small
``sh`` watchdog that kills it when the pipe from its parent closes, however
the parent ended (even SIGKILL).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence

#: Seconds to connect and log in when neither ``connect_timeout`` nor the
#: SSH config's ``ConnectTimeout`` says.
DEFAULT_CONNECT_TIMEOUT = 15

# $1 is the master's directory, the rest its argv.  Its exit status is the
# script's.  When fd 0 (a pipe from the parent) reaches EOF -- the parent
# stopped it, or died -- the watchdog kills ssh and removes the directory.
# Once it has begun, the watchdog ignores the TERM with which the main
# shell ends it when ssh exits (else that could cut it off before the rm).
# (A background list gets /dev/null as stdin unless redirected: fd 3.)
_WATCHDOG = ('d=$1; shift; exec 3<&0; "$@" </dev/null & p=$!; '
             '{ read _ <&3; trap "" TERM; kill $p 2>/dev/null; rm -rf "$d"; } & w=$!; '
             'wait $p; s=$?; kill $w 2>/dev/null; exit $s')


def ssh_binary() -> Optional[str]:
    """The ``ssh`` client to use (``$CHAPERONE_SSH`` or ``ssh`` on PATH)."""
    return shutil.which(os.environ.get("CHAPERONE_SSH") or "ssh")


def default_client() -> str:
    """The SSH client chaperone uses unless told: ``$CHAPERONE_SSH_CLIENT``
    (``openssh`` or ``asyncssh``), else OpenSSH's ``ssh`` when it is
    installed, else asyncssh."""
    return os.environ.get("CHAPERONE_SSH_CLIENT") or ("openssh" if ssh_binary() else "asyncssh")


def multiplexes_itself(config: Sequence[str]) -> bool:
    """Whether the user's ssh config does its own connection sharing
    (ControlMaster/ControlPath/ControlPersist): chaperone then starts no
    master of its own."""
    return config_mentions(default_config_files(config), r"Control(Master|Path|Persist)")


def config_mentions(paths: Sequence[str], keyword: str) -> bool:
    """Whether any of these ssh config files sets ``keyword`` (a regular
    expression; a textual check: enough to decide whether to supply a
    default)."""
    import re

    pattern = re.compile(r"\s*(%s)\b" % keyword, re.IGNORECASE)
    for path in paths:
        try:
            with open(os.path.expanduser(path), errors="replace") as f:
                if any(pattern.match(line) for line in f):
                    return True
        except OSError:
            continue
    return False


def default_config_files(config: Sequence[str]) -> List[str]:
    return list(config) or ["~/.ssh/config", "/etc/ssh/ssh_config"]


def ssh_options(ssh: str, *, config: Sequence[str] = (), port: Optional[int] = None,
                username: Optional[str] = None, client_keys: Optional[Sequence[str]] = None,
                check_host_keys: bool = True, known_hosts: Optional[str] = None,
                connect_timeout: Optional[float] = None, keepalive_interval: float = 3.0,
                forwardings: bool = False) -> List[str]:
    """``ssh`` and its options (everything but the host and the command).
    Command-line options win over the config (ssh keeps the first value).
    Port forwardings from the config are cleared unless ``forwardings``
    (that would clear those on the command line too)."""
    argv = [ssh]
    if config:
        argv += ["-F", config[0]]
    argv += [
        "-T", "-x", "-a",  # no tty, no X11 or agent forwarding
        "-o", "BatchMode=yes",  # never a prompt
        "-o", "ServerAliveInterval=%d" % max(1, round(keepalive_interval)),
        "-o", "ServerAliveCountMax=3",
        "-o", "LogLevel=ERROR",
    ]
    if not forwardings:
        argv += ["-o", "ClearAllForwardings=yes"]  # a LocalForward in the config is not for us
    if connect_timeout is not None:
        argv += ["-o", "ConnectTimeout=%d" % max(1, round(connect_timeout))]
    elif not config_mentions(default_config_files(config), "ConnectTimeout"):
        argv += ["-o", "ConnectTimeout=%d" % DEFAULT_CONNECT_TIMEOUT]
    if port:
        argv += ["-p", str(int(port))]
    if username:
        argv += ["-l", username]
    for key in client_keys or ():
        argv += ["-i", key]
    if not check_host_keys:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    elif known_hosts:
        argv += ["-o", "UserKnownHostsFile=%s" % known_hosts]
    return argv


class Master:
    """``ssh -N -M -S SOCKET HOST`` in the background, under a watchdog."""

    def __init__(self, options: Sequence[str], host: str):
        _reap()
        self.key = (tuple(options), host)
        self.dir = tempfile.mkdtemp(prefix="chaperone-ssh-")  # 0700
        self.socket = os.path.join(self.dir, "ctl")
        self._stderr = os.path.join(self.dir, "stderr")
        argv = list(options) + ["-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
                                "-S", self.socket, "--", host]
        try:
            with open(self._stderr, "wb") as err:
                self.proc = subprocess.Popen(["/bin/sh", "-c", _WATCHDOG, "sh", self.dir, *argv],
                                             stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def wait_exit(self) -> None:
        """Until the master exited (its connection is gone)."""
        import asyncio

        try:
            fd = os.pidfd_open(self.proc.pid)  # Linux 5.3+: readable once it exits
        except (AttributeError, OSError):
            while self.alive():
                await asyncio.sleep(0.05)
            return
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
        try:
            if self.alive():
                await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def ready(self) -> bool:
        """Logged in: its socket is there (made only after the login)."""
        return os.path.exists(self.socket)

    def exit_status(self) -> Optional[int]:
        return self.proc.poll()

    def stderr(self) -> bytes:
        try:
            with open(self._stderr, "rb") as f:
                return f.read()
        except OSError:
            return b""

    def stop(self, wait: bool = False) -> None:
        """End the connection: the watchdog kills ssh once its pipe is
        closed.  Without ``wait`` the exit is not waited for (ssh takes a
        few ms to say goodbye); it is reaped later (:func:`_reap`)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if wait:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc.poll() is None:
            _stopping.append(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


#: Stopped masters not reaped yet.
_stopping: List[subprocess.Popen] = []


def _reap() -> None:
    _stopping[:] = [p for p in _stopping if p.poll() is None]


_speculative: Optional[Master] = None


def _stop_speculative() -> None:
    global _speculative
    master, _speculative = _speculative, None
    if master is not None:
        master.stop()


def speculate(options: Sequence[str], host: str) -> None:
    """Start a master now for a transport that will likely ask for it."""
    global _speculative
    _stop_speculative()
    _speculative = Master(options, host)
    atexit.register(_stop_speculative)


def adopt(options: Sequence[str], host: str) -> Optional[Master]:
    """The speculative master if it was started with these options for this
    host (it is then the caller's to stop); else stop it and None."""
    global _speculative
    master = _speculative
    if master is None:
        return None
    if master.key == (tuple(options), host):
        _speculative = None
        return master
    _stop_speculative()
    return None
