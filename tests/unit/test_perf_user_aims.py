"""The user benchmark's aims table, solo cells and paced-confirm figures (pure parts)."""

from __future__ import annotations

from perf.model import NS_PER_S
from perf.summary import Cell as Summary
from perf.user import aims, matrix
from perf.user.publish import PublishRun
from perf.user.synced import Plan, SyncedRun, summarize
from perf.user.table import build_rows, paced_rows, pair, publish_medians, publish_rows


def _summary(cell: matrix.Cell, system: str, phase: str, **median: float) -> Summary:
    s = Summary(system, cell.layout, cell.n_apps, phase, "flood", 0, 3, 3)
    s.median = dict(median)
    return s


def test_solo_cell_runs_plexus_alone_with_latency_phases_and_fewer_reps() -> None:
    cells = matrix.cells([100], [], solo_apps=[500, 100], solo_reps=1)
    solo = [c for c in cells if c.solo]
    assert [c.n_apps for c in solo] == [500]  # 100 is a full mux cell already
    assert len(solo[0].systems) == 1
    order = matrix.run_order(cells, 3, [1000], matrix.Timing(1, 0.5, 0.5), 256, 0.3)
    runs = [cfg for cell, cfg in order if cell.solo]
    assert len(runs) == 1
    assert [p.name for p in runs[0].plan] == ["latency@1000"]


def test_pair_has_no_peer_in_a_solo_cell() -> None:
    cell = matrix.Cell("at-most-once", "mux", 500, latency=True, solo=True, reps=1)
    mine = _summary(cell, cell.systems[0], "latency@1000", route_p99_us=300.0)
    assert pair([mine], cell, "latency@1000") == (mine, None)
    rows = build_rows([mine], [cell], [1000], [])
    assert not any(r.metric == "delivered msg/s" for r in rows)  # no flood
    routing = next(r for r in rows if r.metric == "in-broker routing p99 µs")
    assert routing.plexus == 300.0
    assert "Plexus alone" in rows[0].workload


def test_broker_cpu_is_read_in_the_busiest_flood_and_floods_at_their_worst() -> None:
    procs, mux = matrix.cells([100], [])
    plexus, peer = procs.systems
    summaries = [
        _summary(procs, plexus, "flood", delivered_rate=10_000, broker_process_cores=0.04),
        _summary(procs, peer, "flood", delivered_rate=20_000),
        _summary(mux, plexus, "flood", delivered_rate=1_000, broker_process_cores=0.2),
        _summary(mux, peer, "flood", delivered_rate=40_000),
    ]
    cells = [procs, mux]
    assert aims.busiest(summaries, cells, "at-most-once") == procs
    cpu = aims.broker_cpu(summaries, cells, "at-most-once", 5.0)
    assert cpu.value == 4.0
    assert cpu.met is True
    assert "10+10 procs" in cpu.measured
    flood = aims.worst_flood(summaries, cells, "at-most-once")
    assert flood.value == 1_000 / 40_000
    assert flood.met is False
    assert "100 apps/4 procs" in flood.measured


def test_routing_aim_reads_the_500_app_cell_at_the_lowest_rate() -> None:
    cell = matrix.Cell("at-most-once", "mux", 500, latency=True, solo=True)
    summaries = [
        _summary(cell, cell.systems[0], "latency@1000", route_p99_us=400.0),
        _summary(cell, cell.systems[0], "latency@10000", route_p99_us=900.0),
    ]
    found = aims.routing_p99(summaries, [cell], [10_000, 1000])
    assert found.value == 0.4
    assert found.met is True
    assert aims.routing_p99([], [], [1000]).met is None


def test_missing_figures_show_dashes_and_count_as_not_met() -> None:
    found = aims.aims([], [], [1000, 10_000], {}, {})
    assert len(found) == 11
    assert all(a.met is None and a.measured == "-" for a in found)
    text = aims.render(found)
    assert "0 of 11 aims met" in text


def test_confirm_and_publish_aims() -> None:
    confirm: dict[str, dict[str, float | None]] = {
        "plexus": {"each_rate": 900.0, "pipelined_rate": 60_000.0, "paced_p99_ms": 8.0},
        "jetstream": {"each_rate": 1000.0, "paced_p99_ms": 2.0},
        "lmdb": {"each_rate": 2000.0},
    }
    each_js, each_floor, pipelined, paced = aims.confirm_aims(confirm)
    assert (each_js.value, each_js.met) == (0.9, True)
    assert (each_floor.value, each_floor.met) == (0.45, False)
    assert pipelined.met is True
    assert paced.met is True
    runs = [PublishRun("plexus", 0, calls_rate=100.0), PublishRun("nats", 0, calls_rate=200.0)]
    medians = publish_medians(runs)
    assert aims.publish_aim(medians).value == 0.5
    assert publish_rows(medians)[0].ratio == 0.5


def test_paced_summary_counts_late_and_unconfirmed_messages_in_the_window() -> None:
    plan = Plan(rate=1000, warmup_s=0.002, window_s=0.003)  # 5 messages, 2 of warm-up
    assert plan.count == 5
    assert plan.first_measured == 2
    start = 10 * NS_PER_S
    ms = 1_000_000
    sent = [plan.due_ns(start, k) for k in range(5)]
    sent[3] += 2 * ms  # late
    done = [s + 4 * ms for s in sent]
    run = summarize(SyncedRun("plexus", 0), plan, start, sent, done)
    assert (run.measured, run.confirmed, run.status) == (3, 3, "ok")
    assert run.late_fraction == 1 / 3
    assert run.latency is not None
    assert run.latency.p99_us == 4000.0
    done[4] = 0
    failed = summarize(SyncedRun("plexus", 0), plan, start, sent, done)
    assert failed.status == "failed"
    assert failed.confirmed == 2


def test_paced_rows_put_plexus_beside_jetstream() -> None:
    medians: dict[str, dict[str, float | None]] = {
        "plexus": {"paced_offered": 10_000.0, "paced_p99_ms": 8.0},
        "jetstream": {"paced_offered": 10_000.0, "paced_p99_ms": 4.0},
    }
    rows = paced_rows(medians)
    assert rows[0].workload.startswith("publish -> synced @10,000 msg/s")
    p99 = next(r for r in rows if r.metric == "p99 ms")
    assert p99.ratio == 2.0
    assert paced_rows({}) == []


def test_due_until_is_the_first_message_not_yet_due() -> None:
    plan = Plan(rate=1000, warmup_s=0.002, window_s=0.003)  # one message per ms, 5 in all
    start = 10 * NS_PER_S
    ms = 1_000_000
    assert plan.due_until(start, 0, start - 1) == 0  # nothing due before the start
    assert plan.due_until(start, 0, start) == 1  # message 0 is due at the start
    assert plan.due_until(start, 1, start + 2 * ms) == 3  # from 1: messages 1 and 2
    assert plan.due_until(start, 3, start + 60 * ms) == plan.count  # never past the end
