"""``chaperone serve``: one long-running process per user that holds every
run, pushes its changes to a live dashboard and a local API, and re-attaches
every unfinished run after a restart.

Modules: :mod:`.runs` (the adapter: every library call), :mod:`.view` (a
run as JSON), :mod:`.service` (watching, events, health), :mod:`.app`
(HTTP), :mod:`.server` (process), :mod:`.command` (click), :mod:`.client`
(the CLI's and programs' client), :mod:`.files` (token, server.json).
Nothing heavy is imported here.
"""
