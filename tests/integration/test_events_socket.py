"""The events socket of a real broker process (persistence off): a platform consumer
authenticated as `$audit` follows the stream over real sockets and sees the events of
what apps do; an app with a valid credential of its own gets nothing there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from broker import event_records as R
from broker import protocol as P
from broker.wire import EvFetch, EvSync, EvSyncOk, Hello
from clients.bus import Bus, BusError
from tests.conftest import BrokerHandle, authenticate


class StreamConsumer:
    """A SUB on the events socket plus a DEALER link, as platform identity `identity`."""

    def __init__(self, handle: BrokerHandle, identity: str) -> None:
        self.context = zmq.Context()
        token = handle.credentials.mint(identity)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.linger = 0
        authenticate(self.sub, token)
        self.sub.subscribe(R.EV)
        self.sub.connect(handle.paths.events_endpoint())
        self.link = self.context.socket(zmq.DEALER)
        self.link.linger = 0
        authenticate(self.link, token)
        self.link.connect(handle.endpoint)
        self.received = 0
        self.events: list[R.Event] = []

    def sync(self) -> EvSyncOk:
        self.link.send_multipart(Hello(session="stream").frames())
        assert self.link.poll(5000)
        assert self.link.recv_multipart()[0] == P.WELCOME
        self.link.send_multipart(EvSync(0).frames())
        assert self.link.poll(5000)
        ok = EvSyncOk.decode(self.link.recv_multipart())
        self.received = ok.next - 1
        return ok

    def _take(self, first: int, blob: bytes) -> None:
        if first > self.received + 1:
            self._fetch()
        for event in R.decode_events(blob):
            if event.seq == self.received + 1:
                self.events.append(event)
                self.received = event.seq
            elif event.seq > self.received + 1:
                self._fetch()

    def _fetch(self) -> None:
        self.link.send_multipart(EvFetch(self.received + 1).frames())
        while self.link.poll(2000):
            frames = self.link.recv_multipart()
            if frames[0] == P.EVDATA:
                for event in R.decode_events(frames[2]):
                    if event.seq == self.received + 1:
                        self.events.append(event)
                        self.received = event.seq
                return

    def poll(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                frames = self.sub.recv_multipart()
                self._take(R.decode_head(frames[1])[1], frames[2])

    def kinds(self) -> set[str]:
        return {type(e.record).__name__ for e in self.events}

    def close(self) -> None:
        self.sub.close(0)
        self.link.close(0)
        self.context.term()


@pytest.fixture
def audit(broker: BrokerHandle) -> Iterator[StreamConsumer]:
    consumer = StreamConsumer(broker, "$audit")
    yield consumer
    consumer.close()


def _app_sub(handle: BrokerHandle, app_id: str) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    context: zmq.Context[Any] = zmq.Context()
    sub: zmq.Socket[bytes] = context.socket(zmq.SUB)
    sub.linger = 0
    authenticate(sub, handle.credentials.mint(app_id))  # a valid app credential
    sub.subscribe(b"")
    sub.connect(handle.paths.events_endpoint())
    return context, sub


def test_a_platform_consumer_sees_what_apps_do_and_an_app_sees_nothing(
    broker: BrokerHandle, audit: StreamConsumer
) -> None:
    audit.poll(0.3)  # let the SUB handshake finish before the stream starts
    assert audit.sync().restore is False  # registered: from now on events are kept for it
    intruder_context, intruder = _app_sub(broker, "sub")
    unauthenticated = intruder_context.socket(zmq.SUB)
    unauthenticated.linger = 0
    unauthenticated.subscribe(b"")
    unauthenticated.connect(broker.paths.events_endpoint())
    try:
        sub = broker.connect("sub")
        subscription = sub.subscribe("market.>")
        pub = broker.connect("pub")
        pub.publish("market.x", {"px": 1}, confirm=True)
        assert subscription.get(timeout=5.0) is not None
        with pytest.raises(BusError):
            pub.publish("news.denied", {"no": 1}, confirm=True)
        with pytest.raises(BusError):
            Bus.connect(broker.endpoint, "pub", "not-a-credential", timeout=1.0)
        wanted = {
            "SessionChanged",
            "Subscribed",
            "Published",
            "Routed",
            "DeliveryAttempted",
            "Acked",
            "Denied",
            "AuthFailed",
        }
        deadline = time.monotonic() + 10
        while not wanted <= audit.kinds() and time.monotonic() < deadline:
            audit.poll(0.2)
        assert wanted <= audit.kinds(), audit.kinds()
        assert [e.seq for e in audit.events] == list(range(audit.events[0].seq, audit.received + 1))
        [published] = [e.record for e in audit.events if isinstance(e.record, R.Published)]
        assert (published.sender, published.topic) == ("pub", "market.x")
        # the app's own valid credential does not open the events socket
        assert not intruder.poll(500)
        assert not unauthenticated.poll(100)
        auth = [e.record for e in audit.events if isinstance(e.record, R.AuthFailed)]
        assert any(a.app == "sub" and "may not connect" in a.reason for a in auth)
    finally:
        intruder.close(0)
        unauthenticated.close(0)
        intruder_context.term()
