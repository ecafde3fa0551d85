"""The `mux` workers of the Plexus adapters: one asyncio loop, one `AsyncBus` per app.

A worker process that holds many apps runs them the way a user hosting many apps in one
process would, and the way nats-py's workers do (perf/systems/nats.py): every app is an
`AsyncBus` (`clients.aio`) connected as its own app id, all on one event loop, no thread
per app. The counting is the threaded workers' (perf/user/systems/plexus_bus.py):

* publishers call `publish_nowait`; a `WouldBlock` means the app's window of unconfirmed
  publishes is full (the client throttles it). In the flood the app then awaits
  `publish` for that message (which waits for room, then takes it), and the process
  counts as blocked the time during which *every* one of its apps was waiting, as the
  threaded publisher counts the time it sleeps once every slot has refused (`AllBlocked`).
  Paced, a refused message waits a moment and is stamped anew, as threaded.
* subscribers pass a handler to `subscribe`; the AsyncBus acks each message when the
  handler returns (the default); each subscription counts into its own `Recorder`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from clients.aio import AsyncBus
from clients.errors import WouldBlock
from clients.message import Message
from perf.model import (
    NS_PER_S,
    Phase,
    PhaseTally,
    Schedule,
    WorkerReport,
    WorkerSpec,
    merge_tallies,
    topic_for,
)
from perf.systems import WorkerControl
from perf.user.platform import pub_app, sub_app
from perf.workload import Pacer, Recorder, count_sent, encode, start_timeout_s

FLOOD_BATCH = 64  # publishes per app before yielding to the others (and to the pumps)
WAIT_S = 0.0005  # a paced publisher refused by a full window looks again this soon
CONNECT_S = 30.0
CLOSE_S = 0.5
MAX_ERRORS = 10


class AllBlocked:
    """Time during which all `width` publishers of a process waited for room at once.

    `enter(now)` when one starts waiting, `leave(now)` when it is taken again; only the
    part of an all-waiting span at or after `window_start` counts (as the threaded
    publisher counts only waits that start inside the window)."""

    def __init__(self, width: int, window_start: int) -> None:
        self.width = width
        self.window_start = window_start
        self.waiting = 0
        self.blocked_ns = 0
        self._since: int | None = None

    def enter(self, now: int) -> None:
        self.waiting += 1
        if self.waiting == self.width:
            self._since = now

    def leave(self, now: int) -> None:
        if self._since is not None:
            self.blocked_ns += max(0, now - max(self._since, self.window_start))
            self._since = None
        self.waiting -= 1


async def _sleep_until(t_ns: int) -> None:
    delay = t_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / NS_PER_S)


async def _connect_all(spec: WorkerSpec, app_ids: list[str]) -> list[AsyncBus]:
    """One AsyncBus per app, each with its credential from the spec (in pairs order)."""
    buses: list[AsyncBus] = []
    try:
        for app_id, token in zip(app_ids, spec.credentials, strict=True):
            bus = await AsyncBus.connect(spec.endpoint, app_id, token, timeout=CONNECT_S)
            buses.append(bus)
    except BaseException:
        await _close_all(buses)
        raise
    return buses


async def _close_all(buses: list[AsyncBus]) -> None:
    closing = asyncio.gather(*(bus.close(CLOSE_S) for bus in buses), return_exceptions=True)
    try:
        await asyncio.wait_for(closing, CLOSE_S + 5.0)
    except TimeoutError:
        return


def _errors_of(buses: list[AsyncBus]) -> list[str]:
    """What the broker reported to these apps (dead letters, refusals) and any bus that
    failed, deduplicated."""
    seen: set[str] = set()
    for bus in buses:
        if bus.failure is not None:
            seen.add(f"plexus: {bus.app_id} failed: {type(bus.failure).__name__}: {bus.failure}")
        while len(seen) < MAX_ERRORS:
            try:
                error = bus.errors.get_nowait()
            except asyncio.QueueEmpty:
                break
            seen.add(f"plexus: {type(error).__name__}: {error}")
    return sorted(seen)


async def _flood_one(
    bus: AsyncBus, pair: int, phase: Phase, size: int, t: PhaseTally, waits: AllBlocked
) -> None:
    topic = topic_for(pair)
    now_ns = time.monotonic_ns
    ws, we, tag = phase.window_start_ns, phase.window_end_ns, phase.tag
    publish_nowait = bus.publish_nowait
    seq = 0
    while True:
        for _ in range(FLOOD_BATCH):
            now = now_ns()
            if now >= we:
                return
            payload = encode(tag, pair, seq, now, size)
            try:
                publish_nowait(topic, payload)
            except WouldBlock:  # the window is full: wait for room, then it takes this one
                waits.enter(now)
                try:
                    async with asyncio.timeout((we - now) / NS_PER_S):
                        await bus.publish(topic, payload)
                except TimeoutError:
                    return  # the phase ended first: this one was never taken
                finally:
                    waits.leave(now_ns())
            seq += 1
            count_sent(t, now, ws)
        await asyncio.sleep(0)


async def _flood(buses: list[AsyncBus], spec: WorkerSpec, phase: Phase, t: PhaseTally) -> None:
    waits = AllBlocked(len(buses), phase.window_start_ns)
    try:
        await asyncio.gather(
            *(
                _flood_one(bus, pair, phase, spec.payload_size, t, waits)
                for bus, pair in zip(buses, spec.pairs, strict=True)
            )
        )
    finally:
        t.blocked_ns += waits.blocked_ns


async def _paced(buses: list[AsyncBus], spec: WorkerSpec, phase: Phase, t: PhaseTally) -> None:
    now_ns = time.monotonic_ns
    pacer = Pacer(phase, spec.pairs, spec.n_pairs)
    topics = [topic_for(p) for p in spec.pairs]
    ws, we, tag, width = phase.window_start_ns, phase.window_end_ns, phase.tag, len(buses)
    k = 0
    while (now := now_ns()) < we:
        due = pacer.due_ns(k)
        if due > now:
            await asyncio.sleep((min(due, we) - now) / NS_PER_S)
            continue
        slot = k % width
        payload = encode(tag, spec.pairs[slot], k // width, now, spec.payload_size)
        try:
            buses[slot].publish_nowait(topics[slot], payload)
        except WouldBlock:
            await asyncio.sleep(min(WAIT_S, (we - now) / NS_PER_S))
            if now >= ws:
                t.blocked_ns += now_ns() - now
            continue  # same message, new timestamp
        k += 1
        count_sent(t, now, ws, due)


async def run_publisher(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One AsyncBus per pair as app bench-pub-<pair>, then follow the schedule."""
    buses = await _connect_all(spec, [pub_app(p) for p in spec.pairs])
    try:
        ctl.ready()
        schedule: Schedule | None = await asyncio.to_thread(ctl.wait_start, start_timeout_s(spec))
        if schedule is None:
            return
        tallies = [PhaseTally() for _ in schedule.phases]
        for phase in schedule.phases:
            await _sleep_until(phase.start_ns)
            if phase.kind == "flood":
                await _flood(buses, spec, phase, tallies[phase.index])
            else:
                await _paced(buses, spec, phase, tallies[phase.index])
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies, _errors_of(buses)))
    finally:
        await _close_all(buses)


def discard(_data: bytes) -> None:
    """A subscriber's sink before its Recorder is in place (shared with plexus_bus)."""
    return None


def handler_for(sinks: list[Callable[[bytes], None]], slot: int) -> Callable[[Message], None]:
    """The subscription handler of `slot`: hands the payload to that slot's current sink
    (swapped for a Recorder per phase); shared with plexus_bus's threaded workers."""

    def handle(message: Message) -> None:
        sinks[slot](message.data)

    return handle


async def run_subscriber(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One AsyncBus per pair as app bench-sub-<pair>, subscribed with a handler; count."""
    buses = await _connect_all(spec, [sub_app(p) for p in spec.pairs])
    sinks: list[Callable[[bytes], None]] = [discard] * len(spec.pairs)
    try:
        for slot, (bus, pair) in enumerate(zip(buses, spec.pairs, strict=True)):
            await bus.subscribe(topic_for(pair), handler_for(sinks, slot), timeout=CONNECT_S)
        ctl.ready()
        schedule: Schedule | None = await asyncio.to_thread(ctl.wait_start, start_timeout_s(spec))
        if schedule is None:
            return
        recorders = [Recorder(schedule) for _ in spec.pairs]
        for slot, rec in enumerate(recorders):
            sinks[slot] = rec.on_message
        await _sleep_until(schedule.end_ns)
        tallies = merge_tallies([rec.tallies for rec in recorders])
        errors = _errors_of(buses)
        foreign = sum(rec.foreign for rec in recorders)
        if foreign:
            errors.append(f"{foreign} messages without a phase tag")
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies, errors))
    finally:
        await _close_all(buses)


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop driving an AsyncBus per pair."""
    asyncio.run(run_publisher(spec, ctl))


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop with a subscription handler per pair."""
    asyncio.run(run_subscriber(spec, ctl))
