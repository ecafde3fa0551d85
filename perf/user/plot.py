"""The PNG of the user benchmark: throughput and p99 against the number of apps.

Two panels over the at-most-once `mux` cells (apps in 4 processes): flood delivered msg/s,
and end-to-end p99 at each offered rate, Plexus `Bus` beside core NATS, log scales, so a
reader sees at a glance where the lines part. matplotlib is optional (perf/setup.sh
installs it); without it `write_plot` says why and the run goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from perf.summary import Cell as Summary
from perf.user.matrix import Cell
from perf.user.table import find

COLOURS = {"Plexus Bus": "tab:blue", "nats core": "tab:orange"}
STYLES = ["-", "--", ":", "-."]


def series(
    summaries: Sequence[Summary], matrix: Sequence[Cell], phase: str, metric: str
) -> dict[str, list[tuple[int, float]]]:
    """(apps, median) points per system label for one phase and metric, apps rising."""
    cells = sorted((c for c in matrix if c.latency), key=lambda c: c.n_apps)
    out: dict[str, list[tuple[int, float]]] = {}
    for label, index in (("Plexus Bus", 0), ("nats core", 1)):
        points = []
        for cell in cells:
            if index >= len(cell.systems):
                continue  # a solo cell: Plexus alone
            s = find(summaries, cell.systems[index], cell.layout, cell.n_apps, phase)
            value = s.get(metric) if s is not None else None
            if value is not None and value > 0:
                points.append((cell.n_apps, value))
        out[label] = points
    return out


def write_plot(
    path: Path, summaries: Sequence[Summary], matrix: Sequence[Cell], rates: Sequence[int]
) -> str | None:
    """Write the PNG; returns None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib not installed (perf/setup.sh installs it)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in series(summaries, matrix, "flood", "delivered_rate").items():
        if points:
            xs, ys = zip(*points, strict=True)
            left.plot(xs, ys, "o-", color=COLOURS[label], label=label)
    left.set(title="flood, at-most-once: delivered msg/s", xlabel="apps (in 4 processes)")
    for i, rate in enumerate(sorted(rates)):
        phase = f"latency@{rate}"
        for label, points in series(summaries, matrix, phase, "e2e_p99_ms").items():
            if points:
                xs, ys = zip(*points, strict=True)
                style = STYLES[i % len(STYLES)]
                right.plot(xs, ys, "o" + style, color=COLOURS[label], label=f"{label} @{rate:,}/s")
    right.set(title="end-to-end p99 (ms) at offered msg/s", xlabel="apps (in 4 processes)")
    apps = sorted({c.n_apps for c in matrix if c.latency})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(apps, [str(n) for n in apps])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Plexus (Bus client) vs NATS (nats-py), 256 B payloads, medians", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
