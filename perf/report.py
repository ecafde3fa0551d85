"""Human tables (stdout) and the JSON document of a routing benchmark run.

Two tables: flood throughput, and latency at fixed offered rates. Every row of
a system is compared with the baseline's row of the same layout, apps and
phase: "x base" is system / baseline (above 1 is better for throughput, below 1
is better for latency).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from perf.harness import RunResult
from perf.summary import Cell


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "-"
    return f"{value / base:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _runs(c: Cell) -> str:
    return "" if c.runs_ok == c.runs_total else f" ({c.runs_ok}/{c.runs_total} ok)"


def render(
    cells: list[Cell], baseline: str, unavailable: dict[str, str], failed: list[RunResult]
) -> str:
    """The tables as one string (no trailing newline)."""
    lines: list[str] = []
    for name, reason in unavailable.items():
        lines.append(f"{name}: unavailable ({reason})")
    base = {(c.layout, c.n_apps, c.phase): c for c in cells if c.system == baseline}
    flood = [c for c in cells if c.kind == "flood"]
    lat = [c for c in cells if c.kind == "latency"]
    order = sorted(flood, key=lambda c: (c.layout, c.n_apps, c.system != baseline, c.system))
    lines += [
        "",
        "Flood: delivered msg/s over all subscribers (median); x base = vs " + baseline,
        f"{'layout':6} {'apps':>4} {'system':10} {'deliv/s':>9} {'x base':>7} {'sent/s':>9} "
        f"{'deliv%':>7} {'blocked':>7} {'bkr us/msg':>10} {'host busy':>9} "
        f"{'route p50/p99 us':>17}",
    ]
    for c in order:
        b = base.get((c.layout, c.n_apps, c.phase))
        route = f"{_fmt(c.get('route_p50_us'), '.0f')}/{_fmt(c.get('route_p99_us'), '.0f')}"
        lines.append(
            f"{c.layout:6} {c.n_apps:>4} {c.system:10} {_fmt(c.get('delivered_rate'), ',.0f'):>9} "
            f"{_ratio(c.get('delivered_rate'), b.get('delivered_rate') if b else None):>7} "
            f"{_fmt(c.get('sent_rate'), ',.0f'):>9} {_pct(c.get('delivered_fraction')):>7} "
            f"{_pct(c.get('blocked_fraction')):>7} "
            f"{_fmt(c.get('broker_cpu_us_per_msg'), '.1f'):>10} "
            f"{_pct(c.get('host_busy')):>9} {route:>17}{_runs(c)}"
        )
    order = sorted(
        lat, key=lambda c: (c.layout, c.n_apps, c.offered_rate, c.system != baseline, c.system)
    )
    lines += [
        "",
        "Latency at a fixed offered rate, publisher send -> subscriber receive (median of runs)",
        f"{'layout':6} {'apps':>4} {'system':10} {'offered':>7} {'deliv%':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'p999 ms':>8} {'p99 x base':>10} {'late%':>6} {'route p99 us':>12}",
    ]
    for c in order:
        b = base.get((c.layout, c.n_apps, c.phase))
        lines.append(
            f"{c.layout:6} {c.n_apps:>4} {c.system:10} {c.offered_rate:>7,} "
            f"{_pct(c.get('delivered_fraction')):>7} {_fmt(c.get('e2e_p50_ms'), '.2f'):>7} "
            f"{_fmt(c.get('e2e_p99_ms'), '.2f'):>7} {_fmt(c.get('e2e_p999_ms'), '.2f'):>8} "
            f"{_ratio(c.get('e2e_p99_ms'), b.get('e2e_p99_ms') if b else None):>10} "
            f"{_pct(c.get('late_fraction')):>6} {_fmt(c.get('route_p99_us'), '.0f'):>12}{_runs(c)}"
        )
    if failed:
        lines += ["", "Failed runs:"]
        lines += [f"  {r.system} {r.layout} {r.n_apps} apps rep {r.rep}: {r.error}" for r in failed]
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write `document` (dataclasses allowed inside) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(obj: object) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
