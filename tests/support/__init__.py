"""What the tests share: real test hosts (``sshd``: an OpenSSH server on
loopback with generated keys; ``fleet_hosts``: many of them on 127.0.0.x),
a scheduler server for the dashboard tests (``servehelpers``), and small
helpers (``helpers``: the CLI, the agent in-process, polling, spools)."""
