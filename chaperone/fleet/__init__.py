"""Many hosts at once: node sets and host patterns, inventories, fan-out and
the output shapes of a command on many hosts.  Pure code (no SSH here): the
API and the CLI wire it to runs.  See docs/hosts.md.

Modules (imported one by one, so that a command that needs one loads only it;
``fanout`` imports asyncio, ``inventory`` imports yaml when a file is read):

* :mod:`.nodeset`: ``expand``, ``fold``, ``NodeSetError``, ``natural_key``;
* :mod:`.patterns`: ``select``, ``pattern_style``;
* :mod:`.inventory`: ``load_inventory``, ``select_hosts``, ``HostEntry``, ...;
* :mod:`.fanout`: ``Fanout``, ``fanout``, ``HostResult``, ``HostFailure``;
* :mod:`.output`: ``HostOutcome``, ``LiveOutput``, ``gather``, ``json_line``,
  ``summary_table``, ``exit_status``.
"""
