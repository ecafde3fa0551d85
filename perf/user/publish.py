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
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf.bench_client import time_publishes
from perf.systems import BrokerConfig
from perf.systems import nats as core
from perf.user.platform import CONFIRM_APP, Platform, connect

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
        self._platform = Platform(
            workdir, persistence=False, n_pairs=0, max_seconds=MAX_SECONDS, stats=False
        )
        try:
            self._bus = connect(self._platform.endpoint, CONFIRM_APP)
        except BaseException:
            self._platform.stop()
            raise

    def burst(self, payload: bytes, n: int) -> tuple[float, float]:
        times = time_publishes(self._bus, TOPIC, n, payload)
        return times.calls_per_s(n), times.confirmed_per_s(n)

    def close(self) -> None:
        try:
            self._bus.close(1.0)
        finally:
            self._platform.stop()


class _Nats(_Target):
    name = "nats"

    def __init__(self, workdir: Path) -> None:
        self._server = core.start_broker(BrokerConfig(workdir, MAX_SECONDS, 1))
        self._loop = asyncio.new_event_loop()
        try:
            self._nc = self._loop.run_until_complete(self._connect())
        except BaseException:
            self._loop.close()
            self._server.stop()
            raise

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(self._server.endpoint, allow_reconnect=False, connect_timeout=10)

    def burst(self, payload: bytes, n: int) -> tuple[float, float]:
        seconds = self._loop.run_until_complete(self._burst(payload, n))
        return n / seconds, n / seconds

    async def _burst(self, payload: bytes, n: int) -> float:
        publish = self._nc.publish
        started = time.monotonic()
        for _ in range(n):
            await publish(TOPIC, payload)
        await self._nc.flush(timeout=120)
        return time.monotonic() - started

    def close(self) -> None:
        try:  # closing a benchmark peer: a failure changes nothing, the server stops next
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.wait_for(self._nc.close(), 5.0))
        finally:
            self._loop.close()
            self._server.stop()


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
    root = Path(tempfile.mkdtemp(prefix="px-user-publish-"))
    targets: dict[str, _Target] = {}
    runs: list[PublishRun] = []
    try:
        for name in systems:
            workdir = root / name
            workdir.mkdir()
            try:
                targets[name] = FACTORIES[name](workdir)
                targets[name].burst(bytes(size), WARMUP)
            except Exception as exc:
                progress(f"publish: {name} did not start: {type(exc).__name__}: {exc}")
                runs += [PublishRun(name, r, "failed", f"start: {exc}") for r in range(repeat)]
        started = [s for s in systems if s in targets]
        for rep in range(repeat):
            k = rep % len(started) if started else 0
            for name in started[k:] + started[:k]:
                run = measure(targets[name], rep, n, size)
                runs.append(run)
                progress(f"publish rep {rep + 1} {name:7} {describe(run)}")
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(root, ignore_errors=True)
    return runs


def describe(run: PublishRun) -> str:
    """One progress line."""
    if run.status != "ok":
        return f"FAILED: {run.error}"
    return f"{run.calls_rate:,.0f} calls/s, {run.flushed_rate:,.0f} msg/s flushed"
