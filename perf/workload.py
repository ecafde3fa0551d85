"""The workload, written once so every system is driven identically.

A payload is `size` bytes: a 24-byte header (phase tag, pair, sequence number,
send time in monotonic ns) padded with zeros. Publishers either flood (send as
fast as the transport accepts) or are paced (each publisher sends its share of
the phase's total rate at evenly staggered due times; when late it catches up
at once instead of silently lowering the rate, and the lateness is counted).

`publish_schedule` / `subscribe_schedule` drive any client with blocking-socket
semantics through the SyncPublisher / SyncSubscriber protocols; an asyncio
client reuses `Pacer`, `Recorder` and `encode` and writes only its own loop.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Protocol

from perf.model import NS_PER_S, Phase, PhaseTally, Schedule, WorkerSpec

HEADER = struct.Struct("<IIQQ")  # tag, pair, seq, send_ns
LATE_NS = 1_000_000  # a paced message sent more than 1 ms after its due time is "late"
POLL_S = 0.05  # longest a driver blocks in one transport call (keeps loops bounded)


def encode(tag: int, pair: int, seq: int, send_ns: int, size: int) -> bytes:
    """A benchmark payload of exactly `size` bytes (size >= HEADER.size)."""
    return HEADER.pack(tag, pair, seq, send_ns) + bytes(size - HEADER.size)


def start_timeout_s(spec: WorkerSpec) -> float:
    """How long a ready worker waits for the start signal before giving up.

    Generous on purpose: the harness may still be spawning hundreds of other
    workers; it sends an explicit abort if it gives up first.
    """
    return 120.0 + 0.5 * spec.n_pairs


def sleep_until(t_ns: int) -> None:
    """Sleep (no spinning) until the monotonic clock reaches `t_ns`."""
    delay = t_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / NS_PER_S)


class Pacer:
    """Due times of a paced phase for the pairs of one publisher process.

    Every pair sends `rate / n_pairs` msg/s; pair p is offset by p / n_pairs of
    an interval so that the whole system's sends are evenly spread. The k-th
    message of this process goes to slot k % len(pairs).
    """

    def __init__(self, phase: Phase, pairs: tuple[int, ...], n_pairs: int) -> None:
        self.interval_ns = NS_PER_S * n_pairs / phase.rate
        self.offsets = [phase.start_ns + self.interval_ns * p / n_pairs for p in pairs]
        self.width = len(pairs)

    def due_ns(self, k: int) -> int:
        """When message k of this process is due."""
        rnd, slot = divmod(k, self.width)
        return int(self.offsets[slot] + rnd * self.interval_ns)


class Recorder:
    """Subscriber-side counting; `on_message` is the per-message hot path."""

    def __init__(self, schedule: Schedule) -> None:
        self.tallies = [PhaseTally() for _ in schedule.phases]
        self._windows = [
            (p.window_start_ns, p.window_end_ns, p.kind == "latency", self.tallies[p.index])
            for p in schedule.phases
        ]
        flood = [p for p in schedule.phases if p.kind == "flood"]
        self._flood_start = flood[0].window_start_ns if flood else 0
        self._flood_end = flood[0].window_end_ns if flood else 0
        self._flood_tally = self.tallies[flood[0].index] if flood else PhaseTally()
        self._unpack = HEADER.unpack_from
        self._now = time.monotonic_ns
        self.foreign = 0  # messages without a valid phase tag (should stay 0)

    def on_message(self, payload: bytes) -> None:
        """Account one delivered payload, stamped with the receive time now."""
        now = self._now()
        tag, _pair, _seq, sent = self._unpack(payload)
        if self._flood_start <= now < self._flood_end:
            self._flood_tally.arrived_in_window += 1
        if 0 < tag <= len(self._windows):
            ws, we, is_latency, tally = self._windows[tag - 1]
            if ws <= sent < we:
                tally.received_in_window += 1
                if is_latency:
                    tally.latencies_ns.append(now - sent)
        else:
            self.foreign += 1


def count_sent(t: PhaseTally, now: int, window_start: int, due: int | None = None) -> None:
    """Account one message sent at `now` (and due at `due` when paced)."""
    t.sent_total += 1
    if now >= window_start:
        t.sent_in_window += 1
        if due is not None:
            lag = now - due
            t.max_lag_ns = max(t.max_lag_ns, lag)
            if lag > LATE_NS:
                t.late += 1


class SyncPublisher(Protocol):
    """The sending half of a blocking-socket client with one socket per slot."""

    def try_send(self, slot: int, payload: bytes) -> bool:
        """Queue payload on slot's topic without blocking; False if the transport is full."""

    def wait_writable(self, timeout_s: float) -> None:
        """Block until some slot may accept a message again, or timeout_s passes."""


class SyncSubscriber(Protocol):
    """The receiving half: deliver what has arrived on any slot to `sink`."""

    def poll(self, timeout_s: float, sink: Callable[[bytes], None]) -> None:
        """Wait up to timeout_s for messages, pass each payload to sink, return."""


def publish_schedule(
    schedule: Schedule, pairs: tuple[int, ...], n_pairs: int, size: int, tx: SyncPublisher
) -> list[PhaseTally]:
    """Run every phase of `schedule` as the publisher of `pairs`; return its tallies."""
    tallies = [PhaseTally() for _ in schedule.phases]
    for phase in schedule.phases:
        sleep_until(phase.start_ns)
        if phase.kind == "flood":
            _flood(phase, pairs, size, tx, tallies[phase.index])
        else:
            _paced(
                phase=phase, pairs=pairs, n_pairs=n_pairs, size=size, tx=tx, t=tallies[phase.index]
            )
    return tallies


def _flood(
    phase: Phase, pairs: tuple[int, ...], size: int, tx: SyncPublisher, t: PhaseTally
) -> None:
    now_ns = time.monotonic_ns
    ws, we, tag, width = phase.window_start_ns, phase.window_end_ns, phase.tag, len(pairs)
    seq = k = refused = 0
    while (now := now_ns()) < we:
        slot = k % width
        k += 1
        if tx.try_send(slot, encode(tag, pairs[slot], seq, now, size)):
            seq += 1
            refused = 0
            count_sent(t, now, ws)
            continue
        refused += 1
        if refused >= width:  # every slot is full: the transport throttles us
            tx.wait_writable(min(POLL_S, (we - now) / NS_PER_S))
            refused = 0
            if now >= ws:
                t.blocked_ns += now_ns() - now


def _paced(
    *,
    phase: Phase,
    pairs: tuple[int, ...],
    n_pairs: int,
    size: int,
    tx: SyncPublisher,
    t: PhaseTally,
) -> None:
    now_ns = time.monotonic_ns
    pacer = Pacer(phase, pairs, n_pairs)
    ws, we, tag, width = phase.window_start_ns, phase.window_end_ns, phase.tag, len(pairs)
    k = 0
    while (now := now_ns()) < we:
        due = pacer.due_ns(k)
        if due > now:
            time.sleep(min(due, we) / NS_PER_S - now / NS_PER_S)
            continue
        slot = k % width
        if not tx.try_send(slot, encode(tag, pairs[slot], k // width, now, size)):
            tx.wait_writable(min(POLL_S, (we - now) / NS_PER_S))
            if now >= ws:
                t.blocked_ns += now_ns() - now
            continue  # same message, new timestamp
        k += 1
        count_sent(t, now, ws, due)


def subscribe_schedule(schedule: Schedule, rx: SyncSubscriber) -> Recorder:
    """Receive until the schedule ends; return the recorder with the tallies."""
    rec = Recorder(schedule)
    sink = rec.on_message
    while (now := time.monotonic_ns()) < schedule.end_ns:
        rx.poll(min(POLL_S, (schedule.end_ns - now) / NS_PER_S), sink)
    return rec
