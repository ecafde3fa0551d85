"""Medians over repetitions, per (system, layout, apps, phase).

p99 swings 2-5x between runs on this machine (PERF-NOTES), so every figure is
the median of the repetitions that succeeded, and the individual values are
kept next to it so the spread stays visible in the JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from perf.harness import PhaseResult, RunResult

Extractor = Callable[[PhaseResult], float | None]

METRICS: dict[str, Extractor] = {
    "delivered_rate": lambda p: p.delivered_rate,
    "sent_rate": lambda p: p.sent_rate,
    "delivered_fraction": lambda p: p.delivered_fraction,
    "blocked_fraction": lambda p: p.blocked_fraction,
    "late_fraction": lambda p: p.late_fraction,
    "max_lag_ms": lambda p: p.max_lag_ms,
    "e2e_p50_ms": lambda p: p.e2e.p50_us / 1000 if p.e2e else None,
    "e2e_p99_ms": lambda p: p.e2e.p99_us / 1000 if p.e2e else None,
    "e2e_p999_ms": lambda p: p.e2e.p999_us / 1000 if p.e2e else None,
    "route_p50_us": lambda p: p.routing.p50_us if p.routing else None,
    "route_p99_us": lambda p: p.routing.p99_us if p.routing else None,
    "route_p999_us": lambda p: p.routing.p999_us if p.routing else None,
    "routed_rate": lambda p: p.routing.count / p.window_s if p.routing else None,
    "broker_cpu_us_per_msg": lambda p: p.broker_cpu_us_per_msg,
    "host_busy": lambda p: p.host_busy,
    "broker_cores": lambda p: p.broker_cores,
    "workers_cores": lambda p: p.workers_cores,
    "other_cores": lambda p: p.other_cores,
    # the broker's processes by role where its handle names them (BrokerHandle.cpu_groups)
    "broker_process_cores": lambda p: p.process_cores.get("broker"),
    "persistence_cores": lambda p: p.process_cores.get("persistence"),
    "supervisor_cores": lambda p: p.process_cores.get("plexus"),
}


@dataclass(slots=True)
class Cell:
    """Aggregated figures of one phase of one (system, layout, apps)."""

    system: str
    layout: str
    n_apps: int
    phase: str
    kind: str
    offered_rate: int
    runs_ok: int
    runs_total: int
    median: dict[str, float | None] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)

    def get(self, metric: str) -> float | None:
        return self.median.get(metric)


def aggregate(runs: list[RunResult]) -> list[Cell]:
    """One Cell per (system, layout, apps, phase), in first-seen order."""
    keys: dict[tuple[str, str, int], list[RunResult]] = {}
    for r in runs:
        keys.setdefault((r.system, r.layout, r.n_apps), []).append(r)
    cells: list[Cell] = []
    for (system, layout, n_apps), group in keys.items():
        ok = [r for r in group if r.status == "ok"]
        phase_names = [p.name for p in ok[0].phases] if ok else []
        for i, name in enumerate(phase_names):
            phases = [r.phases[i] for r in ok]
            cell = Cell(
                system,
                layout,
                n_apps,
                name,
                phases[0].kind,
                phases[0].offered_rate,
                len(ok),
                len(group),
            )
            for metric, extract in METRICS.items():
                vals = [v for v in (extract(p) for p in phases) if v is not None]
                cell.values[metric] = vals
                cell.median[metric] = statistics.median(vals) if vals else None
            cells.append(cell)
    return cells
