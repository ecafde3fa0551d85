"""Issue 11's aims, each read from this run's medians: measured, aim, met or not (pure).

One `make bench` run fills the table, so every ratio compares figures measured side by
side on the same box. Which cell answers which aim is fixed here, and the aims table
names it:

- broker CPU per delivered message: the broker process alone (schedstat), in the
  group's flood cell where Plexus delivered the most (`busiest`): where the broker works
  hardest, the figure is least diluted by what it spends while idle (timers, heartbeats
  of hundreds of sessions), and it is the per-message cost the aim is about;
- flood ratios: the worst over every flood cell of the group (an aim is met when it
  holds in each layout, not on average);
- end-to-end p99 at 10,000 msg/s: the 100-app `mux` cell (the Bus acks every delivery);
- routing p99 with 500 apps: the broker's STATS histogram in the 500-app `mux` cell at
  the lowest offered rate (latency phases only; at 10,000 msg/s the table shows it too).

A figure that is missing (its section did not run or failed) shows "-" and met "-".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from perf.summary import Cell as Summary
from perf.user.matrix import HEADLINE_APPS, ROUTING_APPS, Cell
from perf.user.table import find, pair, per_message_us, ratio


@dataclass(frozen=True, slots=True)
class Aim:
    """One line of the aims table."""

    figure: str
    value: float | None
    measured: str  # the value as shown, with what it was read from
    aim: str
    met: bool | None


def _check(value: float | None, test: Callable[[float], bool]) -> bool | None:
    return None if value is None else test(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _headline(cells: Sequence[Cell], group: str) -> Cell | None:
    for cell in cells:
        if cell.group == group and cell.layout == "mux" and cell.n_apps == HEADLINE_APPS:
            return cell
    return None


def busiest(summaries: Sequence[Summary], cells: Sequence[Cell], group: str) -> Cell | None:
    """The group's flood cell where Plexus delivered the most msg/s (None: none ran)."""
    best: tuple[float, Cell] | None = None
    for cell in cells:
        if cell.group != group or not cell.flood:
            continue
        mine = pair(summaries, cell, "flood")[0]
        rate = mine.get("delivered_rate") if mine else None
        if rate is not None and (best is None or rate > best[0]):
            best = (rate, cell)
    return best[1] if best else None


def broker_cpu(
    summaries: Sequence[Summary], cells: Sequence[Cell], group: str, limit: float
) -> Aim:
    """Broker process CPU µs per delivered message in the group's busiest flood cell."""
    what = "at-most-once" if group == "at-most-once" else "acked + persisted"
    cell = busiest(summaries, cells, group)
    mine = pair(summaries, cell, "flood")[0] if cell is not None else None
    value = per_message_us(mine, "broker_process_cores")
    shown = "-" if value is None else f"{value:.1f} µs ({cell.label if cell else ''})"
    return Aim(
        f"broker CPU per delivered msg, {what}",
        value,
        shown,
        f"≤ {limit:g} µs",
        _check(value, lambda v: v <= limit),
    )


def worst_flood(summaries: Sequence[Summary], cells: Sequence[Cell], group: str) -> Aim:
    """The lowest delivered-msg/s ratio to the peer over the group's flood cells."""
    worst: tuple[float, str] | None = None
    for cell in cells:
        if cell.group != group or not cell.flood:
            continue
        mine, theirs = pair(summaries, cell, "flood")
        r = ratio(*(s.get("delivered_rate") if s else None for s in (mine, theirs)))
        if r is not None and (worst is None or r < worst[0]):
            worst = (r, cell.label)
    value = worst[0] if worst else None
    figure = (
        "flood delivered, at-most-once, Plexus client vs nats core"
        if group == "at-most-once"
        else "flood delivered, acked + persisted, Plexus client vs JetStream"
    )
    shown = "-" if worst is None else f"{worst[0]:.2f}x (worst: {worst[1]})"
    return Aim(figure, value, shown, "≥ 1.0x", _check(value, lambda v: v >= 1.0))


def e2e_p99(summaries: Sequence[Summary], cells: Sequence[Cell], rate: int) -> Aim:
    """End-to-end p99 at `rate` in the 100-app at-most-once mux cell, against nats."""
    cell = _headline(cells, "at-most-once")
    mine, theirs = pair(summaries, cell, f"latency@{rate}") if cell else (None, None)
    p99 = mine.get("e2e_p99_ms") if mine else None
    peer = theirs.get("e2e_p99_ms") if theirs else None
    value = ratio(p99, peer)
    shown = "-" if value is None else f"{p99:,.2f} vs {peer:,.2f} ms ({value:.2f}x)"
    return Aim(
        f"e2e p99 @{rate:,} msg/s, {HEADLINE_APPS} apps mux (acked)",
        value,
        shown,
        "≤ nats core (≤ 1.0x)",
        _check(value, lambda v: v <= 1.0),
    )


def routing_p99(summaries: Sequence[Summary], cells: Sequence[Cell], rates: Sequence[int]) -> Aim:
    """The broker's routing p99 with 500 apps, at the lowest offered rate."""
    cell = next(
        (c for c in cells if c.layout == "mux" and c.n_apps == ROUTING_APPS and c.latency), None
    )
    rate = min(rates) if rates else None
    summary = None
    if cell is not None and rate is not None:
        summary = find(summaries, cell.systems[0], cell.layout, cell.n_apps, f"latency@{rate}")
    p99_us = summary.get("route_p99_us") if summary else None
    value = p99_us / 1000 if p99_us is not None else None
    shown = "-" if value is None else f"{value:.3f} ms (@{rate:,} msg/s)"
    return Aim(
        f"in-broker routing p99, {ROUTING_APPS} apps",
        value,
        shown,
        "< 0.5 ms",
        _check(value, lambda v: v < 0.5),
    )


def confirm_aims(confirm: dict[str, dict[str, float | None]]) -> list[Aim]:
    """Confirm each (vs JetStream, vs the LMDB floor), pipelined, paced p99."""
    mine, js, floor = (confirm.get(s, {}) for s in ("plexus", "jetstream", "lmdb"))
    each = mine.get("each_rate")
    vs_js, vs_floor = ratio(each, js.get("each_rate")), ratio(each, floor.get("each_rate"))
    pipelined = mine.get("pipelined_rate")
    p99, js_p99 = mine.get("paced_p99_ms"), js.get("paced_p99_ms")
    offered = mine.get("paced_offered")
    return [
        Aim("confirm each, msg/s vs JetStream sync publish", vs_js,
            "-" if vs_js is None else f"{each:,.0f} msg/s ({vs_js:.2f}x)",
            "≥ 0.8x", _check(vs_js, lambda v: v >= 0.8)),
        Aim("confirm each, msg/s vs one synced LMDB commit/msg", vs_floor, _x(vs_floor),
            "≥ 0.5x (within 2x)", _check(vs_floor, lambda v: v >= 0.5)),
        Aim("pipelined confirmed publishes then flush", pipelined,
            "-" if pipelined is None else f"{pipelined:,.0f} msg/s",
            "≥ 50,000 msg/s", _check(pipelined, lambda v: v >= 50_000)),
        Aim(f"publish -> synced p99 @{offered or 10_000:,.0f} msg/s", p99,
            "-" if p99 is None else f"{p99:.2f} ms (JetStream {js_p99 or 0:.2f} ms, not synced)",
            "< 10 ms", _check(p99, lambda v: v < 10.0)),
    ]  # fmt: skip


def publish_aim(publish: dict[str, dict[str, float | None]]) -> Aim:
    """One Bus publisher's publish calls/s against nats-py publish + flush."""
    mine, theirs = (
        publish.get("plexus", {}).get("calls_rate"),
        publish.get("nats", {}).get("calls_rate"),
    )
    value = ratio(mine, theirs)
    shown = "-" if value is None else f"{mine:,.0f} vs {theirs:,.0f} calls/s ({value:.2f}x)"
    return Aim(
        "one Bus publisher, at-most-once, publish calls/s vs nats-py",
        value,
        shown,
        "≥ 1.0x",
        _check(value, lambda v: v >= 1.0),
    )


def aims(
    summaries: Sequence[Summary],
    cells: Sequence[Cell],
    rates: Sequence[int],
    confirm: dict[str, dict[str, float | None]],
    publish: dict[str, dict[str, float | None]],
) -> list[Aim]:
    """Every aim of issue 11, in the issue's order."""
    high = max(rates) if rates else 10_000
    return [
        broker_cpu(summaries, cells, "at-most-once", 5.0),
        broker_cpu(summaries, cells, "stored", 10.0),
        worst_flood(summaries, cells, "at-most-once"),
        worst_flood(summaries, cells, "stored"),
        *confirm_aims(confirm),
        publish_aim(publish),
        e2e_p99(summaries, cells, high),
        routing_p99(summaries, cells, rates),
    ]


def render(found: Sequence[Aim]) -> str:
    """The compact aims table."""
    head = ("aim of issue 11", "measured", "aim", "met")
    body = [
        (a.figure, a.measured, a.aim, "-" if a.met is None else ("yes" if a.met else "NO"))
        for a in found
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, tuple("-" * w for w in widths), *body]]  # fmt: skip
    met = sum(1 for a in found if a.met)
    lines.append(f"{met} of {len(found)} aims met in this run.")
    return "\n".join(lines)
