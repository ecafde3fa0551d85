"""Per-app resource sampling with psutil: CPU % and RSS of an app's whole process tree.

Sampled once a second by the supervisor; the samples feed `plexus status`, the metrics
published on `$sys.metrics.apps`, and the limit checks (memory at once, CPU only when
over its limit for a sustained window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from broker.manifests import Limits


@dataclass
class Usage:
    """The last sample of one app and what the limit checks remember between samples."""

    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    """Every process of the tree ever sampled (for killing stragglers after a stop)."""
    cpu_over_since: float | None = None
    """Monotonic time the CPU went over its limit (None: not over)."""
    _procs: dict[int, psutil.Process] = field(default_factory=dict)

    def sample(self, root_pid: int, children: dict[int, list[int]]) -> None:
        """Measure the tree under `root_pid` (children included) since the last sample.

        `children` is one process table for all apps (`process_table()`): walking /proc
        once per sample instead of once per app keeps 500 apps cheap to watch.
        """
        tree: list[int] = [root_pid]
        for pid in tree:  # grows while walking: breadth-first over the table
            tree.extend(children.get(pid, ()))
        cpu = rss = 0.0
        alive: dict[int, psutil.Process] = {}
        for pid in tree:
            known = self._procs.get(pid)  # keep the object: cpu_percent is a delta
            if known is None:
                try:
                    known = psutil.Process(pid)
                except psutil.Error:
                    continue
            try:
                cpu += known.cpu_percent(None)
                rss += known.memory_info().rss
            except psutil.Error:
                continue
            alive[pid] = known
        self._procs = alive
        self.seen.update(alive)
        self.cpu_percent = round(cpu, 1)
        self.rss_mb = round(rss / 2**20, 1)


def process_table() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process, read once."""
    table: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        table.setdefault(proc.info["ppid"], []).append(proc.pid)
    return table


@dataclass(frozen=True, slots=True)
class Breach:
    """A limit an app went over, with the measured value, for the kill event."""

    kind: str
    measured: float
    limit: float

    def describe(self) -> str:
        unit = "MiB" if self.kind == "memory" else "% CPU"
        return f"{self.kind} {self.measured:g} {unit} over the limit of {self.limit:g} {unit}"


def check_limits(usage: Usage, limits: Limits, now: float, cpu_window_s: float) -> Breach | None:
    """The limit `usage` breaks now, if any (CPU only after `cpu_window_s` over it).

    `now` is monotonic seconds (the supervisor's clock): the window survives a clock jump.
    """
    if limits.memory_mb is not None and usage.rss_mb > limits.memory_mb:
        return Breach("memory", usage.rss_mb, limits.memory_mb)
    if limits.cpu_percent is None or usage.cpu_percent <= limits.cpu_percent:
        usage.cpu_over_since = None
        return None
    if usage.cpu_over_since is None:
        usage.cpu_over_since = now
    if now - usage.cpu_over_since >= cpu_window_s:
        return Breach("cpu", usage.cpu_percent, limits.cpu_percent)
    return None


def kill_leftovers(seen: dict[int, psutil.Process]) -> int:
    """SIGKILL every remembered process of a stopped app still alive; returns how many.

    `is_running()` compares the creation time too, so a recycled pid is never touched.
    """
    killed = 0
    for proc in seen.values():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed
