"""How a failed SSH connection reads: one text for each way of failing,
whichever client failed (:func:`connect_error`), and what ``ssh``'s stderr
means when it exits 255 (:func:`ssh_error`).  Stdlib only, no asyncio: the
head start's direct calls report these too (chaperone/cli/fastcall.py)."""

from __future__ import annotations

import re

from ...errors import ChaperoneError, ConnectFailed, ConnectionLost

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Tuple, Union

    from ..target import Target


def _host_for_ssh(target: Target) -> str:
    """How to name the host in a command the user may type."""
    port = " -p %d" % target.port if target.port else ""
    return port, target.destination


def _key_place(target: Target) -> Tuple[str, str, str, str]:
    """(host name, `` -p PORT`` or "", known_hosts file, ``-F CFG `` or "")
    for the host-key hints: what ssh makes of the host (``ssh -G``: an
    alias's HostName, Port and UserKnownHostsFile), else what the target
    says."""
    port, dest = _host_for_ssh(target)
    known = target.known_hosts or "~/.ssh/known_hosts"
    config = "-F %s " % target.config[0] if target.config else ""
    try:
        from .options import _effective, ssh_binary

        ssh = ssh_binary()
        if ssh:
            eff = _effective(ssh, tuple(target.config[:1]), tuple(target.options), target.port, target.user,
                             target.destination)
            dest = eff.get("hostname") or dest
            port = " -p %s" % eff["port"] if eff.get("port") and eff.get("port") != "22" else ""
            files = (eff.get("userknownhostsfile") or "").split()
            known = target.known_hosts or (files[0] if files else known)
    except Exception:  # (only a hint)
        pass
    return dest, port, known, config


def connect_error(target: Target, kind: str, detail: Union[str, Tuple[str, str]] = "") -> ConnectFailed:
    """The one error each way of failing to connect reads as, whichever
    client failed.  ``kind``: ``host_key_unknown``, ``host_key_changed``,
    ``host_key`` (one of the two), ``auth``, ``unknown_host``, ``refused``,
    ``timeout``, ``dropped`` (before login: sshd's MaxStartups, a reset
    during key exchange), ``closed``, ``unreachable``, ``family`` (no
    address of the family -4/-6 asked for), ``other``."""
    host = target.name
    port, dest = _host_for_ssh(target)
    detail = detail if isinstance(detail, tuple) else detail.strip()
    if kind in ("host_key", "host_key_unknown"):
        what = "is not known here" if kind == "host_key_unknown" else "is not known here or has changed"
        name, kport, known, config = _key_place(target)
        return ConnectFailed(
            "host key verification failed for %s: its host key %s; check its fingerprint, then add it "
            "(ssh-keyscan%s %s >> %s, or connect once with ssh %s%s%s), or pass --no-host-key-check "
            "(check_host_keys=False in the library; unsafe)"
            % (host, what, kport, name, known, config, port.strip() + " " if port else "", dest))
    if kind == "host_key_changed":
        name, kport, known, _ = _key_place(target)
        entry = "[%s]:%s" % (name, kport.split()[-1]) if kport else name
        return ConnectFailed(
            "host key verification failed for %s: its host key has CHANGED (a reinstalled host, or someone in "
            "the middle); if that is expected, remove the old key (ssh-keygen -f %s -R '%s') and add the new one"
            % (host, known, entry))
    if kind == "auth":
        who = detail or ("%s@%s" % (target.user, dest) if target.user else "")
        return ConnectFailed(
            "authentication failed for %s%s: permission denied (check the user name, -l USER or USER@HOST, "
            "and your keys: -i KEY, ssh-add -l)" % (host, " (as %s)" % who if who and who != host else ""))
    if kind == "unknown_host":
        config = target.config[0] if target.config else "~/.ssh/config"  # (-F: the file the user gave)
        # ``detail``: why, or (name, why) when the name that could not be
        # resolved is known: one on the way (a jump host, or the alias's
        # HostName) is named, as the one to check.
        name, why = detail if isinstance(detail, tuple) else ("", detail)
        if name and name.lower() not in (dest.lower(), host.lower()):  # (ssh says names in lower case)
            return ConnectFailed("unknown host %s: cannot resolve %s, on the way to it: %s (its jump host, -J or "
                                 "ProxyJump, or its HostName in %s? check the spelling)"
                                 % (host, name, why or "no such name", config))
        return ConnectFailed("unknown host %s: %s (is it in %s? check the spelling)"
                             % (host, why or "cannot resolve its name", config))
    if kind == "family":
        return ConnectFailed("cannot connect to %s: it has no address of the family asked for (-4, -6 or "
                             "AddressFamily)%s" % (host, ": " + detail if detail else ""))
    if kind == "refused":
        return ConnectFailed("connection to %s refused (is sshd running there, on that port?)" % host,
                             transient=True)
    if kind == "timeout":
        return ConnectFailed("connection to %s timed out" % host, transient=True)
    if kind == "dropped":
        return ConnectFailed("%s dropped the connection before login%s (too many connections at once? "
                             "sshd's MaxStartups)" % (host, ": " + detail if detail else ""), retry_safe=True)
    if kind == "closed":
        return ConnectFailed("%s closed the connection%s" % (host, ": " + detail if detail else ""),
                             transient=True)
    if kind == "unreachable":
        return ConnectFailed("cannot connect to %s: %s" % (host, detail), transient=True)
    return ConnectFailed("cannot connect to %s: %s" % (host, detail or "unknown error"))


#: ``ssh`` exits with this when it (not the remote command) failed.
SSH_FAILED = 255


def ssh_error(target: Target, stderr: bytes, got_output: bool) -> ChaperoneError:
    """The error for ``ssh`` exiting 255, from what it wrote on stderr:
    :class:`ConnectFailed` (``transient`` when worth retrying, ``retry_safe``
    when dropped before login) before the agent said anything,
    :class:`ConnectionLost` after."""
    host = target.name
    lines = [l.strip() for l in stderr.decode("utf-8", "replace").splitlines() if l.strip()]
    # (-v: ssh's own debug messages, not why it failed)
    lines = [l for l in lines if not re.match(r"debug\d: |OpenSSH_\S+, |Transferred: |Bytes per second: ", l)]
    text = "\n".join(lines)
    if not lines:  # ssh says why it failed to connect; a silent 255 is a dropped connection
        return ConnectionLost("connection to %s lost" % host)
    last = lines[-1]
    if last in ("Killed", "Terminated", "Hangup"):  # (the watchdog's shell: ssh was killed, say while logging in)
        return ConnectionLost("connection to %s lost: ssh was %s" % (host, last.lower()))
    if "IDENTIFICATION HAS CHANGED" in text:
        return connect_error(target, "host_key_changed")
    if re.search(r"host key is known for|Host key verification failed", text):
        return connect_error(target, "host_key_unknown" if "is known for" in text else "host_key")
    if "Permission denied" in text and not got_output:
        m = re.search(r"^(\S+@\S+): Permission denied", text, re.M)
        return connect_error(target, "auth", m.group(1) if m else "")
    if "Address family for hostname not supported" in text:
        return connect_error(target, "family", last)
    unresolved = re.search(r"Could not resolve hostname (\S+): (.*)$", text, re.M)
    if unresolved:  # (ssh's, or the one a jump host's ProxyCommand ran)
        return connect_error(target, "unknown_host", (unresolved.group(1), unresolved.group(2).strip()))
    reach = re.search(r"^ssh: connect to host (\S+) port (\d+): (.*)$", text, re.M)
    if reach and not got_output:  # (ssh's own connect failed: to the host, or to a jump host on the way)
        name, port, why = reach.group(1), reach.group(2), reach.group(3).strip()
        kind = ("refused" if "refused" in why else "timeout" if "timed out" in why else
                "unreachable" if re.search(r"No route to host|Network is unreachable", why) else "other")
        if name.lower() not in (target.destination.lower(), target.name.lower()) and target.jump is not None \
                or "kex_exchange_identification" in text:
            return ConnectFailed("cannot connect to %s: its jump host %s (port %s) cannot be reached: %s "
                                 "(-J or ProxyJump: is it up, that name and port right?)"
                                 % (target.name, name, port, why), transient=kind in ("refused", "timeout"))
        return connect_error(target, kind, why if kind in ("unreachable", "other") else "")
    if not got_output and "stdio forwarding failed" in text:  # (ssh -W on the jump host: it could not connect)
        return ConnectFailed("cannot connect to %s: its jump host could not open a connection to it (is sshd "
                             "running there, on that port, and reachable from the jump host?)" % host, transient=True)
    if not got_output and re.search(r"kex_exchange_identification|^Connection (closed|reset) by \S+ port \d+",
                                    text, re.M):
        return connect_error(target, "dropped", last)
    if got_output or re.search(r"Timeout, server .* not responding|Broken pipe|Connection reset|"
                               r"closed by remote host|Connection closed by|client_loop|mux_client", text):
        return ConnectionLost("connection to %s lost: %s" % (host, last))
    if "Connection refused" in text:
        return connect_error(target, "refused")
    if "timed out" in text:
        return connect_error(target, "timeout")
    if re.search(r"No route to host|Network is unreachable", text):
        return connect_error(target, "unreachable", last)
    return connect_error(target, "other", last)
