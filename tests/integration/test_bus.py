"""The bus with a real broker process, real ZeroMQ ipc sockets and the real Python client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from broker import protocol as P
from broker.codec import new_message_id, pack
from clients.bus import (
    AuthenticationError,
    Bus,
    DeliveryError,
    Message,
    NoResponders,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
)
from tests.conftest import BrokerHandle, authenticate, wait_for


def drain(sub_get: object, count: int, timeout: float = 5.0) -> list[Message]:
    got: list[Message] = []
    get = sub_get  # a Subscription.get
    while len(got) < count:
        message = get(timeout)  # type: ignore[operator]
        if message is None:
            break
        got.append(message)
    return got


def test_publish_reaches_subscriber_with_broker_stamped_sender(broker: BrokerHandle) -> None:
    pub, sub_bus = broker.connect("pub"), broker.connect("sub")
    sub = sub_bus.subscribe("market.*.prices")
    msg_id = pub.publish("market.AAPL.prices", {"px": 187.2}, correlation_id="c-1", confirm=True)
    message = sub.get(timeout=5)
    assert message is not None
    assert (message.id, message.topic, message.data) == (
        msg_id,
        "market.AAPL.prices",
        {"px": 187.2},
    )
    assert message.sender == "pub"
    assert message.correlation_id == "c-1"
    assert message.attempt == 1
    assert message.timestamp > 0


def test_wildcard_fan_out_to_many_subscribers(broker: BrokerHandle) -> None:
    patterns = [
        "market.>",
        "market.*.prices",
        "market.AAPL.*",
        "market.AAPL.prices",
        "market.*.trades",
        "market.MSFT.>",
    ] * 4
    subs = [(p, broker.connect("sub").subscribe(p)) for p in patterns]
    pub = broker.connect("pub")
    topics = [
        "market.AAPL.prices",
        "market.MSFT.prices",
        "market.AAPL.trades",
        "market.MSFT.book.l2",
        "market.GOOG",
    ]
    for topic in topics:
        pub.publish(topic, topic, confirm=True)

    def expected(pattern: str) -> list[str]:
        from broker.topics import pattern_matches

        return [t for t in topics if pattern_matches(pattern, t)]

    for pattern, sub in subs:
        want = expected(pattern)
        got = [m.topic for m in drain(sub.get, len(want))]
        assert got == want, pattern
        assert sub.get(timeout=0.05) is None, f"{pattern} received an extra message"


def test_each_matching_subscription_of_one_app_receives(broker: BrokerHandle) -> None:
    bus = broker.connect("both")
    wide, narrow = bus.subscribe("chat.>"), bus.subscribe("chat.room1")
    bus.publish("chat.room1", "hi", confirm=True)
    first, second = wide.get(5), narrow.get(5)
    assert first is not None and second is not None
    assert first.id == second.id and first.data == "hi"


def test_fifo_per_publisher_and_topic(broker: BrokerHandle) -> None:
    sub = broker.connect("sub").subscribe("orders.*")
    pub = broker.connect("pub")
    for i in range(5000):
        pub.publish("orders.new", i)
    pub.publish("orders.new", "end", confirm=True)
    got = [m.data for m in drain(sub.get, 5001)]
    assert got == [*range(5000), "end"]


def test_handler_subscription_runs_in_dispatcher(broker: BrokerHandle) -> None:
    seen: list[object] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        seen.append(message.data)
        if len(seen) == 3:
            done.set()

    broker.connect("sub").subscribe("market.>", handler)
    pub = broker.connect("pub")
    for i in range(3):
        pub.publish("market.x", i, confirm=True)
    assert done.wait(5)
    assert seen == [0, 1, 2]


def test_unsubscribe_stops_delivery(broker: BrokerHandle) -> None:
    bus = broker.connect("sub")
    sub = bus.subscribe("market.>")
    other = bus.subscribe("orders.*")
    sub.unsubscribe()
    pub = broker.connect("pub")
    pub.publish("orders.a", 1, confirm=True)  # same session: proves the UNSUB was processed
    assert other.get(5) is not None
    pub.publish("market.a", 1, confirm=True)
    pub.publish("orders.b", 2, confirm=True)
    assert other.get(5) is not None
    assert sub.get(timeout=0.1) is None


def test_publish_outside_permissions_is_denied(broker: BrokerHandle) -> None:
    pub = broker.connect("pub")
    with pytest.raises(PermissionDenied) as denied:
        pub.publish("news.headlines", "x", confirm=True)
    assert denied.value.code == 300 and "news.headlines" in str(denied.value)
    with pytest.raises(PermissionDenied) as reserved:
        pub.publish("$sys.apps.fake", "x", confirm=True)
    assert reserved.value.code == 302
    # a fire-and-forget denial is reported on bus.errors, and the bus keeps working
    pub.publish("news.other", "x")
    assert pub.errors.get(timeout=5).code == 300
    pub.publish("market.ok", 1, confirm=True)


def test_subscribe_outside_permissions_is_denied(broker: BrokerHandle) -> None:
    bus = broker.connect("sub")
    with pytest.raises(PermissionDenied) as denied:
        bus.subscribe("news.>")
    assert denied.value.code == 301
    with pytest.raises(PermissionDenied):
        bus.subscribe(">")  # wider than anything granted
    with pytest.raises(PermissionDenied):
        bus.subscribe("$sys.>")
    assert bus.subscribe("market.AAPL.*").pattern == "market.AAPL.*"


def test_bad_topic_is_rejected_locally(broker: BrokerHandle) -> None:
    bus = broker.connect("pub")
    for topic in ("market..x", "market.*", "market.>", "", "a" * 256):
        with pytest.raises(ProtocolError):
            bus.publish(topic, 1)


def test_wrong_or_missing_credential_is_rejected(broker: BrokerHandle) -> None:
    with pytest.raises(AuthenticationError):
        Bus.connect(broker.endpoint, "pub", "not-the-token", timeout=5)
    token = broker.credentials.mint("pub")
    with pytest.raises(AuthenticationError):
        Bus.connect(broker.endpoint, "sub", token, timeout=5)  # another app's credential
    broker.credentials.revoke("pub", token)
    with pytest.raises(AuthenticationError):
        Bus.connect(broker.endpoint, "pub", token, timeout=5)  # revoked


def test_app_without_manifest_is_refused(broker: BrokerHandle) -> None:
    token = broker.credentials.mint("ghost")
    with pytest.raises(AuthenticationError) as refused:
        Bus.connect(broker.endpoint, "ghost", token, timeout=5)
    assert refused.value.code == 202


def _raw_dealer(broker: BrokerHandle, app_id: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    authenticate(sock, broker.credentials.mint(app_id))
    sock.connect(broker.endpoint)
    sock.send_multipart([P.HELLO, pack({"v": [1]})])
    assert sock.recv_multipart()[0] == P.WELCOME
    return sock


def test_forged_sender_in_header_is_ignored(broker: BrokerHandle) -> None:
    sub = broker.connect("sub").subscribe("market.>")
    sock = _raw_dealer(broker, "pub")
    try:
        header = pack(
            {
                "id": new_message_id(),
                "topic": "market.x",
                "sender": "both",
                "from": "both",
                "app": "both",
                "cf": True,
            }
        )
        sock.send_multipart([P.PUB, header, pack("forged")])
        assert sock.recv_multipart()[0] == P.CONFIRM
        message = sub.get(5)
        assert message is not None and message.data == "forged"
        assert message.sender == "pub"
    finally:
        sock.close()


def test_client_reconnects_and_resubscribes_after_broker_restart(broker: BrokerHandle) -> None:
    sub_bus = broker.connect("sub", heartbeat_ms=200)
    sub = sub_bus.subscribe("market.>")
    broker.kill()
    broker.start()
    pub = broker.connect("pub")

    def delivered() -> bool:
        pub.publish("market.after", "back", confirm=True)
        return sub.get(timeout=0.2) is not None

    wait_for(delivered, timeout=15)
    assert sub_bus.reconnects >= 1


def test_stats_are_for_platform_identities_only(broker: BrokerHandle) -> None:
    with pytest.raises(PermissionDenied):
        broker.connect("pub").broker_stats()
    stats = broker.connect("$cli").broker_stats()
    assert stats["sessions"] >= 2
    assert set(stats["route_latency"]) >= {"p50_us", "p99_us", "p999_us"}
    assert isinstance(msgpack.packb(stats), bytes)


def test_busy_publisher_that_receives_nothing_keeps_its_session(short_tmp: Path) -> None:
    handle = BrokerHandle.prepared(short_tmp, {"pub": '[permissions]\npublish = ["market.>"]\n'})
    handle.start(heartbeat_ms=100, peer_timeout_ms=500)
    try:
        pub = handle.connect("pub")
        deadline = time.monotonic() + 2.0  # four peer timeouts of publishing, nothing received
        while time.monotonic() < deadline:
            pub.publish("market.tick", 1)
            time.sleep(0.001)
        pub.publish("market.tick", "last", confirm=True)
        assert pub.reconnects == 0
        stats = handle.connect("$cli").broker_stats()
        assert stats["sessions_expired"] == 0
    finally:
        handle.close()


def test_oversized_payload_is_refused_before_sending(broker: BrokerHandle) -> None:
    bus = broker.connect("pub")
    with pytest.raises(ProtocolError) as refused:
        bus.publish("market.big", b"x" * (P.MAX_PAYLOAD_BYTES + 1))
    assert refused.value.code == 104
    bus.publish("market.small", b"x" * 1000, confirm=True)


def test_request_reply(broker: BrokerHandle) -> None:
    broker.manifest("quoter", '[permissions]\nsubscribe = ["pricing.>"]\n')
    broker.manifest("trader", '[permissions]\nrequest = ["pricing.>"]\n')
    quoter = broker.connect("quoter")

    def quote(message: Message) -> dict[str, object]:
        if message.data["sym"] == "BAD":
            raise ValueError("unknown symbol")
        return {"sym": message.data["sym"], "px": 187.2, "asked_by": message.sender}

    quoter.serve("pricing.>", quote)
    trader = broker.connect("trader")
    reply = trader.request("pricing.quote", {"sym": "AAPL"}, timeout=5, correlation_id="q-1")
    assert reply.data == {"sym": "AAPL", "px": 187.2, "asked_by": "trader"}
    assert reply.sender == "quoter" and reply.correlation_id == "q-1"
    with pytest.raises(DeliveryError, match="unknown symbol"):
        trader.request("pricing.quote", {"sym": "BAD"}, timeout=5)
    with pytest.raises(NoResponders) as nobody:
        broker.manifest("t2", '[permissions]\nrequest = ["ref.>"]\n')
        broker.connect("t2").request("ref.data", {}, timeout=5)
    assert nobody.value.code == 402
    with pytest.raises(PermissionDenied):
        trader.request("orders.new", {}, timeout=5)


def test_request_timeout(broker: BrokerHandle) -> None:
    """A request nobody answers in time raises RequestTimeout, and not before its timeout.
    (No upper bound on the wait: the server would answer at 5 s, and then the request
    would return instead of raising.)"""
    broker.manifest("sleepy", '[permissions]\nsubscribe = ["slow.>"]\n')
    broker.manifest("asker", '[permissions]\nrequest = ["slow.>"]\n')
    release = threading.Event()
    broker.connect("sleepy").serve("slow.>", lambda m: release.wait(5))
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        broker.connect("asker").request("slow.op", {}, timeout=0.5)
    assert time.monotonic() - started >= 0.5
    release.set()


def test_direct_send_reaches_only_the_named_app(broker: BrokerHandle) -> None:
    broker.manifest("desk1", '[permissions]\nsubscribe = ["chat.>"]\n')
    desk1 = broker.connect("desk1").subscribe("chat.>")
    other = broker.connect("sub").subscribe("market.>")
    both = broker.connect("both")
    everyone = both.subscribe("chat.>")
    both.publish("chat.private", "for desk1 only", to="desk1", confirm=True)
    message = desk1.get(5)
    assert message is not None and message.data == "for desk1 only"
    both.publish("chat.public", "for all", confirm=True)
    public = everyone.get(5)
    assert public is not None and public.data == "for all"  # the direct one never came
    assert other.get(timeout=0.1) is None


def test_operator_cannot_forge_platform_events(broker: BrokerHandle) -> None:
    """`$cli` publishing the supervisor's `$sys.audit.apps.fatal` is refused; nobody sees it."""
    watcher = broker.connect("$audit")
    events = watcher.subscribe("$sys.>")
    cli = broker.connect("$cli")
    for topic in ["$sys.audit.apps.fatal", "$sys.alerts.storage", "$sys.metrics.apps"]:
        with pytest.raises(PermissionDenied) as denied:
            cli.publish(topic, {"app": "ticker", "reason": "forged"}, confirm=True)
        assert denied.value.code in (300, 302) and "may not publish" in str(denied.value)
    cli.publish("market.ok", 1, confirm=True)  # the session still works
    supervisor = broker.connect("$supervisor")
    supervisor.publish("$sys.metrics.apps", {"apps": {}}, confirm=True)  # the owner may
    got = events.get(timeout=5)
    assert got is not None and got.topic == "$sys.metrics.apps"
    assert events.get(timeout=0.3) is None
