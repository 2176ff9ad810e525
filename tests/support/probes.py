"""What a program sees of its world, printed as JSON (tests/ssh/test_ssh_differential.py,
tests/cli/test_login_world.py compare it under chaperone and under ssh)."""

#: Prints, as JSON, what a program's world is: its environment as it was
#: exec'd (/proc/self/environ: not what Python changes itself), blocked and
#: ignored signals, open descriptors, umask, resource limits, ids, cwd,
#: niceness.  (The client port in SSH_CLIENT/SSH_CONNECTION differs by
#: connection: masked.)
PROBE = r"""
import json, os, resource
fds = []
for fd in range(256):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
status = {}
with open("/proc/self/status") as f:
    for line in f:
        key, _, value = line.partition(":")
        if key in ("SigBlk", "SigIgn", "NoNewPrivs", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            status[key] = value.strip()
with open("/proc/self/environ", "rb") as f:
    env = dict(item.decode("utf-8", "replace").split("=", 1) for item in f.read().split(b"\0") if b"=" in item)
for key in ("SSH_CLIENT", "SSH_CONNECTION"):
    if key in env:
        parts = env[key].split()
        parts[1] = "PORT"
        env[key] = " ".join(parts)
mask = os.umask(0)
os.umask(mask)
print(json.dumps({
    "env": env, "status": status, "fds": fds, "umask": mask, "cwd": os.getcwd(), "nice": os.nice(0),
    "limits": {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")},
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
    "session_leader": os.getsid(0) == os.getpid(),
}, sort_keys=True, indent=1))
"""
