"""Adapter `jetstream`: NATS JetStream (nats-server -js, a file-storage stream) with nats-py.

The peer of `plexus_stored` in the acknowledged-and-persisted flood. The server runs with
`-js -sd DIR` (DIR in the run's temp dir, the same disk as a Plexus home); the harness
adds one stream `BENCH` on `bench.>` with file storage and otherwise default limits.
Publishers use `js.publish_async`, at most INFLIGHT unacknowledged per connection (the
same bound as the Plexus Bus's window of unconfirmed publishes), so a full window throttles
the app as it does in Plexus (counted as blocked). Subscribers are ephemeral push consumers
(explicit ack policy, the default), and nats-py acks each message when the callback
returns, as the Bus does after a handler.

Beware when reading the figures: nats-server 2.9 acknowledges a stored message once it is
written to the stream's file, not synced (it fsyncs every `sync_interval`, 2 min by
default; per-message sync only exists from 2.10 on), while a Plexus confirm means synced.
"""

from __future__ import annotations

import asyncio
from typing import Any

from clients.session import SessionConfig
from perf import procutil
from perf.model import WorkerSpec
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.systems import nats as core
from perf.systems._tcp_server import TcpServerBroker

NAME = "jetstream"
STREAM = "BENCH"
SUBJECTS = ["bench.>"]
INFLIGHT = SessionConfig(app_id="bench").window
"""The Plexus Bus's window of unconfirmed publishes (clients.session), 10,000."""


def unavailable_reason() -> str | None:
    """Needs the nats-server binary and the nats-py package."""
    return procutil.peer_unavailable("nats-server", "nats", "nats-py")


def start_server(config: BrokerConfig) -> TcpServerBroker:
    """nats-server with JetStream on, its store in the run's temp dir."""
    store = config.workdir / "jetstream"
    return TcpServerBroker(
        config,
        "nats-server",
        "nats",
        lambda binary, port: [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
    )


async def add_stream(endpoint: str) -> None:
    """The stream every bench subject is stored in (file storage, default limits)."""
    import nats
    from nats.js.api import StorageType

    nc = await nats.connect(endpoint, allow_reconnect=False, connect_timeout=10)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=SUBJECTS, storage=StorageType.FILE)
    finally:
        await nc.close()


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """Start the server, then add the stream."""
    server = start_server(config)
    try:
        asyncio.run(add_stream(server.endpoint))
    except BaseException:
        server.stop()
        raise
    return server


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read a PubAck future's outcome so a failed one is not logged as never retrieved;
    a message the stream refused never reaches a consumer, so it shows in deliv%."""
    if not future.cancelled():
        future.exception()


class _Sender:
    """`publish` for the shared nats loops: an acknowledged JetStream publish."""

    def __init__(self, nc: Any) -> None:
        self._js = nc.jetstream(publish_async_max_pending=INFLIGHT)

    async def publish(self, subject: str, data: bytes) -> None:
        future = await self._js.publish_async(subject, data)
        future.add_done_callback(_retrieve)


async def _subscribe(nc: Any, subject: str, cb: core.MsgCallback) -> Any:
    return await nc.jetstream().subscribe(subject, cb=cb, stream=STREAM)


FLAVOUR = core.Flavour(_Sender, _subscribe)


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop driving a connection per pair, JetStream publishes."""
    asyncio.run(core.run_publisher(spec, ctl, FLAVOUR))


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """One asyncio loop with a push consumer per pair, acked after each callback."""
    asyncio.run(core.run_subscriber(spec, ctl, FLAVOUR))
