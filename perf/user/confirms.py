"""One publisher waiting for its confirms: each message in turn, or pipelined.

What an app that must not lose a message pays per publish, three ways, in this process:

- `plexus`: `bus.publish(topic, data, confirm=True)` on `plexus run` with persistence on,
  so the confirm says stored and synced; pipelined: `bus.publish` N times, then
  `bus.flush()` (the Bus keeps at most its window, 10,000, unconfirmed).
- `jetstream`: `await js.publish()` (waits for the stream's PubAck); pipelined:
  `js.publish_async` with at most the same 10,000 unacknowledged, then
  `publish_async_completed()`. nats-server 2.9 acks once written, not synced.
- `lmdb`, the floor: one synced write transaction per message on an environment opened
  with persistence/segments.py's flags (sync, metasync, lock); pipelined: one synced
  transaction per GROUP messages. Nothing that confirms "synced" per message can beat it.
- paced (Plexus and JetStream): one publisher at a fixed rate (10,000 msg/s), never
  waiting, each message timed from its publish call to its confirm (`perf.user.synced`).

Every system is started once; the repetitions interleave, the order rotated each time,
and each figure is the median over repetitions (`perf.user.table`).
"""

from __future__ import annotations

import abc
import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from perf.model import NS_PER_S, LatencySummary, summarize_ns
from perf.systems import BrokerConfig
from perf.user import synced
from perf.user.nats_session import NatsSession
from perf.user.platform import PlatformWithBus
from perf.user.rounds import interleaved
from perf.user.systems import jetstream
from perf.workload import encode

TOPIC = "bench.confirm"
GROUP = 1000  # messages per synced LMDB transaction in the pipelined floor
WARMUP = 50  # confirmed publishes before the first measurement (connections, caches)
MAX_SECONDS = 3600.0
SYSTEMS = ("plexus", "jetstream", "lmdb")


@dataclass(slots=True)
class ConfirmRun:
    """One repetition of one system: sequential confirms, then a pipelined batch."""

    system: str
    rep: int
    status: str = "ok"
    error: str | None = None
    each_count: int = 0
    each_rate: float = 0.0  # confirmed msg/s, one at a time
    each_latency: LatencySummary | None = None  # publish -> confirm, per message
    pipelined_count: int = 0
    pipelined_rate: float = 0.0  # msg/s from the first publish to the last confirm
    paced: synced.SyncedRun | None = None  # publish -> confirm at a fixed offered rate
    extra: dict[str, Any] = field(default_factory=dict)


class Target(abc.ABC):
    """A started system that one publisher in this process confirms against."""

    name: str

    @abc.abstractmethod
    def confirm_one(self, payload: bytes) -> None:
        """Publish `payload` and return once it is confirmed."""

    @abc.abstractmethod
    def pipelined(self, payloads: list[bytes]) -> None:
        """Publish every payload without waiting, then wait until all are confirmed."""

    def paced(self, plan: synced.Plan, payload: bytes) -> synced.SyncedRun | None:
        """Publish at the plan's rate, each message timed to its confirm; None where the
        system has no such figure (the LMDB floor cannot sustain 10,000 commits/s)."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the system; never raises."""


class PlexusTarget(Target):
    """`plexus run` (persistence on) and one `Bus` as app bench-confirm."""

    name = "plexus"

    def __init__(self, workdir: Path) -> None:
        self._plexus = PlatformWithBus(workdir, persistence=True, max_seconds=MAX_SECONDS)
        self._bus = self._plexus.bus

    def confirm_one(self, payload: bytes) -> None:
        self._bus.publish(TOPIC, payload, confirm=True, timeout=30.0)

    def pipelined(self, payloads: list[bytes]) -> None:
        publish = self._bus.publish
        for payload in payloads:
            publish(TOPIC, payload)
        self._bus.flush(120.0)

    def paced(self, plan: synced.Plan, payload: bytes) -> synced.SyncedRun | None:
        start, stamps = synced.paced_bus(self._bus, plan, payload)
        return synced.finished(self.name, 0, plan, start, stamps)

    def close(self) -> None:
        self._plexus.close()


class JetStreamTarget(Target):
    """nats-server -js with the bench stream; nats-py on a loop of its own."""

    name = "jetstream"

    def __init__(self, workdir: Path) -> None:
        self._nats = NatsSession(jetstream.start_broker(BrokerConfig(workdir, MAX_SECONDS, 1)))
        self._js = self._nats.nc.jetstream(publish_async_max_pending=jetstream.INFLIGHT)

    def confirm_one(self, payload: bytes) -> None:
        self._nats.run(self._js.publish(TOPIC, payload, timeout=30.0))

    def pipelined(self, payloads: list[bytes]) -> None:
        self._nats.run(self._pipelined(payloads))

    async def _pipelined(self, payloads: list[bytes]) -> None:
        futures = [await self._js.publish_async(TOPIC, p) for p in payloads]
        await asyncio.wait_for(self._js.publish_async_completed(), 120.0)
        failed = [f for f in futures if f.exception() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} publishes not acknowledged: {failed[0].exception()}")

    def paced(self, plan: synced.Plan, payload: bytes) -> synced.SyncedRun | None:
        start, stamps = self._nats.run(synced.paced_jetstream(self._js, plan, payload))
        return synced.finished(self.name, 0, plan, start, stamps)

    def close(self) -> None:
        self._nats.close()


_KEY = struct.Struct(">Q")


class LmdbTarget(Target):
    """The floor: py-lmdb opened like a persistence segment, synced commits."""

    name = "lmdb"

    def __init__(self, workdir: Path) -> None:
        self._env = lmdb.open(
            str(workdir / "floor.mdb"),
            subdir=False,
            lock=True,
            max_dbs=4,
            map_size=1 << 32,
            create=True,
            mode=0o600,
            readahead=False,
            metasync=True,
            sync=True,
        )
        self._db = self._env.open_db(b"msgs")
        self._seq = 0

    def confirm_one(self, payload: bytes) -> None:
        self._seq += 1
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_KEY.pack(self._seq), payload, append=True)

    def pipelined(self, payloads: list[bytes]) -> None:
        for start in range(0, len(payloads), GROUP):
            with self._env.begin(write=True, db=self._db) as txn:
                for payload in payloads[start : start + GROUP]:
                    self._seq += 1
                    txn.put(_KEY.pack(self._seq), payload, append=True)

    def close(self) -> None:
        self._env.close()


FACTORIES: dict[str, Callable[[Path], Target]] = {
    "plexus": PlexusTarget,
    "jetstream": JetStreamTarget,
    "lmdb": LmdbTarget,
}


def _payload(seq: int, size: int) -> bytes:
    return encode(1, 0, seq, time.monotonic_ns(), size)


def measure(
    target: Target,
    rep: int,
    each_s: float,
    pipelined_n: int,
    size: int,
    plan: synced.Plan | None = None,
) -> ConfirmRun:
    """One repetition against a started target (confirm each, pipelined, then paced at
    `plan`'s rate if given); failures are recorded, not raised."""
    run = ConfirmRun(target.name, rep)
    try:
        latencies: list[int] = []
        now_ns = time.monotonic_ns
        started = now_ns()
        deadline = started + int(each_s * NS_PER_S)
        while (t0 := now_ns()) < deadline:
            target.confirm_one(_payload(len(latencies), size))
            latencies.append(now_ns() - t0)
        run.each_count = len(latencies)
        run.each_rate = len(latencies) / ((now_ns() - started) / NS_PER_S)
        run.each_latency = summarize_ns(latencies)
        payloads = [_payload(i, size) for i in range(pipelined_n)]
        t0 = now_ns()
        target.pipelined(payloads)
        run.pipelined_count = pipelined_n
        run.pipelined_rate = pipelined_n / ((now_ns() - t0) / NS_PER_S)
        if plan is not None:
            run.paced = target.paced(plan, bytes(size))
            if run.paced is not None:
                run.paced.rep = rep
    except Exception as exc:
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    return run


def run_section(
    systems: list[str],
    repeat: int,
    each_s: float,
    pipelined_n: int,
    size: int,
    progress: Callable[[str], None],
    plan: synced.Plan | None = None,
) -> list[ConfirmRun]:
    """Start every system once, then `repeat` interleaved rounds, order rotated."""

    def warm_up(target: Target) -> None:
        for i in range(WARMUP):
            target.confirm_one(_payload(i, size))

    return interleaved(
        "confirm",
        systems,
        FACTORIES,
        warm_up=warm_up,
        measure=lambda target, rep: measure(target, rep, each_s, pipelined_n, size, plan),
        failed=lambda name, rep, error: ConfirmRun(name, rep, "failed", error),
        describe=describe,
        repeat=repeat,
        progress=progress,
    )


def describe(run: ConfirmRun) -> str:
    """One progress line."""
    if run.status != "ok":
        return f"FAILED: {run.error}"
    lat = run.each_latency
    p99 = f", p99 {lat.p99_us / 1000:.2f} ms" if lat else ""
    text = f"each {run.each_rate:,.0f}/s{p99}; pipelined {run.pipelined_rate:,.0f}/s"
    if run.paced is not None:
        text += f"; paced {run.paced.offered_rate:,}/s: {synced.describe(run.paced)}"
    return text
