"""Two consumers of the event stream, each with its own platform identity and cursor: the
real persistence service (`$persistence`) and a test consumer as `$audit` built on
clients.stream, against the real broker. The `$audit` consumer is stopped mid-stream and
started again from its watermark; both end with every event exactly once and in order.

Needs the broker's multi-consumer event stream (issue 9, point 3): each registered
consumer's cursor, retention until every one has passed an event, ZAP on the events
socket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import event_records as R
from broker import wire
from broker.paths import PlatformPaths
from clients.stream import StreamConsumer
from persistence.store import MessageStore
from tests.conftest import BrokerHandle, wait_for

MANIFESTS = {
    "pub": '[permissions]\npublish = ["jobs.>"]\n',
    "sub": '[permissions]\nsubscribe = ["jobs.>"]\n',
}
AUDIT = "$audit"


class AuditConsumer:
    """A minimal stream consumer in a thread: takes events, 'stores' them in a list,
    acknowledges each batch at once."""

    def __init__(self, paths: PlatformPaths, token: str, taken: list[R.Event]) -> None:
        self.taken = taken
        self._context: zmq.Context[Any] = zmq.Context()
        watermark = taken[-1].seq if taken else 0
        self._consumer = StreamConsumer(
            self._context,
            paths.bus_endpoint(),
            paths.events_endpoint(),
            AUDIT,
            token,
            watermark=watermark,
            session="audit",
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    @property
    def watermark(self) -> int:
        return self.taken[-1].seq if self.taken else 0

    def start(self) -> AuditConsumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()
        self._context.term()

    def _run(self) -> None:
        try:
            consumer = self._consumer
            poller = zmq.Poller()
            for sock in consumer.sockets():
                poller.register(sock, zmq.POLLIN)
            consumer.start()
            while not self._stop.is_set():
                ready = dict(poller.poll(20))
                fresh, controls = consumer.read(ready)
                for control in controls:
                    if isinstance(control, wire.Welcome):
                        consumer.sync(self.watermark)
                if fresh:
                    self.taken.extend(fresh)
                    consumer.ack(self.watermark)
                consumer.tick(self.watermark)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)


@pytest.fixture
def platform(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(short_tmp, MANIFESTS)
    handle.start(persistence=True)
    handle.start_persistence()
    yield handle
    handle.close()


def _published_seqs(events: list[R.Event], ids: set[bytes]) -> list[int]:
    return [e.seq for e in events if isinstance(e.record, R.Published) and e.record.msg_id in ids]


def test_two_consumers_one_restarted_each_get_every_event_once_in_order(
    platform: BrokerHandle,
) -> None:
    token = platform.credentials.mint(AUDIT)
    taken: list[R.Event] = []
    audit = AuditConsumer(platform.paths, token, taken).start()
    sub = platform.connect("sub")
    sub.subscribe("jobs.>", durable=True)
    pub = platform.connect("pub")
    ids: set[bytes] = set()
    try:
        for n in range(300):
            ids.add(bytes.fromhex(pub.publish("jobs.a", {"n": n}, confirm=n % 50 == 49)))
        wait_for(lambda: len(_published_seqs(taken, ids)) >= 100, timeout=20)
        audit.stop()  # mid-stream: the broker keeps what $audit has not acknowledged
        for n in range(300, 600):
            ids.add(bytes.fromhex(pub.publish("jobs.a", {"n": n}, confirm=n % 50 == 49)))
        audit = AuditConsumer(platform.paths, token, taken).start()
        wait_for(lambda: len(_published_seqs(taken, ids)) == 600, timeout=30)
    finally:
        audit.stop()
    assert audit.errors == []

    seqs = [e.seq for e in taken]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous: once, in order
    # $audit is not an expected consumer: it starts with what the broker still retained
    # when it first synced (persistence may have passed the first events), before any of
    # this test's publishes
    assert seqs[0] < min(_published_seqs(taken, ids))

    # persistence, the other consumer, stored every message once, in order
    store = MessageStore(platform.paths.segments_dir, readonly=True)
    try:
        stored = [m.seq for m in store.scan(0) if m.msg_id in ids]
    finally:
        store.close()
    assert stored == _published_seqs(taken, ids)
    assert len(stored) == len(set(stored)) == 600
