"""The one table of the user benchmark: Plexus beside its peer, and the ratio (pure).

Rows are built from the harness's medians (`perf.summary.Cell`) and the confirm runs;
nothing here measures or prints. Ratio = Plexus ÷ peer: above 1 is better for a rate,
worse for a latency; shares (deliv%, blocked) and CPU get no ratio. "routed by the broker"
(Plexus only: its STATS histogram count per second of window) tells a slow broker from
clients that never sent what they accepted; "server CPU" is Plexus's supervisor, broker
and persistence service together, or nats-server; "broker CPU" the broker process alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from perf.summary import Cell as Summary
from perf.user.confirms import ConfirmRun
from perf.user.matrix import PEER_LABEL, Cell
from perf.user.publish import PublishRun

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
    missing = any(s is None for s in pair[: len(cell.systems)])
    if bad or missing:
        label += " (some runs failed)"
    if cell.solo:
        label += " (Plexus alone" + (f", {cell.reps} rep)" if cell.reps else ")")
    return label


def pair(
    summaries: Sequence[Summary], cell: Cell, phase: str
) -> tuple[Summary | None, Summary | None]:
    """(Plexus, peer) summaries of one phase of `cell`; the peer None in a solo cell."""
    found = [find(summaries, system, cell.layout, cell.n_apps, phase) for system in cell.systems]
    return found[0], found[1] if len(found) > 1 else None


def per_message_us(summary: Summary | None, cores_key: str) -> float | None:
    """CPU µs per delivered message from two medians (cores ÷ delivered msg/s)."""
    cores, delivered = _get(summary, cores_key), _get(summary, "delivered_rate")
    if cores is None or not delivered:
        return None
    return cores * 1e6 / delivered


PER_MESSAGE = (
    ("server CPU µs per delivered msg", "broker_cores"),
    ("broker CPU µs per delivered msg", "broker_process_cores"),
    ("client CPU µs per delivered msg", "workers_cores"),
)
"""CPU per delivered message: all of the server (Plexus: supervisor + broker + persistence),
the broker process alone (nats-server is one process: the same figure), every client."""


def flood_rows(summaries: Sequence[Summary], cell: Cell) -> list[Row]:
    """Delivered and accepted msg/s, deliv%, blocked and CPU of one cell's flood.

    "routed by the broker" only for at-most-once cells: with persistence on, deliveries
    wait for the store and the broker's routing histogram does not count them.
    """
    mine, theirs = pair(summaries, cell, "flood")
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
    for name, key in PER_MESSAGE:
        rows.append(
            Row("", name, "us", per_message_us(mine, key), per_message_us(theirs, key), peer)
        )
    return rows


def latency_rows(
    summaries: Sequence[Summary], cell: Cell, rates: Sequence[int], full: bool
) -> list[Row]:
    """End-to-end percentiles (p50/p99/p999 when `full`, else p99) at each offered rate,
    and the broker's own routing p99 (Plexus's STATS; nats-server cannot tell)."""
    rows: list[Row] = []
    for rate in sorted(rates):
        mine, theirs = pair(summaries, cell, f"latency@{rate}")
        label = _label(cell, f"e2e @{rate:,} msg/s", (mine, theirs))
        keys = ["p50", "p99", "p999"] if full else ["p99"]
        metrics: list[tuple[str, str, Kind]] = [(f"{k} ms", f"e2e_{k}_ms", "ms") for k in keys]
        metrics.append(("deliv%", "delivered_fraction", "share"))
        metrics.append(("in-broker routing p99 µs", "route_p99_us", "us"))
        peer = "-" if cell.solo else PEER_LABEL[cell.group]
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
        paced = [r.paced for r in ok if r.paced is not None and r.paced.status == "ok"]
        if paced:
            out[system] |= {
                "paced_offered": median(float(r.offered_rate) for r in paced),
                "paced_sent_rate": median(r.achieved_rate for r in paced),
                "paced_late": median(r.late_fraction for r in paced),
                "paced_p50_ms": median(r.latency.p50_us / 1000 for r in paced if r.latency),
                "paced_p99_ms": median(r.latency.p99_us / 1000 for r in paced if r.latency),
                "paced_p999_ms": median(r.latency.p999_us / 1000 for r in paced if r.latency),
                "paced_runs_ok": len(paced),
            }
    return out


def publish_medians(runs: Sequence[PublishRun]) -> dict[str, dict[str, float | None]]:
    """Per system, the medians of the publish section's successful repetitions."""
    out: dict[str, dict[str, float | None]] = {}
    for system in dict.fromkeys(r.system for r in runs):
        ok = [r for r in runs if r.system == system and r.status == "ok"]
        out[system] = {
            "calls_rate": median(r.calls_rate for r in ok),
            "flushed_rate": median(r.flushed_rate for r in ok),
            "runs_ok": len(ok),
        }
    return out


def publish_rows(medians: dict[str, dict[str, float | None]]) -> list[Row]:
    """Publish calls/s of one at-most-once publisher, Bus against nats-py (publish + the
    final flush: nats-py only buffers in publish); then both until everything was flushed
    (the Bus: every publish confirmed, i.e. routed)."""
    mine, theirs = medians.get("plexus", {}), medians.get("nats", {})
    return [
        Row("one publisher, at-most-once, no sub", "publish calls/s (nats: + flush)", "rate",
            mine.get("calls_rate"), theirs.get("calls_rate"), "nats core"),
        Row("", "msg/s until flushed (Bus: confirmed)", "rate",
            mine.get("flushed_rate"), theirs.get("flushed_rate"), "nats core"),
    ]  # fmt: skip


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


def paced_rows(medians: dict[str, dict[str, float | None]]) -> list[Row]:
    """Publish -> confirm (Plexus: synced) per message at a fixed offered rate."""
    mine, js = medians.get("plexus", {}), medians.get("jetstream", {})
    offered = mine.get("paced_offered") or js.get("paced_offered")
    if offered is None:
        return []
    label = f"publish -> synced @{offered:,.0f} msg/s, 1 publisher"
    metrics: list[tuple[str, str, Kind]] = [
        ("sent msg/s", "paced_sent_rate", "rate"),
        ("late% (> 1 ms behind schedule)", "paced_late", "share"),
        ("p50 ms", "paced_p50_ms", "ms"),
        ("p99 ms", "paced_p99_ms", "ms"),
        ("p999 ms", "paced_p999_ms", "ms"),
    ]
    return [
        Row(label if i == 0 else "", name, kind, mine.get(key), js.get(key), "JetStream")
        for i, (name, key, kind) in enumerate(metrics)
    ]


def build_rows(
    summaries: Sequence[Summary],
    matrix: Sequence[Cell],
    rates: Sequence[int],
    confirm_runs: Sequence[ConfirmRun],
    publish_runs: Sequence[PublishRun] = (),
    headline_apps: int = 100,
) -> list[Row]:
    """The whole table: floods, then latencies (all percentiles for `headline_apps`
    apps, p99 for the other app counts), then confirms, paced confirms, publish calls."""
    rows: list[Row] = []
    for cell in matrix:
        if cell.flood:
            rows += flood_rows(summaries, cell)
    for cell in matrix:
        if cell.latency:
            rows += latency_rows(summaries, cell, rates, full=cell.n_apps == headline_apps)
    if confirm_runs:
        medians = confirm_medians(confirm_runs)
        rows += confirm_rows(medians) + paced_rows(medians)
    if publish_runs:
        rows += publish_rows(publish_medians(publish_runs))
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
