"""Publish -> synced at a steady 10,000 msg/s: how long does an app wait for its confirm?

The confirm section times one confirm at a time (a round trip each) or a whole batch
(one figure per batch). Neither says what a steady publisher that keeps going waits per
message for "stored and synced". Here one publisher sends at a fixed offered rate
(default 10,000 msg/s), never waiting, and every message's time from the publish call
to its confirmation is measured:

- `plexus`: `plexus run` (persistence on), one threaded `Bus` as app bench-confirm. The
  Bus has no public per-message confirm callback (`publish(confirm=True)` blocks), so
  this uses the seam `publish(confirm=True)` itself uses: `encoded_publish` and
  `Connection.enqueue_publish(..., future)`, with a done-callback on the future that
  stamps the time on the Bus's I/O thread when the CONFIRM arrives (stored and synced).
- `jetstream`: nats-server -js with the bench stream, `js.publish_async` (≤ 10,000 in
  flight), a done-callback on each PubAck future. nats-server 2.9 acks once written,
  not synced: Plexus is held to the stricter promise.

Pacing: every TICK_S (0.5 ms) the publisher wakes and sends what fell due (one wake-up
per message would cost more CPU than the messages on this box); latency runs from each
message's real publish call, and messages sent > 1 ms after their due time count as late.
Only messages due inside the window count; the warm-up before it is unmeasured. It runs
in the confirm section (`perf.user.confirms`), against the systems started there, after
each repetition's confirm-each and pipelined figures; medians in `perf.user.table`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from clients.bus import Bus
from clients.outbound import encoded_publish
from perf.model import NS_PER_S, LatencySummary, summarize_ns
from perf.workload import LATE_NS

TOPIC = "bench.synced"
TICK_S = 0.0005  # 2,000 wake-ups/s: ~5 messages each at 10,000 msg/s
SETTLE_S = 30.0  # longest wait after the window for the last confirms


@dataclass(frozen=True, slots=True)
class Plan:
    """Offered rate and the window of one repetition."""

    rate: int
    warmup_s: float
    window_s: float

    def due_ns(self, start_ns: int, k: int) -> int:
        """When message k is due, message 0 at `start_ns`."""
        return start_ns + k * NS_PER_S // self.rate

    def due_until(self, start_ns: int, k: int, now_ns: int) -> int:
        """The first message from `k` on that is not yet due at `now_ns` (`count` when
        all are): messages k up to it are to be sent now."""
        while k < self.count and self.due_ns(start_ns, k) <= now_ns:
            k += 1
        return k

    @property
    def count(self) -> int:
        """Messages of the whole repetition (warm-up and window)."""
        return int(self.rate * (self.warmup_s + self.window_s))

    @property
    def first_measured(self) -> int:
        """Index of the first message due inside the window."""
        return int(self.rate * self.warmup_s)


@dataclass(slots=True)
class SyncedRun:
    """One repetition of one system."""

    system: str
    rep: int
    status: str = "ok"
    error: str | None = None
    offered_rate: int = 0
    measured: int = 0  # messages due inside the window
    confirmed: int = 0  # of those, confirmed before the settle deadline
    achieved_rate: float = 0.0  # measured messages ÷ the time their sending took
    late_fraction: float = 0.0  # sent > 1 ms after their due time
    latency: LatencySummary | None = None  # publish call -> confirm, confirmed ones
    max_ms: float = 0.0


def summarize(
    run: SyncedRun, plan: Plan, start_ns: int, sent_ns: list[int], done_ns: list[int]
) -> SyncedRun:
    """Fill `run` from the stamps of every message (done 0: never confirmed). Pure."""
    first = plan.first_measured
    sent, done = sent_ns[first:], done_ns[first:]
    latencies = [d - s for s, d in zip(sent, done, strict=True) if d]
    late = sum(1 for k, s in enumerate(sent, first) if s - plan.due_ns(start_ns, k) > LATE_NS)
    run.offered_rate = plan.rate
    run.measured = len(sent)
    run.confirmed = len(latencies)
    if len(sent) > 1 and sent[-1] > sent[0]:
        run.achieved_rate = (len(sent) - 1) * NS_PER_S / (sent[-1] - sent[0])
    run.late_fraction = late / len(sent) if sent else 0.0
    run.latency = summarize_ns(latencies)
    run.max_ms = max(latencies, default=0) / 1e6
    if run.confirmed < run.measured:
        run.status = "failed"
        run.error = f"{run.measured - run.confirmed} of {run.measured} never confirmed"
    return run


class _Stamps:
    """Send and confirm times of one repetition; `confirmed` runs on the client's thread."""

    def __init__(self, n: int) -> None:
        self.sent = [0] * n
        self.done = [0] * n
        self._now = time.monotonic_ns

    def confirmed(self, index: int, future: Any) -> None:
        if not future.cancelled() and future.exception() is None:
            self.done[index] = self._now()


def _wait_done(stamps: _Stamps, deadline_ns: int) -> None:
    while 0 in stamps.done and time.monotonic_ns() < deadline_ns:
        time.sleep(0.01)


def paced_bus(bus: Bus, plan: Plan, payload: bytes) -> tuple[int, _Stamps]:
    """Publish `plan.count` messages with a threaded Bus at the plan's rate, each with a
    future stamped when its CONFIRM arrives; (start_ns, stamps) once all arrived or
    SETTLE_S passed."""
    stamps = _Stamps(plan.count)
    enqueue = bus._io.enqueue_publish  # the seam publish(confirm=True) uses
    now = time.monotonic_ns
    start = now() + int(TICK_S * NS_PER_S)
    k = 0
    while k < plan.count:
        due = plan.due_until(start, k, now())
        for j in range(k, due):
            stamps.sent[j] = now()
            msg_id, header, data = encoded_publish(TOPIC, payload)
            future: Future[None] = Future()
            future.add_done_callback(functools.partial(stamps.confirmed, j))
            enqueue(msg_id, header, data, future)
        k = due
        time.sleep(TICK_S)
    _wait_done(stamps, now() + int(SETTLE_S * NS_PER_S))
    return start, stamps


async def paced_jetstream(js: Any, plan: Plan, payload: bytes) -> tuple[int, _Stamps]:
    """The same with nats-py's `js.publish_async`, each PubAck future stamped when done."""
    stamps = _Stamps(plan.count)
    publish = js.publish_async
    now = time.monotonic_ns
    start = now() + int(TICK_S * NS_PER_S)
    k = 0
    while k < plan.count:
        due = plan.due_until(start, k, now())
        for j in range(k, due):
            stamps.sent[j] = now()
            future = await publish(TOPIC, payload)
            future.add_done_callback(functools.partial(stamps.confirmed, j))
        k = due
        await asyncio.sleep(TICK_S)
    deadline = now() + int(SETTLE_S * NS_PER_S)
    while 0 in stamps.done and now() < deadline:
        await asyncio.sleep(0.01)
    return start, stamps


def finished(system: str, rep: int, plan: Plan, start_ns: int, stamps: _Stamps) -> SyncedRun:
    """The repetition's figures from its stamps."""
    return summarize(SyncedRun(system, rep), plan, start_ns, stamps.sent, stamps.done)


def describe(run: SyncedRun) -> str:
    """One progress line."""
    lat = run.latency
    text = f"{run.achieved_rate:,.0f}/s sent, late {100 * run.late_fraction:.0f}%"
    if lat is not None:
        text += f", p50 {lat.p50_us / 1000:.2f} ms, p99 {lat.p99_us / 1000:.2f} ms"
    if run.status != "ok":
        text = f"FAILED: {run.error} ({text})"
    return text
