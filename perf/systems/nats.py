"""Adapter `nats`: the Debian nats-server binary with nats-py (asyncio) clients.

One nats.connect() per pair, all on one event loop per worker process. nats-py
coalesces publishes in a 2 MiB pending buffer written by its own flusher task;
a publish that finds the buffer full awaits the flush, and that wait is what
is counted as "blocked". Reconnects are disabled so a connection the server
drops as a slow consumer shows up as an error, not as a silent gap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from perf import procutil
from perf.model import NS_PER_S, Phase, PhaseTally, Schedule, WorkerReport, WorkerSpec, topic_for
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.systems._tcp_server import TcpServerBroker
from perf.workload import Pacer, Recorder, count_sent, encode, start_timeout_s

NAME = "nats"
FLOOD_BATCH = 64  # publishes per task before yielding to the other connections
BLOCKED_NS = 200_000  # a publish that took longer than this waited for a flush
MAX_ERRORS = 20

MsgCallback = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Flavour:
    """How workers publish and subscribe over their connections: core NATS here; the
    user benchmark's JetStream adapter (perf/user/systems/jetstream.py) passes its own,
    so both drive the same loops and count the same way."""

    sender: Callable[[Any], Any]  # connection -> object with `async publish(subject, data)`
    subscribe: Callable[[Any, str, MsgCallback], Awaitable[Any]]


async def _core_subscribe(nc: Any, subject: str, cb: MsgCallback) -> Any:
    return await nc.subscribe(subject, cb=cb)


CORE = Flavour(lambda nc: nc, _core_subscribe)


def unavailable_reason() -> str | None:
    """Needs the nats-server binary and the nats-py package."""
    return procutil.peer_unavailable("nats-server", "nats", "nats-py")


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """Start nats-server and wait until its port accepts connections."""
    return TcpServerBroker(
        config,
        "nats-server",
        "nats",
        lambda binary, port: [binary, "-a", "127.0.0.1", "-p", str(port)],
    )


async def _sleep_until(t_ns: int) -> None:
    delay = t_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / NS_PER_S)


async def _connect_all(spec: WorkerSpec, errors: list[str]) -> list[Any]:
    import nats

    async def on_error(exc: Exception) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append(f"nats: {type(exc).__name__}: {exc}")

    return [
        await nats.connect(
            spec.endpoint,
            name=f"bench-{spec.role}-{pair}",
            allow_reconnect=False,
            connect_timeout=10,
            error_cb=on_error,
        )
        for pair in spec.pairs
    ]


async def _close_all(conns: list[Any]) -> None:
    closing = asyncio.gather(*(nc.close() for nc in conns), return_exceptions=True)
    try:
        await asyncio.wait_for(closing, 5.0)
    except TimeoutError:
        return


async def _flood_one(nc: Any, pair: int, phase: Phase, size: int, t: PhaseTally) -> None:
    subject = topic_for(pair)
    now_ns = time.monotonic_ns
    ws, we, tag, publish = phase.window_start_ns, phase.window_end_ns, phase.tag, nc.publish
    seq = 0
    while True:
        for _ in range(FLOOD_BATCH):
            now = now_ns()
            if now >= we:
                return
            await publish(subject, encode(tag, pair, seq, now, size))
            seq += 1
            count_sent(t, now, ws)
            took = now_ns() - now
            if took > BLOCKED_NS and now >= ws:
                t.blocked_ns += took
        await asyncio.sleep(0)


async def _paced(conns: list[Any], spec: WorkerSpec, phase: Phase, t: PhaseTally) -> None:
    now_ns = time.monotonic_ns
    pacer = Pacer(phase, spec.pairs, spec.n_pairs)
    subjects = [topic_for(p) for p in spec.pairs]
    ws, we, tag, width = phase.window_start_ns, phase.window_end_ns, phase.tag, len(conns)
    k = 0
    while (now := now_ns()) < we:
        due = pacer.due_ns(k)
        if due > now:
            await asyncio.sleep((min(due, we) - now) / NS_PER_S)
            continue
        slot = k % width
        payload = encode(tag, spec.pairs[slot], k // width, now, spec.payload_size)
        await conns[slot].publish(subjects[slot], payload)
        k += 1
        count_sent(t, now, ws, due)


async def run_publisher(spec: WorkerSpec, ctl: WorkerControl, flavour: Flavour = CORE) -> None:
    """Connect one client per pair, follow the schedule through `flavour`'s senders."""
    errors: list[str] = []
    conns = await _connect_all(spec, errors)
    senders = [flavour.sender(nc) for nc in conns]
    try:
        ctl.ready()
        schedule: Schedule | None = await asyncio.to_thread(ctl.wait_start, start_timeout_s(spec))
        if schedule is None:
            return
        tallies = [PhaseTally() for _ in schedule.phases]
        for phase in schedule.phases:
            await _sleep_until(phase.start_ns)
            t = tallies[phase.index]
            if phase.kind == "flood":
                await asyncio.gather(
                    *(
                        _flood_one(nc, p, phase, spec.payload_size, t)
                        for nc, p in zip(senders, spec.pairs, strict=True)
                    )
                )
            else:
                await _paced(senders, spec, phase, t)
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies, errors))
    finally:
        await _close_all(conns)


async def run_subscriber(spec: WorkerSpec, ctl: WorkerControl, flavour: Flavour = CORE) -> None:
    """Connect and subscribe one client per pair through `flavour`, count until the end."""
    errors: list[str] = []
    conns = await _connect_all(spec, errors)
    sink: list[Callable[[bytes], None]] = [lambda _payload: None]

    async def on_msg(msg: Any) -> None:
        sink[0](msg.data)

    try:
        for nc, pair in zip(conns, spec.pairs, strict=True):
            await flavour.subscribe(nc, topic_for(pair), on_msg)
        for nc in conns:
            await nc.flush(timeout=10)  # the server has the subscription now
        ctl.ready()
        schedule: Schedule | None = await asyncio.to_thread(ctl.wait_start, start_timeout_s(spec))
        if schedule is None:
            return
        rec = Recorder(schedule)
        sink[0] = rec.on_message
        await _sleep_until(schedule.end_ns)
        if rec.foreign:
            errors.append(f"{rec.foreign} messages without a phase tag")
        ctl.report(WorkerReport(spec.worker_id, spec.role, rec.tallies, errors))
    finally:
        await _close_all(conns)


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop driving a connection per pair."""
    asyncio.run(run_publisher(spec, ctl))


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop with a subscription callback per pair."""
    asyncio.run(run_subscriber(spec, ctl))
