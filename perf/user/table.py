"""The one table of the user benchmark: Plexus beside its peer, and the ratio (pure).

Rows are built from the harness's medians (`perf.summary.Cell`) and the confirm runs;
nothing here measures or prints. Ratio = Plexus ÷ peer: above 1 is better for a rate,
worse for a latency; shares (deliv%, blocked) and CPU get no ratio. "routed by the broker"
(Plexus only: its STATS histogram count per second of window) tells a slow broker from
clients that never sent what they accepted; "server CPU" is Plexus's supervisor, broker
and persistence service together, or nats-server.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from perf.summary import Cell as Summary
from perf.user.confirms import ConfirmRun
from perf.user.matrix import PEER_LABEL, Cell

Kind = Literal["rate", "ms", "us", "share", "cores"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table."""

    workload: str
    metric: str
    kind: Kind
    plexus: float | None
    peer: float | None
    peer_name: str

    @property
    def ratio(self) -> float | None:
        return ratio(self.plexus, self.peer) if self.kind in ("rate", "ms", "us") else None


def ratio(plexus: float | None, peer: float | None) -> float | None:
    """Plexus ÷ peer; None when either is missing or the peer's figure is 0."""
    if plexus is None or peer is None or peer == 0:
        return None
    return plexus / peer


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that exist; None for none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def find(
    summaries: Sequence[Summary], system: str, layout: str, n_apps: int, phase: str
) -> Summary | None:
    """The summary of one (system, layout, apps, phase), if it ran."""
    for s in summaries:
        if (s.system, s.layout, s.n_apps, s.phase) == (system, layout, n_apps, phase):
            return s
    return None


def _get(summary: Summary | None, metric: str) -> float | None:
    return summary.get(metric) if summary is not None else None


def _label(cell: Cell, what: str, pair: tuple[Summary | None, Summary | None]) -> str:
    label = f"{what}, {cell.label}"
    bad = [s for s in pair if s is not None and s.runs_ok < s.runs_total]
    missing = any(s is None for s in pair)
    if bad or missing:
        label += " (some runs failed)"
    return label


def per_message_us(summary: Summary | None, cores_key: str) -> float | None:
    """CPU µs per delivered message from two medians (cores ÷ delivered msg/s)."""
    cores, delivered = _get(summary, cores_key), _get(summary, "delivered_rate")
    if cores is None or not delivered:
        return None
    return cores * 1e6 / delivered


def flood_rows(summaries: Sequence[Summary], cell: Cell) -> list[Row]:
    """Delivered and accepted msg/s, deliv%, blocked and CPU of one cell's flood.

    "routed by the broker" only for at-most-once cells: with persistence on, deliveries
    wait for the store and the broker's routing histogram does not count them.
    """
    plexus_system, peer_system = cell.systems
    mine = find(summaries, plexus_system, cell.layout, cell.n_apps, "flood")
    theirs = find(summaries, peer_system, cell.layout, cell.n_apps, "flood")
    what = "flood at-most-once" if cell.group == "at-most-once" else "flood acked+stored"
    label, peer = _label(cell, what, (mine, theirs)), PEER_LABEL[cell.group]
    metrics: list[tuple[str, str, Kind]] = [
        ("delivered msg/s", "delivered_rate", "rate"),
        ("accepted msg/s", "sent_rate", "rate"),
        ("routed by the broker msg/s", "routed_rate", "rate"),
        ("deliv% (deliv/accepted)", "delivered_fraction", "share"),
        ("blocked (time throttled)", "blocked_fraction", "share"),
        ("server CPU", "broker_cores", "cores"),
        ("client processes' CPU", "workers_cores", "cores"),
        ("other load on the box", "other_cores", "cores"),
    ]
    if cell.group != "at-most-once":
        metrics = [m for m in metrics if m[1] != "routed_rate"]
    rows = [
        Row(label if i == 0 else "", name, kind, _get(mine, key), _get(theirs, key), peer)
        for i, (name, key, kind) in enumerate(metrics)
    ]
    rows.append(
        Row("", "client CPU µs per delivered msg", "us",
            per_message_us(mine, "workers_cores"), per_message_us(theirs, "workers_cores"), peer)
    )  # fmt: skip
    return rows


def latency_rows(
    summaries: Sequence[Summary], cell: Cell, rates: Sequence[int], full: bool
) -> list[Row]:
    """End-to-end percentiles (p50/p99/p999 when `full`, else p99) at each offered rate."""
    plexus_system, peer_system = cell.systems
    rows: list[Row] = []
    for rate in sorted(rates):
        phase = f"latency@{rate}"
        mine = find(summaries, plexus_system, cell.layout, cell.n_apps, phase)
        theirs = find(summaries, peer_system, cell.layout, cell.n_apps, phase)
        label = _label(cell, f"e2e @{rate:,} msg/s", (mine, theirs))
        keys = ["p50", "p99", "p999"] if full else ["p99"]
        metrics: list[tuple[str, str, Kind]] = [(f"{k} ms", f"e2e_{k}_ms", "ms") for k in keys]
        metrics.append(("deliv%", "delivered_fraction", "share"))
        peer = PEER_LABEL[cell.group]
        rows += [
            Row(label if i == 0 else "", name, kind, _get(mine, key), _get(theirs, key), peer)
            for i, (name, key, kind) in enumerate(metrics)
        ]
    return rows


def confirm_medians(runs: Sequence[ConfirmRun]) -> dict[str, dict[str, float | None]]:
    """Per system, the medians over its successful repetitions."""
    out: dict[str, dict[str, float | None]] = {}
    for system in dict.fromkeys(r.system for r in runs):
        ok = [r for r in runs if r.system == system and r.status == "ok"]
        out[system] = {
            "each_rate": median(r.each_rate for r in ok),
            "each_p50_ms": median(r.each_latency.p50_us / 1000 for r in ok if r.each_latency),
            "each_p99_ms": median(r.each_latency.p99_us / 1000 for r in ok if r.each_latency),
            "pipelined_rate": median(r.pipelined_rate for r in ok),
            "runs_ok": len(ok),
        }
    return out


def confirm_rows(medians: dict[str, dict[str, float | None]]) -> list[Row]:
    """Confirm-each against JetStream and the LMDB floor; pipelined likewise."""
    mine, js, floor = (medians.get(s, {}) for s in ("plexus", "jetstream", "lmdb"))
    return [
        Row("confirm each, 1 publisher", "confirmed msg/s", "rate",
            mine.get("each_rate"), js.get("each_rate"), "JetStream"),
        Row("", "p50 ms", "ms", mine.get("each_p50_ms"), js.get("each_p50_ms"), "JetStream"),
        Row("", "p99 ms", "ms", mine.get("each_p99_ms"), js.get("each_p99_ms"), "JetStream"),
        Row("", "msg/s vs floor: LMDB sync/msg", "rate",
            mine.get("each_rate"), floor.get("each_rate"), "lmdb"),
        Row("pipelined confirms, 1 publisher", "confirmed msg/s", "rate",
            mine.get("pipelined_rate"), js.get("pipelined_rate"), "JetStream"),
        Row("", "msg/s vs floor: LMDB 1000/sync", "rate",
            mine.get("pipelined_rate"), floor.get("pipelined_rate"), "lmdb"),
    ]  # fmt: skip


def build_rows(
    summaries: Sequence[Summary],
    matrix: Sequence[Cell],
    rates: Sequence[int],
    confirm_runs: Sequence[ConfirmRun],
    headline_apps: int = 100,
) -> list[Row]:
    """The whole table: floods, then latencies (all percentiles for `headline_apps`
    apps, p99 for the other app counts), then confirms."""
    rows: list[Row] = []
    for cell in matrix:
        rows += flood_rows(summaries, cell)
    for cell in matrix:
        if cell.latency:
            rows += latency_rows(summaries, cell, rates, full=cell.n_apps == headline_apps)
    if confirm_runs:
        rows += confirm_rows(confirm_medians(confirm_runs))
    return rows


def _value(value: float | None, kind: Kind) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind in ("ms", "us"):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    if kind == "cores":
        return f"{value:.2f} cores"
    return f"{100 * value:.1f}%"


def _ratio_text(row: Row) -> str:
    r = row.ratio
    if r is None:
        return ""
    return f"{r:.2f}x" if r >= 0.01 else f"{r:.4f}x"


def render(rows: Sequence[Row]) -> str:
    """A fixed-width text table with a header and the ratio's meaning."""
    head = ("workload", "metric", "Plexus", "peer", "peer value", "Plexus/peer")
    body = [
        (r.workload, r.metric, _value(r.plexus, r.kind), r.peer_name, _value(r.peer, r.kind),
         _ratio_text(r))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    left = {0, 1, 3}

    def fmt(line: tuple[str, ...]) -> str:
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    lines = [fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(line) for line in body]
    lines.append("Plexus/peer: above 1 is better for msg/s, worse for ms; medians of repetitions.")
    return "\n".join(lines)


def row_document(row: Row) -> dict[str, object]:
    """One row for the JSON document."""
    return {
        "workload": row.workload,
        "metric": row.metric,
        "plexus": row.plexus,
        "peer": row.peer_name,
        "peer_value": row.peer,
        "ratio": row.ratio,
    }
