"""One publisher, at-most-once, nobody subscribed: how fast can an app hand messages over?

The cost of a publish call is what an app pays on its own thread, before any broker or
subscriber is involved; on this 2-core box it bounds every flood. Two systems, each
started once, repetitions interleaved (order rotated), medians in `perf.user.table`:

- `plexus`: `plexus run --no-persistence`, one `Bus` as app bench-confirm, 256-byte
  payloads, N `bus.publish(...)` then one `flush()`, timed by `perf.bench_client`'s
  `time_publishes` (the client benchmark's own flood loop, so both benchmarks measure
  the same thing). Publish calls/s count until the last `publish` returned (the Bus
  waits there when its window of 10,000 unconfirmed is full); msg/s with the flush
  until every publish was confirmed (routed, with persistence off).
- `nats`: core nats-server, nats-py `await nc.publish(...)` N times and one
  `await nc.flush()` (a PING/PONG after the buffered data went out), all in the time:
  nats-py only buffers in `publish`, so without the flush nothing would be sent.

N (20,000 with --quick, 100,000 otherwise) is above the Bus's window of 10,000
unconfirmed publishes, so the figure is a sustained rate (the broker must confirm to let
the publisher go on, as nats-server must read what nats-py writes), not the speed of
filling a buffer. Payloads are 256 bytes; the Bus packs them with msgpack (258 bytes).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from perf.bench_client import time_publishes
from perf.systems import BrokerConfig
from perf.systems import nats as core
from perf.user.nats_session import NatsSession
from perf.user.platform import PlatformWithBus
from perf.user.rounds import interleaved

TOPIC = "bench.publish"
WARMUP = 2000  # publishes (and a flush) before the first measurement: connections, caches
MAX_SECONDS = 3600.0
SYSTEMS = ("plexus", "nats")


@dataclass(slots=True)
class PublishRun:
    """One repetition of one system: N publishes, then a flush."""

    system: str
    rep: int
    status: str = "ok"
    error: str | None = None
    messages: int = 0
    calls_rate: float = 0.0  # publish calls/s (nats: including the final flush)
    flushed_rate: float = 0.0  # msg/s from the first publish until the flush returned


class _Target(abc.ABC):
    """A started system with one publisher in this process."""

    name: str

    @abc.abstractmethod
    def burst(self, payload: bytes, n: int) -> tuple[float, float]:
        """Publish `payload` n times, then flush: (calls/s, msg/s until flushed)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the system; never raises."""


class _Plexus(_Target):
    name = "plexus"

    def __init__(self, workdir: Path) -> None:
        self._plexus = PlatformWithBus(workdir, persistence=False, max_seconds=MAX_SECONDS)

    def burst(self, payload: bytes, n: int) -> tuple[float, float]:
        times = time_publishes(self._plexus.bus, TOPIC, n, payload)
        return times.calls_per_s(n), times.confirmed_per_s(n)

    def close(self) -> None:
        self._plexus.close()


class _Nats(_Target):
    name = "nats"

    def __init__(self, workdir: Path) -> None:
        self._nats = NatsSession(core.start_broker(BrokerConfig(workdir, MAX_SECONDS, 1)))

    def burst(self, payload: bytes, n: int) -> tuple[float, float]:
        seconds = self._nats.run(self._burst(payload, n))
        return n / seconds, n / seconds

    async def _burst(self, payload: bytes, n: int) -> float:
        nc = self._nats.nc
        publish = nc.publish
        started = time.monotonic()
        for _ in range(n):
            await publish(TOPIC, payload)
        await nc.flush(timeout=120)
        return time.monotonic() - started

    def close(self) -> None:
        self._nats.close()


FACTORIES: dict[str, Callable[[Path], _Target]] = {"plexus": _Plexus, "nats": _Nats}


def measure(target: _Target, rep: int, n: int, size: int) -> PublishRun:
    """One repetition against a started target; failures are recorded, not raised."""
    run = PublishRun(target.name, rep, messages=n)
    try:
        run.calls_rate, run.flushed_rate = target.burst(bytes(size), n)
    except Exception as exc:
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    return run


def run_section(
    systems: list[str], repeat: int, n: int, size: int, progress: Callable[[str], None]
) -> list[PublishRun]:
    """Start every system once, warm it up, then `repeat` interleaved rounds."""

    def warm_up(target: _Target) -> None:
        target.burst(bytes(size), WARMUP)

    return interleaved(
        "publish",
        systems,
        FACTORIES,
        warm_up=warm_up,
        measure=lambda target, rep: measure(target, rep, n, size),
        failed=lambda name, rep, error: PublishRun(name, rep, "failed", error),
        describe=describe,
        repeat=repeat,
        progress=progress,
    )


def describe(run: PublishRun) -> str:
    """One progress line."""
    if run.status != "ok":
        return f"FAILED: {run.error}"
    return f"{run.calls_rate:,.0f} calls/s, {run.flushed_rate:,.0f} msg/s flushed"
