"""Many hosts at once: node sets and host patterns, inventories, fan-out and
the output shapes of a run on many hosts.  Pure code (no SSH here): the API
and the CLI wire it to runs.  See docs/hosts.md."""
