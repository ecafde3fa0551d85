"""Plain data shared by the harness, the workers and the adapters.

Everything here crosses a process boundary (pickled by multiprocessing), so it
is frozen or plain dataclasses of builtins and arrays: no sockets, no clocks.
All times are CLOCK_MONOTONIC nanoseconds (time.monotonic_ns(), which on Linux
is the same clock as time.perf_counter_ns() and is shared by every process), so
a publisher's timestamp can be compared with a subscriber's receive time.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Literal

PhaseKind = Literal["latency", "flood"]
Role = Literal["pub", "sub"]

NS_PER_S = 1_000_000_000


def topic_for(pair: int) -> str:
    """Topic of publisher/subscriber pair `pair` (fan-out 1, exact match)."""
    return f"bench.{pair}.prices"


@dataclass(frozen=True, slots=True)
class PhasePlan:
    """One phase of a run, relative to nothing yet (the harness picks t0 later)."""

    name: str
    kind: PhaseKind
    rate: int  # total offered msg/s over all publishers; 0 for a flood
    warmup_ns: int  # publishers send, nobody counts
    measure_ns: int  # the counted window
    gap_ns: int  # silence after the window so the backlog drains before the next phase


@dataclass(frozen=True, slots=True)
class Phase:
    """A phase placed on the shared monotonic clock.

    Publishers send from `start_ns` to `window_end_ns`; only messages *sent*
    inside [window_start_ns, window_end_ns) count for latency/delivery, and only
    messages *arriving* inside it count for flood throughput. The payload carries
    `tag` (index + 1) so a late message is never credited to the wrong phase.
    """

    index: int
    name: str
    kind: PhaseKind
    rate: int
    start_ns: int
    window_start_ns: int
    window_end_ns: int

    @property
    def tag(self) -> int:
        return self.index + 1

    @property
    def window_s(self) -> float:
        return (self.window_end_ns - self.window_start_ns) / NS_PER_S


@dataclass(frozen=True, slots=True)
class Schedule:
    """All phases of one run; subscribers keep receiving until `end_ns`."""

    phases: tuple[Phase, ...]
    end_ns: int


def build_schedule(plan: tuple[PhasePlan, ...], t0_ns: int, tail_ns: int) -> Schedule:
    """Place `plan` on the clock starting at `t0_ns` (one formula for everybody)."""
    phases: list[Phase] = []
    t = t0_ns
    for i, p in enumerate(plan):
        ws = t + p.warmup_ns
        we = ws + p.measure_ns
        phases.append(Phase(i, p.name, p.kind, p.rate, t, ws, we))
        t = we + p.gap_ns
    return Schedule(tuple(phases), t + tail_ns)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process must do: be the apps `pairs` of one side.

    In the "procs" layout `pairs` has one element; in "mux" it holds a quarter of
    all pairs, each with its own socket/connection inside this one process.
    """

    system: str
    role: Role
    worker_id: int
    pairs: tuple[int, ...]
    n_pairs: int  # publishers in the whole run (a paced publisher's share of the rate)
    endpoint: str  # BrokerHandle.endpoint, opaque to everybody but the adapter
    payload_size: int
    credentials: tuple[str, ...] = ()
    """One credential per pair, in `pairs` order (BrokerHandle.credentials); () for a
    system without authentication. It reaches the worker in the pickled spec, never in a
    file or on a command line."""


def _samples() -> array[int]:
    return array("q")


@dataclass(slots=True)
class PhaseTally:
    """Counters one worker keeps for one phase (publisher or subscriber side)."""

    sent_in_window: int = 0  # pub: sent with a timestamp inside the window
    sent_total: int = 0  # pub: sent during the whole phase, warm-up included
    blocked_ns: int = 0  # pub: time inside the window spent waiting for the transport
    late: int = 0  # pub (paced): messages sent > 1 ms after their due time
    max_lag_ns: int = 0  # pub (paced): worst lateness against the pacing schedule
    received_in_window: int = 0  # sub: tagged with this phase and sent inside its window
    arrived_in_window: int = 0  # sub: arrived inside the window, whatever the tag
    latencies_ns: array[int] = field(default_factory=_samples)  # sub, latency phases


@dataclass(slots=True)
class WorkerReport:
    """What a worker hands back to the harness, once, at the end."""

    worker_id: int
    role: Role
    tallies: list[PhaseTally]
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a latency sample, in microseconds."""

    count: int
    p50_us: float
    p99_us: float
    p999_us: float

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> LatencySummary | None:
        """The broker's in-broker routing latency from a STATS answer (None: nothing
        routed since the last reset)."""
        latency = stats.get("route_latency")
        if not isinstance(latency, dict) or not latency.get("count"):
            return None
        return cls(
            int(latency["count"]),
            float(latency["p50_us"]),
            float(latency["p99_us"]),
            float(latency["p999_us"]),
        )


def summarize_ns(samples: array[int] | list[int]) -> LatencySummary | None:
    """Nearest-rank percentiles of nanosecond samples; None for an empty sample."""
    if not samples:
        return None
    s = sorted(samples)
    n = len(s)

    def rank(q: float) -> float:
        return s[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000.0

    return LatencySummary(n, rank(0.50), rank(0.99), rank(0.999))


def merge_tallies(per_source: list[list[PhaseTally]]) -> list[PhaseTally]:
    """Phase-by-phase sums of several sources' tallies (e.g. one Recorder per client
    thread, so no two threads ever update one counter); latency samples are joined."""
    if not per_source:
        return []
    merged = [PhaseTally() for _ in per_source[0]]
    for tallies in per_source:
        for total, t in zip(merged, tallies, strict=True):
            total.sent_in_window += t.sent_in_window
            total.sent_total += t.sent_total
            total.blocked_ns += t.blocked_ns
            total.late += t.late
            total.max_lag_ns = max(total.max_lag_ns, t.max_lag_ns)
            total.received_in_window += t.received_in_window
            total.arrived_in_window += t.arrived_in_window
            total.latencies_ns.extend(t.latencies_ns)
    return merged
