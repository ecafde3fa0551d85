"""The pure parts of the user benchmark's asyncio (mux) workers: which worker runs
AsyncBus, and the blocked time of a process whose publishers all wait for room."""

from __future__ import annotations

from perf.model import WorkerSpec
from perf.user.systems.plexus_aio_workers import AllBlocked
from perf.user.systems.plexus_bus import uses_asyncio


def _spec(pairs: tuple[int, ...], n_pairs: int) -> WorkerSpec:
    return WorkerSpec("plexus_bus", "pub", 0, pairs, n_pairs, "ipc://x", 256)


def test_only_a_worker_with_several_apps_runs_asyncbus() -> None:
    assert uses_asyncio(_spec((0, 4, 8), 50))  # mux: a quarter of the pairs
    assert not uses_asyncio(_spec((3,), 10))  # procs: one app per process


def test_blocked_counts_only_while_every_publisher_waits() -> None:
    waits = AllBlocked(width=3, window_start=0)
    waits.enter(10)
    waits.enter(20)
    waits.leave(30)  # never all three at once
    assert waits.blocked_ns == 0
    waits.enter(40)
    waits.enter(50)  # all three from 50
    waits.leave(80)
    waits.enter(90)  # all three again from 90
    waits.leave(95)
    assert waits.blocked_ns == 30 + 5
    assert waits.waiting == 2


def test_blocked_before_the_window_is_not_counted() -> None:
    waits = AllBlocked(width=1, window_start=100)
    waits.enter(50)
    waits.leave(90)  # all before the window
    waits.enter(95)
    waits.leave(130)  # counts from the window start
    assert waits.blocked_ns == 30
