"""Packed batches on real sockets: a live broker process, raw DEALER clients offering
protocol version 1 or 2, and the threaded Bus client (which speaks version 2)."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
import zmq

from broker import protocol as P
from broker import wire
from broker.codec import encode_pub_header, new_message_id, pack
from broker.errors import Code
from tests.conftest import BrokerHandle, authenticate


class Raw:
    """One raw connection: HELLO with `versions`, then frames in and out."""

    def __init__(self, broker: BrokerHandle, app_id: str, versions: list[int]) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        authenticate(sock, broker.credentials.mint(app_id))
        sock.connect(broker.endpoint)
        self.sock = sock
        self.sock.send_multipart([P.HELLO, pack({"v": versions, "session": f"raw-{versions}"})])
        reply = self.next()
        assert reply[0] == P.WELCOME
        self.version = msgpack.unpackb(reply[1])["v"]

    def next(self, skip: tuple[bytes, ...] = (P.CREDIT,)) -> list[bytes]:
        while True:
            assert self.sock.poll(10_000), "the broker sent nothing for 10 s"
            frames = self.sock.recv_multipart()
            if frames[0] not in skip:
                return frames

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raws(broker: BrokerHandle) -> Iterator[list[Raw]]:
    opened: list[Raw] = []
    yield opened
    for raw in opened:
        raw.close()


def test_packed_pub_is_confirmed_and_each_subscriber_gets_its_own_layout(
    broker: BrokerHandle, raws: list[Raw]
) -> None:
    new = Raw(broker, "sub", [1, 2])
    old = Raw(broker, "both", [1])
    raws += [new, old]
    assert (new.version, old.version) == (2, 1)
    for raw, sid in ((new, 1), (old, 2)):
        raw.sock.send_multipart(wire.Subscribe(sid, "market.>").frames())
        assert raw.next()[0] == P.SUBOK
    pub = Raw(broker, "pub", [1, 2])
    raws.append(pub)
    ids = [new_message_id() for _ in range(3)]
    pairs = [
        (encode_pub_header(i, "market.p", confirm=True), b"m%d" % n) for n, i in enumerate(ids)
    ]
    pub.sock.send_multipart(wire.Publish(tuple(pairs)).frames(packed=True))
    confirm = pub.next()
    assert confirm[0] == P.CONFIRM and wire.Confirm.decode(confirm).ids == tuple(ids)

    packed, plain = new.next(), old.next()
    assert packed[0] == plain[0] == P.DELIVER
    assert len(packed) == 2 and len(plain) == 1 + 4 * 3
    for frames in (packed, plain):
        assert [i.payload for i in wire.Deliver.decode(frames).items] == [b"m0", b"m1", b"m2"]


def test_a_malformed_packed_pub_is_refused_and_the_broker_serves_on(
    broker: BrokerHandle, raws: list[Raw]
) -> None:
    pub = Raw(broker, "pub", [2])
    raws.append(pub)
    for junk in (b"\xc1", msgpack.packb([b"h", 7]), msgpack.packb([b"h"]), b"\x91" * 4000):
        pub.sock.send_multipart([P.PUB, junk])
        reply = pub.next()
        assert reply[0] == P.ERROR
        assert msgpack.unpackb(reply[1])["code"] == Code.MALFORMED_FRAME
    sub = broker.connect("sub").subscribe("market.>")
    with broker.connect("pub") as bus:  # the Bus client publishes packed
        bus.publish("market.after", "still here", confirm=True)
    message = sub.get(10)
    assert message is not None and message.data == "still here"
    assert broker.process is not None and broker.process.poll() is None
