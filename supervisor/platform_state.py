"""Whether the platform a `run/platform.json` names is alive.

The supervisor writes the state file at start and removes it at a clean stop; after a
SIGKILL (or a crash, or a reboot) the file stays. Its recorded pid then names a process
that is gone, or (after pid reuse) one started later than the platform was: either way the
file is stale, the CLI says so at once and the next `plexus run` removes it.
"""

from __future__ import annotations

from typing import Any

import psutil

_CLOCK_SLACK_S = 2.0


def recorded_pid(state: dict[str, Any]) -> int | None:
    pid = state.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def platform_alive(state: dict[str, Any]) -> bool:
    """True while the supervisor process the state names still runs."""
    pid = recorded_pid(state)
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    started_at = state.get("started_at")
    # a process created after the platform started holds a reused pid: not the platform
    return not (isinstance(started_at, int | float) and created > started_at + _CLOCK_SLACK_S)
