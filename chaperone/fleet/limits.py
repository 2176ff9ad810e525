"""The fan-out's default limits (see :mod:`.fanout`), apart so that the
CLI's head start can read them without loading asyncio."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # (annotations are not evaluated: __future__)
    from typing import Optional

#: Runs being started at once on one sshd (OpenSSH's MaxStartups is 10).
DEFAULT_PER_HOST = 8
#: clush's default fanout.
MAX_DEFAULT_FORKS = 64


def default_forks(cpus: Optional[int] = None, nofile: Optional[int] = None) -> int:
    """64 (clush), at most 16 a CPU, at most what the open-file limit takes
    at 8 descriptors a task (and 32 kept for the process itself)."""
    cpus = cpus or os.cpu_count() or 1
    if nofile is None:
        nofile = 1024
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            nofile = 1 << 20 if soft == resource.RLIM_INFINITY else soft
        except (ImportError, OSError, ValueError):
            pass
    return max(1, min(MAX_DEFAULT_FORKS, 16 * cpus, (nofile - 32) // 8))
