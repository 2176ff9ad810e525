"""The one place that decides how a host is reached.

:class:`Transports` turns a :class:`~chaperone.transports.target.Target`
into a transport, and keeps one per target for the life of its owner (a
:class:`chaperone.Chaperone`): every call to one host shares its
connections, whichever part of the library makes it (starts, follows,
callbacks' tunnels, catch-up, a later look at a recorded run).

* ``local``: :class:`~chaperone.transports.local.LocalTransport`;
* a host with a transport given by the caller (``overrides``, e.g. an
  in-memory host in tests): that one;
* else SSH, through OpenSSH's ``ssh`` or asyncssh: ``client`` if given,
  else ``$CHAPERONE_SSH_CLIENT``, else ``ssh`` when installed
  (:func:`~chaperone.transports.ssh.options.default_client`).  ``ssh``
  reads one config file: with several ``-F`` files, asyncssh.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

from ..errors import UsageError
from .base import Transport
from .target import Target

CLIENTS = ("openssh", "asyncssh")


class Transports:
    """Transports by target, made on first use and closed together."""

    def __init__(self, *, local_spool: Optional[os.PathLike] = None, client: Optional[str] = None,
                 overrides: Optional[Mapping[str, Transport]] = None, **tuning):
        if client is not None and client not in CLIENTS:
            raise UsageError("unknown ssh client %r: openssh or asyncssh" % client)
        self.local_spool = str(local_spool) if local_spool is not None else None
        self.client = client
        self.overrides: Dict[str, Transport] = dict(overrides or {})
        #: Passed to every SSH transport (connect_timeout, max_sessions, connect_limit ...).
        self.tuning = tuning
        self._made: Dict[Target, Transport] = {}

    def client_for(self, target: Target) -> str:
        """Which SSH client reaches ``target``."""
        if self.client is not None:
            client = self.client
        else:
            from .ssh.options import default_client

            client = default_client()
        if client == "openssh" and len(target.config) > 1:
            return "asyncssh"
        return client

    def normalize(self, target: Target) -> Target:
        """The target as it is recorded: a local one gets its spool."""
        if target.local and target.spool is None and self.local_spool is not None:
            return target.replace(spool=self.local_spool)
        return target

    def get(self, target: Target) -> Transport:
        """The transport to ``target`` (one per target)."""
        target = self.normalize(target)
        transport = self._made.get(target)
        if transport is None:
            transport = self._made[target] = self._make(target)
        return transport

    def _make(self, target: Target) -> Transport:
        if target.name in self.overrides:
            return self.overrides[target.name]
        if target.local:
            from .local import LocalTransport

            return LocalTransport(python=target.python, root=target.spool)
        if self.client_for(target) == "openssh":
            from .ssh.via_openssh import OpenSSHTransport

            return OpenSSHTransport(target, **self.tuning)
        from .ssh.via_asyncssh import SSHTransport

        return SSHTransport(target, **self.tuning)

    def for_record(self, how: Mapping) -> Transport:
        """The transport to the host a run's record describes."""
        return self.get(Target.from_description(dict(how)))

    def connections(self) -> int:
        """Connections open now, to every host."""
        return sum(t.connections() for t in self._made.values())

    async def close(self) -> None:
        made, self._made = list(self._made.values()), {}
        for transport in made:
            if transport in self.overrides.values():
                continue
            await transport.close()
