"""The broker's own CPU time and peak memory, on every platform.

`resource` exists only on POSIX; Windows (where the broker runs over TCP) gets the same
figures from psutil, so nothing on the broker's path imports a POSIX-only module.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_s: float
    rss_max_kb: int


def process_usage() -> ProcessUsage:
    """CPU seconds (user + system) and the peak resident set of this process."""
    if resource is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return ProcessUsage(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
    me = psutil.Process()
    times = me.cpu_times()
    memory = me.memory_info()
    peak = getattr(memory, "peak_wset", memory.rss)
    return ProcessUsage(times.user + times.system, int(peak) // 1024)
