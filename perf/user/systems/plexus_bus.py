"""Adapter `plexus_bus`: Plexus through its own clients, persistence off.

The platform is a real `plexus run --no-persistence` (perf.user.platform). Every app is
connected as its own app id, with the credential the supervisor issued for it (handed
over in the worker's spec). A worker process with one app (the `procs` layout: one app
per process, what a desktop app is) runs it as a threaded `clients.bus.Bus` (its I/O
thread, its handler thread). A worker process with several apps (the `mux` layout) runs
them as one `clients.aio.AsyncBus` each, all on one asyncio loop, as a user hosting many
apps in one process would and as nats-py's workers do (plexus_aio_workers.py). Publishers
call `publish_nowait`; a `WouldBlock` means the window of unconfirmed publishes is full,
i.e. the client throttles the app, and the time until it takes one again is counted as
blocked. Subscribers pass a handler to `subscribe`; the client acks each message when the
handler returns (what an app gets by default). Each subscription has its own Recorder.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from clients.bus import Bus, WouldBlock
from perf.model import WorkerReport, WorkerSpec, merge_tallies, topic_for
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.user.platform import Platform, connect, pub_app, sub_app
from perf.user.systems import plexus_aio_workers
from perf.workload import Recorder, publish_schedule, sleep_until, start_timeout_s

NAME = "plexus_bus"
WAIT_S = 0.0005  # a throttled publisher looks again this soon (the window is 10,000 deep)
MAX_ERRORS = 10
CLOSE_S = 0.5


def unavailable_reason() -> str | None:
    """Always available: the platform is this repository."""
    return None


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """`plexus run --no-persistence` with one manifest per bench app."""
    return start_platform(config, persistence=False)


def start_platform(config: BrokerConfig, *, persistence: bool) -> Platform:
    return Platform(
        config.workdir,
        persistence=persistence,
        n_pairs=config.n_apps // 2,
        max_seconds=config.max_seconds,
    )


class _Publishers:
    """SyncPublisher over one Bus per pair."""

    def __init__(self, buses: list[Bus], topics: list[str]) -> None:
        self._buses = buses
        self._topics = topics

    def try_send(self, slot: int, payload: bytes) -> bool:
        try:
            self._buses[slot].publish_nowait(self._topics[slot], payload)
        except WouldBlock:
            return False
        return True

    def wait_writable(self, timeout_s: float) -> None:
        time.sleep(min(timeout_s, WAIT_S))


def _errors_of(buses: list[Bus]) -> list[str]:
    """What the broker reported to these apps (dead letters, refusals), deduplicated."""
    seen: set[str] = set()
    for bus in buses:
        while len(seen) < MAX_ERRORS:
            try:
                error = bus.errors.get_nowait()
            except queue.Empty:
                break
            seen.add(f"plexus: {type(error).__name__}: {error}")
    return sorted(seen)


def _close(buses: list[Bus]) -> None:
    for bus in buses:
        bus.close(CLOSE_S)


def uses_asyncio(spec: WorkerSpec) -> bool:
    """Whether this worker runs its apps as AsyncBus objects on one loop: when it holds
    more than one app (the `mux` layout; a `procs` worker is one app)."""
    return len(spec.pairs) > 1


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """The publishers of `spec.pairs`: AsyncBus on one loop when several, else one Bus."""
    if uses_asyncio(spec):
        plexus_aio_workers.publisher_worker(spec, ctl)
    else:
        _threaded_publisher(spec, ctl)


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """The subscribers of `spec.pairs`: AsyncBus on one loop when several, else one Bus."""
    if uses_asyncio(spec):
        plexus_aio_workers.subscriber_worker(spec, ctl)
    else:
        _threaded_subscriber(spec, ctl)


def _threaded_publisher(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One Bus per pair as app bench-pub-<pair>, then follow the schedule."""
    buses: list[Bus] = []
    try:
        buses = [
            connect(spec.endpoint, pub_app(p), token)
            for p, token in zip(spec.pairs, spec.credentials, strict=True)
        ]
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        tx = _Publishers(buses, [topic_for(p) for p in spec.pairs])
        tallies = publish_schedule(schedule, spec.pairs, spec.n_pairs, spec.payload_size, tx)
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies, _errors_of(buses)))
    finally:
        _close(buses)


def _threaded_subscriber(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One Bus per pair as app bench-sub-<pair>, subscribed with a handler; count."""
    buses: list[Bus] = []
    sinks: list[Callable[[bytes], None]] = [plexus_aio_workers.discard] * len(spec.pairs)
    try:
        for slot, (pair, token) in enumerate(zip(spec.pairs, spec.credentials, strict=True)):
            buses.append(connect(spec.endpoint, sub_app(pair), token))
            buses[-1].subscribe(
                topic_for(pair), plexus_aio_workers.handler_for(sinks, slot), timeout=30.0
            )
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        recorders = [Recorder(schedule) for _ in spec.pairs]
        for slot, rec in enumerate(recorders):
            sinks[slot] = rec.on_message
        sleep_until(schedule.end_ns)
        tallies = merge_tallies([rec.tallies for rec in recorders])
        errors = _errors_of(buses)
        foreign = sum(rec.foreign for rec in recorders)
        if foreign:
            errors.append(f"{foreign} messages without a phase tag")
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies, errors))
    finally:
        _close(buses)
