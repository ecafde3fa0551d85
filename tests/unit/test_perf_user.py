"""The pure parts of the user benchmark: ratios, medians, run order, merged tallies."""

from __future__ import annotations

from array import array

from perf.model import LatencySummary, PhaseTally, merge_tallies
from perf.summary import Cell as Summary
from perf.user import matrix
from perf.user.confirms import ConfirmRun
from perf.user.table import Row, build_rows, confirm_medians, median, ratio, render


def test_ratio_is_plexus_over_peer_and_none_without_both() -> None:
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(None, 200.0) is None
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None


def test_median_skips_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None


def test_shares_get_no_ratio() -> None:
    share = Row("w", "deliv%", "share", 0.5, 1.0, "nats core")
    rate = Row("w", "msg/s", "rate", 5.0, 10.0, "nats core")
    assert share.ratio is None
    assert rate.ratio == 0.5


def test_run_order_interleaves_and_rotates_each_repetition() -> None:
    cells = matrix.cells([100], ["mux"])
    timing = matrix.Timing(1.0, 0.5, 0.5)
    order = matrix.run_order(cells, 2, [1000], timing, 256, 0.3)
    assert len(order) == 2 * len(cells) * 2
    first = [cfg.system for cell, cfg in order if cfg.rep == 0 and cell == cells[0]]
    second = [cfg.system for cell, cfg in order if cfg.rep == 1 and cell == cells[0]]
    assert first == list(cells[0].systems)
    assert second == list(reversed(cells[0].systems))
    assert [p.name for p in order[0][1].plan] == ["flood"]  # the procs cell: flood only
    mux = next(cfg for cell, cfg in order if cell.latency)
    assert [p.name for p in mux.plan] == ["latency@1000", "flood"]


def test_merge_tallies_sums_counters_and_joins_samples() -> None:
    a = [PhaseTally(sent_in_window=2, max_lag_ns=5, latencies_ns=array("q", [1, 2]))]
    b = [PhaseTally(sent_in_window=3, max_lag_ns=9, latencies_ns=array("q", [3]))]
    (merged,) = merge_tallies([a, b])
    assert merged.sent_in_window == 5
    assert merged.max_lag_ns == 9
    assert list(merged.latencies_ns) == [1, 2, 3]
    assert merge_tallies([]) == []


def _confirm(system: str, rate: float, status: str = "ok") -> ConfirmRun:
    run = ConfirmRun(system, 0, status, each_rate=rate, pipelined_rate=10 * rate)
    run.each_latency = LatencySummary(10, 1000.0, 2000.0, 3000.0)
    return run


def test_confirm_medians_use_successful_runs_only() -> None:
    runs = [_confirm("plexus", 1.0), _confirm("plexus", 3.0), _confirm("plexus", 99.0, "failed")]
    runs += [_confirm("plexus", 2.0)]
    medians = confirm_medians(runs)["plexus"]
    assert medians["each_rate"] == 2.0
    assert medians["each_p99_ms"] == 2.0
    assert medians["runs_ok"] == 3


def test_table_puts_each_flood_beside_its_peer() -> None:
    cell = matrix.cells([100], [])[1]
    plexus, peer = cell.systems

    def summary(system: str, delivered: float) -> Summary:
        s = Summary(system, "mux", 100, "flood", "flood", 0, 3, 3)
        s.median = {"delivered_rate": delivered, "sent_rate": delivered}
        return s

    rows = build_rows([summary(plexus, 10_000), summary(peer, 40_000)], [cell], [1000], [])
    delivered = next(r for r in rows if r.metric == "delivered msg/s")
    assert delivered.ratio == 0.25
    text = render(rows)
    assert "0.25x" in text
    assert "nats core" in text
