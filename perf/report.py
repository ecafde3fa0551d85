"""Human tables (stdout) and the JSON document of a routing benchmark run.

Two tables: flood throughput, and latency at fixed offered rates. Every row of
a system is compared with the baseline's row of the same layout, apps and
phase: "x base" is system / baseline (above 1 is better for throughput, below 1
is better for latency).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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


def _cores(c: Cell) -> str:
    parts = (c.get("broker_cores"), c.get("workers_cores"), c.get("other_cores"))
    return "/".join(_fmt(v, ".2f") for v in parts)


Column = tuple[str, int, Callable[[Cell, Cell | None], str]]

FLOOD: list[Column] = [
    ("deliv/s", 9, lambda c, b: _fmt(c.get("delivered_rate"), ",.0f")),
    (
        "x base",
        6,
        lambda c, b: _ratio(c.get("delivered_rate"), b.get("delivered_rate") if b else None),
    ),
    ("sent/s", 9, lambda c, b: _fmt(c.get("sent_rate"), ",.0f")),
    ("deliv%", 6, lambda c, b: _pct(c.get("delivered_fraction"))),
    ("blocked", 7, lambda c, b: _pct(c.get("blocked_fraction"))),
    ("bkr us/msg", 10, lambda c, b: _fmt(c.get("broker_cpu_us_per_msg"), ".1f")),
    (
        "route p50/p99 us",
        16,
        lambda c, b: f"{_fmt(c.get('route_p50_us'), '.0f')}/{_fmt(c.get('route_p99_us'), '.0f')}",
    ),
    ("cores b/w/other", 15, lambda c, b: _cores(c)),
]

LATENCY: list[Column] = [
    ("offered", 7, lambda c, b: f"{c.offered_rate:,}"),
    ("deliv%", 6, lambda c, b: _pct(c.get("delivered_fraction"))),
    ("p50 ms", 6, lambda c, b: _fmt(c.get("e2e_p50_ms"), ".2f")),
    ("p99 ms", 6, lambda c, b: _fmt(c.get("e2e_p99_ms"), ".2f")),
    ("p999 ms", 7, lambda c, b: _fmt(c.get("e2e_p999_ms"), ".2f")),
    (
        "p99 x base",
        10,
        lambda c, b: _ratio(c.get("e2e_p99_ms"), b.get("e2e_p99_ms") if b else None),
    ),
    ("late%", 5, lambda c, b: _pct(c.get("late_fraction"))),
    ("route p99 us", 12, lambda c, b: _fmt(c.get("route_p99_us"), ".0f")),
    ("cores b/w/other", 15, lambda c, b: _cores(c)),
]


def _table(
    cells: list[Cell], base: dict[tuple[str, int, str], Cell], columns: list[Column]
) -> list[str]:
    head = f"{'layout':6} {'apps':>4} {'system':10} " + " ".join(f"{n:>{w}}" for n, w, _ in columns)
    rows = [head]
    for c in cells:
        b = base.get((c.layout, c.n_apps, c.phase))
        values = " ".join(f"{f(c, b):>{w}}" for _, w, f in columns)
        rows.append(f"{c.layout:6} {c.n_apps:>4} {c.system:10} {values}{_runs(c)}")
    return rows


def render(
    cells: list[Cell], baseline: str, unavailable: dict[str, str], failed: list[RunResult]
) -> str:
    """The tables as one string (no trailing newline)."""
    lines = [f"{name}: unavailable ({reason})" for name, reason in unavailable.items()]
    base = {(c.layout, c.n_apps, c.phase): c for c in cells if c.system == baseline}
    flood = sorted(
        (c for c in cells if c.kind == "flood"),
        key=lambda c: (c.layout, c.n_apps, c.system != baseline, c.system),
    )
    lat = sorted(
        (c for c in cells if c.kind == "latency"),
        key=lambda c: (c.layout, c.n_apps, c.offered_rate, c.system != baseline, c.system),
    )
    lines += ["", f"Flood: delivered msg/s summed over subscribers; x base = vs {baseline}"]
    lines += _table(flood, base, FLOOD)
    lines += ["", "Latency at a fixed offered rate: publisher send -> subscriber receive"]
    lines += _table(lat, base, LATENCY)
    lines += [
        "",
        "All figures are medians over repetitions; cores = broker/workers/other processes.",
    ]
    if failed:
        lines += ["", "Failed runs:"]
        lines += [
            f"  {r.system} {r.layout} {r.n_apps} apps rep {r.rep + 1}: {r.error}" for r in failed
        ]
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
