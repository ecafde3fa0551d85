"""The routing core driven directly: frames built with the codec in, Outbound tuples out."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker import wire
from broker.codec import (
    decode_envelope,
    decode_sids,
    encode_pub_header,
    pack,
    unpack_map,
)
from broker.delivery import DeliveryConfig
from broker.errors import Code
from broker.manifests import Permissions
from broker.router import Outbound, Router, RouterConfig

SECOND = 1_000_000_000
T0 = 1_000 * SECOND

PERMISSIONS = {
    "pub": Permissions(publish=("market.>", "news.>", "orders.new", "$sys.>")),
    "sub": Permissions(subscribe=("market.>", "news.>", "orders.*")),
    "both": Permissions(publish=(">",), subscribe=(">",)),
    "narrow": Permissions(publish=("orders.new",), subscribe=("orders.*",)),
}


class Clocks:
    """The two clocks of a router: `now` (monotonic, passed to every call) and the wall
    clock it stamps with (injected). These tests keep them equal unless they say not."""

    def __init__(self) -> None:
        self.wall = T0

    def __call__(self) -> int:
        return self.wall


def make_router(config: RouterConfig | None = None, **kwargs: Any) -> Router:
    router = Router(PERMISSIONS.get, config, wall_clock=Clocks(), **kwargs)
    return router


def set_wall(router: Router, wall: int) -> None:
    clock = router._wall_clock
    if isinstance(clock, Clocks):
        clock.wall = wall


class Peer:
    """One connection to the router: routing id, authenticated app id, and helpers."""

    def __init__(self, router: Router, peer: bytes, app_id: str) -> None:
        self.router = router
        self.peer = peer
        self.app_id = app_id
        self.now = T0
        self._ids = 0

    def send(self, *frames: bytes, now: int | None = None) -> list[Outbound]:
        set_wall(self.router, now or self.now)
        out = self.router.handle(self.peer, self.app_id, list(frames), now or self.now)
        check_outbound(out)
        return out

    def hello(self, versions: Any = (1,)) -> list[Outbound]:
        offered = list(versions) if isinstance(versions, tuple) else versions
        # every connection of these tests is its own session, named after its routing id
        return self.send(P.HELLO, pack({"v": offered, "session": self.peer.decode()}))

    def welcomed(self) -> Peer:
        [(peer, frames)] = self.hello()
        assert (peer, frames[0]) == (self.peer, P.WELCOME)
        return self

    def sub(self, sid: int, pattern: str) -> list[Outbound]:
        return self.send(P.SUB, pack({"sid": sid, "pattern": pattern}))

    def subscribed(self, sid: int, pattern: str) -> Peer:
        [(peer, frames)] = self.sub(sid, pattern)
        assert (peer, frames[0]) == (self.peer, P.SUBOK)
        assert unpack_map(frames[1]) == {"sid": sid, "pattern": pattern, "durable": False}
        return self

    def unsub(self, sid: int) -> list[Outbound]:
        return self.send(P.UNSUB, pack({"sid": sid}))

    def header(self, topic: str, confirm: bool = False) -> bytes:
        self._ids += 1
        return encode_pub_header(
            self._ids.to_bytes(16, "big"), topic, client_ts_ns=1, confirm=confirm
        )

    def pub(self, *messages: tuple[str, bytes], confirm: bool = False) -> list[Outbound]:
        frames: list[bytes] = [P.PUB]
        for topic, payload in messages:
            frames += [self.header(topic, confirm), payload]
        return self.send(*frames)


def check_outbound(out: Any) -> None:
    assert isinstance(out, list)
    for item in out:
        assert isinstance(item, tuple) and len(item) == 2
        peer, frames = item
        assert isinstance(peer, bytes)
        assert isinstance(frames, list) and frames
        assert all(isinstance(f, bytes) for f in frames)


def error_of(out: list[Outbound], peer: bytes) -> dict[str, Any]:
    [(to, frames)] = out
    assert to == peer
    assert frames[0] == P.ERROR and len(frames) == 2
    return unpack_map(frames[1])


def error_codes(out: list[Outbound]) -> list[int]:
    return [unpack_map(frames[1])["code"] for _, frames in out if frames[0] == P.ERROR]


def deliveries(out: list[Outbound], peer: bytes) -> list[tuple[list[int], Any, bytes, bytes]]:
    """(sids, stamp, header, payload) entries of every DELIVER to `peer`, in order."""
    found: list[tuple[list[int], Any, bytes, bytes]] = []
    for to, frames in out:
        if to != peer or frames[0] != P.DELIVER:
            continue
        for item in wire.Deliver.decode(frames).items:  # either layout, packed or not
            found.append((list(item.sids), item.stamp, item.header, item.payload))
    return found


@pytest.fixture
def router() -> Router:
    return make_router()


# -- HELLO / WELCOME --------------------------------------------------------------------------


def test_hello_welcome(router: Router) -> None:
    [(peer, frames)] = Peer(router, b"p1", "sub").hello((1, 2, 7))
    assert peer == b"p1"
    assert frames[0] == P.WELCOME and len(frames) == 2
    welcome = unpack_map(frames[1])
    assert welcome["v"] == 2  # the highest both speak
    assert welcome["app"] == "sub"
    assert welcome["heartbeat_ms"] == P.DEFAULT_HEARTBEAT_MS
    assert welcome["timeout_ms"] == P.DEFAULT_PEER_TIMEOUT_MS
    assert welcome["max_payload"] == P.MAX_PAYLOAD_BYTES
    assert welcome["max_batch"] == P.MAX_PUB_BATCH
    session = router.session_of(b"p1")
    assert session is not None and session.app_id == "sub" and session.version == 2


@pytest.mark.parametrize("versions", [(3,), (0, 3, 7), ()])
def test_hello_unsupported_version(router: Router, versions: tuple[int, ...]) -> None:
    p = Peer(router, b"p1", "sub")
    error = error_of(p.hello(versions), b"p1")
    assert error["code"] == 106 == Code.UNSUPPORTED_VERSION.value
    assert error["category"] == "protocol"
    assert error["hint"]
    assert router.session_of(b"p1") is None


@pytest.mark.parametrize("versions", ["1", 1, [1.0], [True], None, {"a": 1}])
def test_hello_bad_version_field(router: Router, versions: Any) -> None:
    p = Peer(router, b"p1", "sub")
    assert error_of(p.hello(versions), b"p1")["code"] == Code.BAD_HEADER


def test_hello_frame_errors(router: Router) -> None:
    p = Peer(router, b"p1", "sub")
    assert error_codes(p.send(P.HELLO)) == [Code.BAD_FRAME_COUNT]
    assert error_codes(p.send(P.HELLO, pack({"v": [1]}), b"")) == [Code.BAD_FRAME_COUNT]
    assert error_codes(p.send(P.HELLO, b"\xc1")) == [Code.BAD_HEADER]
    assert error_codes(p.send(P.HELLO, pack([1]))) == [Code.BAD_HEADER]


def test_hello_identity_checks(router: Router) -> None:
    assert error_codes(Peer(router, b"p1", "nobody").hello()) == [Code.MANIFEST_MISSING]
    assert error_codes(Peer(router, b"p2", "").hello()) == [Code.IDENTITY_UNKNOWN]
    # platform identities need no manifest
    Peer(router, b"p3", "$cli").welcomed()


def test_identity_change_on_one_connection(router: Router) -> None:
    Peer(router, b"p1", "sub").welcomed()
    assert error_codes(Peer(router, b"p1", "pub").sub(1, "a")) == [Code.IDENTITY_UNKNOWN]


def test_repeated_hello_resumes_the_session(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    s = Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    [(_, frames)] = s.hello()
    welcome = unpack_map(frames[1])
    assert welcome["resumed"] is True and welcome["subs"] == [[1, "news.>"]]
    assert len(deliveries(pub.pub(("news.x", b"1")), b"p1")) == 1  # still subscribed
    s.subscribed(1, "news.>")  # re-sending the same SUB is accepted, not a duplicate
    assert error_codes(s.sub(1, "market.>")) == [Code.DUPLICATE_SID]


@pytest.mark.parametrize(
    "frames",
    [
        [P.SUB, pack({"sid": 1, "pattern": "a"})],
        [P.UNSUB, pack({"sid": 1})],
        [P.PUB, encode_pub_header(b"\x01" * 16, "news.x"), b""],
        [P.PING],
        [P.STATS],
        [P.BYE],
    ],
)
def test_command_before_hello(router: Router, frames: list[bytes]) -> None:
    out = router.handle(b"p1", "sub", frames, T0)
    check_outbound(out)
    error = error_of(out, b"p1")
    assert error["code"] == 105 == Code.NOT_WELCOMED.value
    assert "HELLO" in error["hint"]


def test_unknown_command(router: Router) -> None:
    p = Peer(router, b"p1", "sub").welcomed()
    for command in [b"NOPE", b"", b"\xff" * 100, b"pub", b"WELCOME", b"DELIVER"]:
        assert error_codes(p.send(command, b"x")) == [Code.UNKNOWN_COMMAND]


# -- SUB / UNSUB ------------------------------------------------------------------------------


def test_sub_and_duplicate_sid(router: Router) -> None:
    s = Peer(router, b"p1", "sub").welcomed().subscribed(1, "market.*.prices")
    error = error_of(s.sub(1, "news.>"), b"p1")
    assert error["code"] == 109 == Code.DUPLICATE_SID.value
    assert error["ref"]["sid"] == 1
    s.subscribed(2, "market.*.prices")  # the same pattern twice is fine with another sid


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"sid": 0, "pattern": "news.x"}, Code.BAD_HEADER),
        ({"sid": -1, "pattern": "news.x"}, Code.BAD_HEADER),
        ({"sid": P.MAX_SID + 1, "pattern": "news.x"}, Code.BAD_HEADER),
        ({"sid": "1", "pattern": "news.x"}, Code.BAD_HEADER),
        ({"sid": True, "pattern": "news.x"}, Code.BAD_HEADER),
        ({"pattern": "news.x"}, Code.BAD_HEADER),
        ({"sid": 1}, Code.BAD_HEADER),
        ({"sid": 1, "pattern": b"news.x"}, Code.BAD_HEADER),
        ({"sid": 1, "pattern": "news.>.x"}, Code.BAD_PATTERN),
        ({"sid": 1, "pattern": "news..x"}, Code.BAD_PATTERN),
        ({"sid": 1, "pattern": "news.x*"}, Code.BAD_PATTERN),
        ({"sid": 1, "pattern": ""}, Code.BAD_PATTERN),
    ],
)
def test_sub_bad_requests(router: Router, body: dict[str, Any], code: Code) -> None:
    s = Peer(router, b"p1", "sub").welcomed()
    assert error_codes(s.send(P.SUB, pack(body))) == [code]
    session = router.session_of(b"p1")
    assert session is not None and session.subscriptions == {}


def test_sub_frame_counts(router: Router) -> None:
    s = Peer(router, b"p1", "sub").welcomed()
    body = pack({"sid": 1, "pattern": "news.x"})
    assert error_codes(s.send(P.SUB)) == [Code.BAD_FRAME_COUNT]
    assert error_codes(s.send(P.SUB, body, body)) == [Code.BAD_FRAME_COUNT]
    assert error_codes(s.send(P.UNSUB)) == [Code.BAD_FRAME_COUNT]
    assert error_codes(s.send(P.UNSUB, body, b"")) == [Code.BAD_FRAME_COUNT]


@pytest.mark.parametrize("pattern", ["orders.>", ">", "*.new", "news", "$sys.>", "other.x"])
def test_subscribe_denied(router: Router, pattern: str) -> None:
    s = Peer(router, b"p1", "sub").welcomed()
    error = error_of(s.sub(5, pattern), b"p1")
    assert error["code"] == 301 == Code.SUBSCRIBE_DENIED.value
    assert error["category"] == "permission"
    assert error["ref"] == {"pattern": pattern, "sid": 5}


def test_unsub(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    s = Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>").subscribed(2, "news.*")
    assert [d[0] for d in deliveries(pub.pub(("news.x", b"")), b"p1")] == [[1, 2]]
    [(peer, frames)] = s.unsub(2)
    assert (peer, frames[0], unpack_map(frames[1])) == (b"p1", P.UNSUBOK, {"sid": 2})
    assert [d[0] for d in deliveries(pub.pub(("news.x", b"")), b"p1")] == [[1]]
    error = error_of(s.unsub(2), b"p1")
    assert error["code"] == Code.UNKNOWN_SID and error["ref"] == {"sid": 2}
    s.unsub(1)
    assert deliveries(pub.pub(("news.x", b"")), b"p1") == []


# -- PUB --------------------------------------------------------------------------------------


def test_fan_out_to_peers_and_subscriptions(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    a = Peer(router, b"pa", "sub").welcomed()
    a.subscribed(1, "market.*.prices").subscribed(2, "market.>").subscribed(3, "market.AAPL.prices")
    a.subscribed(4, "market.MSFT.prices")
    b = Peer(router, b"pb", "both").welcomed().subscribed(7, ">").subscribed(8, "*.AAPL.>")
    Peer(router, b"pc", "both").welcomed().subscribed(1, "news.>")
    header = pub.header("market.AAPL.prices")
    out = pub.send(P.PUB, header, b"payload")
    assert sorted(to for to, _ in out) == [b"pa", b"pb"]
    for to, frames in out:
        assert frames[0] == P.DELIVER and len(frames) == 5
        assert frames[3] == header  # forwarded byte for byte
        assert frames[4] == b"payload"
        envelope = decode_envelope(frames[2], frames[3], frames[4])
        assert envelope.topic == "market.AAPL.prices"
        assert envelope.sender == "pub"
        assert envelope.timestamp_ns == pub.now
        assert decode_sids(frames[1]) == ([1, 2, 3] if to == b"pa" else [7, 8])
    assert router.stats.published == 1
    assert router.stats.delivered == 2
    assert b.app_id == "both"


def test_publisher_receives_its_own_message_when_subscribed(router: Router) -> None:
    p = Peer(router, b"p1", "both").welcomed().subscribed(1, "x.y")
    [(sids, stamp, _, payload)] = deliveries(p.pub(("x.y", b"me")), b"p1")
    assert (sids, stamp.sender, payload) == ([1], "both", b"me")


def test_no_subscriber_no_output(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    assert pub.pub(("news.x", b"")) == []
    assert router.stats.published == 1


def test_forged_sender_is_ignored(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    header = pack({"id": b"\x02" * 16, "topic": "news.x", "ts": 1, "sender": "$supervisor"})
    [(_, stamp, forwarded, _)] = deliveries(pub.send(P.PUB, header, b""), b"p1")
    assert stamp.sender == "pub"
    assert decode_envelope(pack([stamp.seq, stamp.sender, 1, 1]), forwarded, b"").sender == "pub"


def test_sender_is_the_authenticated_app_per_session(router: Router) -> None:
    Peer(router, b"p1", "both").welcomed().subscribed(1, ">")
    for peer, app in [(b"q1", "pub"), (b"q2", "both"), (b"q3", "narrow")]:
        p = Peer(router, peer, app).welcomed()
        topic = "orders.new"
        [(_, stamp, _, _)] = deliveries(p.pub((topic, b"")), b"p1")
        assert stamp.sender == app


def test_publish_denied(router: Router) -> None:
    p = Peer(router, b"p1", "narrow").welcomed()
    error = error_of(p.pub(("orders.old", b"")), b"p1")
    assert error["code"] == 300 == Code.PUBLISH_DENIED.value
    assert error["ref"]["topic"] == "orders.old"
    assert error["ref"]["id"] == (1).to_bytes(16, "big")
    assert router.stats.published == 0


def test_sys_publish_by_normal_app(router: Router) -> None:
    Peer(router, b"s", "$cli").welcomed().subscribed(1, "$sys.>")
    for app in ["pub", "both", "narrow"]:  # "pub" even lists "$sys.>" in its manifest
        p = Peer(router, b"p-" + app.encode(), app).welcomed()
        error = error_of(p.pub(("$sys.alerts", b"")), p.peer)
        assert error["code"] == 302 == Code.RESERVED_TOPIC.value
    cli = Peer(router, b"c", "$supervisor").welcomed()
    [(_, stamp, _, _)] = deliveries(cli.pub(("$sys.metrics.apps", b"")), b"s")
    assert stamp.sender == "$supervisor"
    # a platform identity may not publish a platform topic it does not own
    for app, topic in [("$cli", "$sys.audit.apps.fatal"), ("$supervisor", "$sys.alerts.x")]:
        p = Peer(router, b"p-" + app.encode(), app).welcomed()
        error = error_of(p.pub((topic, b"")), p.peer)
        assert error["code"] == 302 == Code.RESERVED_TOPIC.value


def test_stats_is_for_platform_identities(router: Router) -> None:
    p = Peer(router, b"p1", "both").welcomed()
    assert error_of(p.send(P.STATS), b"p1")["code"] == 303 == Code.COMMAND_DENIED.value
    cli = Peer(router, b"c", "$cli").welcomed()
    [(to, frames)] = cli.send(P.STATS)
    assert (to, frames[0]) == (b"c", P.STATSOK)
    stats = unpack_map(frames[1])
    assert stats["sessions"] == 2
    assert set(stats["apps"]) == {"both", "$cli"}
    assert stats["apps"]["both"]["sessions"] == 1
    assert stats["errors"] == {"303": 1}


def test_stats_includes_extra_stats() -> None:
    def extra(reset: bool) -> dict[str, Any]:
        return {"queue": 3, "was_reset": reset}

    router = make_router(extra_stats=extra)
    cli = Peer(router, b"c", "$cli").welcomed()
    stats = unpack_map(cli.send(P.STATS)[0][1][1])
    assert (stats["queue"], stats["was_reset"]) == (3, False)
    stats = unpack_map(cli.send(P.STATS, pack({"reset": True}))[0][1][1])
    assert stats["was_reset"] is True


@pytest.mark.parametrize("topic", ["news..x", "news.*", "news.>", "news.", " news", "n" * 256])
def test_publish_bad_topic(router: Router, topic: str) -> None:
    p = Peer(router, b"p1", "both").welcomed()
    assert error_codes(p.pub((topic, b""))) == [Code.BAD_TOPIC]


def test_fifo_within_and_across_batches(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    Peer(router, b"p1", "sub").welcomed().subscribed(1, "market.>").subscribed(2, "news.>")
    received: list[bytes] = []
    seqs: list[int] = []
    for batch in range(5):
        messages = [
            (("market.a" if i % 3 else "news.b"), f"{batch}:{i}".encode()) for i in range(40)
        ]
        out = [item for item in pub.pub(*messages) if item[1][0] != P.CREDIT]
        assert len(out) == 1 and out[0][1][0] == P.DELIVER  # one DELIVER per peer per PUB
        for _, stamp, _, payload in deliveries(out, b"p1"):
            received.append(payload)
            seqs.append(stamp.seq)
    assert received == [f"{b}:{i}".encode() for b in range(5) for i in range(40)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_batch_with_bad_entries_keeps_order_of_good_ones(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    frames = [P.PUB]
    frames += [pub.header("news.a"), b"0"]
    frames += [b"\xc1", b"1"]  # undecodable header
    frames += [pub.header("news..a"), b"2"]  # bad topic
    frames += [pub.header("orders.old"), b"3"]  # denied
    frames += [pub.header("news.b"), b"4"]
    out = pub.send(*frames)
    errors = [unpack_map(f[1]) for to, f in out if f[0] == P.ERROR]
    assert [e["code"] for e in errors] == [Code.BAD_HEADER, Code.BAD_TOPIC, Code.PUBLISH_DENIED]
    assert errors[0]["ref"] == {"index": 1}
    assert [p for _, _, _, p in deliveries(out, b"p1")] == [b"0", b"4"]


def test_confirm(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    out = pub.pub(("news.a", b""), ("orders.old", b""), ("news.b", b""), confirm=True)
    confirms = [unpack_map(f[1]) for to, f in out if f[0] == P.CONFIRM]
    assert all(to == b"p0" for to, _ in out)
    assert confirms == [{"ids": [(1).to_bytes(16, "big"), (3).to_bytes(16, "big")]}]
    assert error_codes(out) == [Code.PUBLISH_DENIED]
    assert pub.pub(("news.c", b"")) == []  # no confirm asked, none sent


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_pub_bad_frame_counts(router: Router, extra: int) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    frames = [pub.header("news.a"), b"x", pub.header("news.b")][:extra]
    assert error_codes(pub.send(P.PUB, *frames)) == [Code.BAD_FRAME_COUNT]


def test_pub_limits() -> None:
    router = make_router(RouterConfig(delivery=DeliveryConfig(window=2 * P.MAX_PUB_BATCH)))
    pub = Peer(router, b"p0", "pub").welcomed()
    Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    header = pub.header("news.a")
    too_many = [P.PUB] + [header, b""] * (P.MAX_PUB_BATCH + 1)
    assert error_codes(pub.send(*too_many)) == [Code.TOO_LARGE]
    most = [P.PUB]  # distinct ids: repeated ids are dropped as duplicates
    for _ in range(P.MAX_PUB_BATCH):
        most += [pub.header("news.a"), b""]
    assert len(deliveries(pub.send(*most), b"p1")) == P.MAX_PUB_BATCH
    out = pub.pub(("news.a", b"x" * (P.MAX_PAYLOAD_BYTES + 1)), ("news.b", b"ok"))
    assert error_codes(out) == [Code.TOO_LARGE]
    assert [p for _, _, _, p in deliveries(out, b"p1")] == [b"ok"]


# -- PING, BYE, housekeeping ------------------------------------------------------------------


def test_ping(router: Router) -> None:
    p = Peer(router, b"p1", "sub").welcomed()
    assert p.send(P.PING, b"abc") == [(b"p1", [P.PONG, b"abc"])]
    assert p.send(P.PING) == [(b"p1", [P.PONG, b"\x80"])]
    assert p.send(P.PING, b"x" * 65) == [(b"p1", [P.PONG, b"\x80"])]
    assert p.send(P.PING, b"a", b"b") == [(b"p1", [P.PONG, b"\x80"])]


def test_bye_drops_subscriptions(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    s = Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>").subscribed(2, "news.x")
    assert len(deliveries(pub.pub(("news.x", b"")), b"p1")) == 1
    assert s.send(P.BYE) == []
    assert router.session_of(b"p1") is None
    assert router.snapshot(T0)["subscriptions"] == 0
    assert pub.pub(("news.x", b"")) == []
    assert error_codes(s.sub(3, "news.>")) == [Code.NOT_WELCOMED]


def test_housekeeping_detaches_silent_sessions_then_expires_them() -> None:
    config = RouterConfig(peer_timeout_ms=10_000, delivery=DeliveryConfig(grace_ms=30_000))
    router = make_router(config)
    watcher = Peer(router, b"w", "$cli").welcomed().subscribed(1, P.UNRESPONSIVE_TOPIC)
    pub = Peer(router, b"p0", "pub").welcomed()
    quiet = Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    chatty = Peer(router, b"p2", "sub").welcomed().subscribed(1, "news.>")
    assert router.housekeeping(T0 + 10 * SECOND) == []  # exactly at the timeout: still alive
    for peer, at in ((chatty, 8), (pub, 9), (watcher, 9)):
        peer.send(P.PING, now=T0 + at * SECOND)
    out = router.housekeeping(T0 + 10 * SECOND + 1)
    [(_, stamp, _, notice)] = deliveries(out, b"w")
    assert stamp.sender == P.BROKER_ID
    assert msgpack.unpackb(notice)["app"] == "sub"
    assert msgpack.unpackb(notice)["session"] == "p1"
    assert router.session_of(b"p1") is None
    assert router.session_of(b"p2") is not None
    assert router.stats.unresponsive == 1
    out = pub.send(P.PUB, pub.header("news.x"), b"", now=T0 + 11 * SECOND)
    assert [to for to, _ in out] == [b"p2"]  # the detached session queues it meanwhile
    assert error_codes(quiet.sub(2, "news.>")) == [Code.NOT_WELCOMED]
    router.housekeeping(T0 + 45 * SECOND)
    assert router.stats.sessions_expired >= 1
    expired = [e for e in router.dlq.entries() if e.reason == "expired"]
    assert [(e.app_id, e.session, e.delivery.topic) for e in expired] == [("sub", "p1", "news.x")]


def test_housekeeping_counts_publishes_as_activity() -> None:
    router = make_router(RouterConfig(peer_timeout_ms=1_000))
    pub = Peer(router, b"p0", "pub").welcomed()
    pub.send(P.PUB, pub.header("news.x"), b"", now=T0 + 5 * SECOND)
    assert router.housekeeping(T0 + 5 * SECOND + 1) == []


def test_undeliverable_is_counted(router: Router) -> None:
    router.undeliverable(b"gone", 3)
    assert router.snapshot(T0)["undeliverable"] == 3


# -- fuzzing ----------------------------------------------------------------------------------

COMMANDS = [P.HELLO, P.SUB, P.UNSUB, P.PUB, P.PING, P.BYE, P.STATS]
JUNK_COMMANDS = [b"", b"\x00", b"DELIVER", b"WELCOME", b"hello", b"PUBX", b"\xff" * 40]

_fields = st.sampled_from(["v", "sid", "pattern", "id", "topic", "cf", "sens", "tp", "ts"])
_field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.sampled_from([1, 2, P.MAX_SID])
    | st.text(max_size=12)
    | st.sampled_from(["news.x", "news.>", "a.*", ">", "$sys.x", "news..x", "*"])
    | st.binary(min_size=16, max_size=16)
    | st.lists(st.integers(0, 3), max_size=3)
)
headers = st.dictionaries(_fields, _field_values, max_size=5).map(pack)
frame_bodies = st.binary(max_size=24) | headers
commands = st.sampled_from(COMMANDS + JUNK_COMMANDS) | st.binary(max_size=8)
random_messages = st.builds(
    lambda command, rest: [command, *rest],
    commands,
    st.lists(frame_bodies, min_size=0, max_size=9),
)

_sids = st.integers(1, 4) | st.integers(0, 4) | _field_values
_patterns = st.sampled_from(["news.x", "news.>", "*.x", ">", "$sys.>", "a..b", "a.>.b"])
_topics = st.sampled_from(["news.x", "news.y", "$sys.x", "a..b", "a.*", ""]) | st.text(max_size=6)


@st.composite
def _pub_pair(draw: st.DrawFn) -> list[bytes]:
    header: dict[str, Any] = {
        "id": draw(st.binary(min_size=16, max_size=16) | st.binary(max_size=20)),
        "topic": draw(_topics),
    }
    extra = draw(st.dictionaries(_fields, _field_values, max_size=2))
    if draw(st.integers(0, 2)) == 0:
        header.update(extra)
    return [pack(header), draw(st.binary(max_size=8))]


shaped_messages = st.one_of(
    st.builds(lambda v: [P.HELLO, pack({"v": v})], st.lists(st.integers(0, 3), max_size=3)),
    st.builds(lambda s, p: [P.SUB, pack({"sid": s, "pattern": p})], _sids, _patterns),
    st.builds(lambda s: [P.UNSUB, pack({"sid": s})], _sids),
    st.builds(
        lambda pairs: [P.PUB, *(f for pair in pairs for f in pair)],
        st.lists(_pub_pair(), min_size=1, max_size=4),
    ),
    st.sampled_from([[P.PING], [P.PING, b"x"], [P.STATS], [P.BYE]]),
)
messages = shaped_messages | shaped_messages | random_messages


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inbound=st.lists(messages, min_size=1, max_size=12))
def test_fuzz_router_never_raises(inbound: list[list[bytes]]) -> None:
    router = make_router()
    fuzz = Peer(router, b"fz", "both").welcomed()
    Peer(router, b"sb", "sub").welcomed().subscribed(1, "news.x")
    for i, frames in enumerate(inbound):
        out = fuzz.send(*frames, now=T0 + i)
        for to, out_frames in out:
            if to == b"fz":
                continue
            # only a valid publish to news.x by the fuzzing app reaches the subscriber
            assert to == b"sb" and out_frames[0] == P.DELIVER
            for sids, stamp, header, _ in deliveries([(to, out_frames)], b"sb"):
                assert (sids, stamp.sender) == ([1], "both")
                assert unpack_map(header)["topic"] == "news.x"
    pub = Peer(router, b"pb", "pub").welcomed()
    header = pub.header("news.x")
    out = pub.send(P.PUB, header, b"after the storm")
    got = deliveries(out, b"sb")
    assert len(got) == 1
    sids, stamp, forwarded, payload = got[0]
    assert (sids, stamp.sender, forwarded, payload) == ([1], "pub", header, b"after the storm")


@settings(max_examples=200, deadline=None)
@given(inbound=st.lists(messages, min_size=1, max_size=6))
def test_fuzz_router_before_hello(inbound: list[list[bytes]]) -> None:
    router = make_router()
    for frames in inbound:
        out = router.handle(b"x", "both", frames, T0)
        check_outbound(out)
        assert all(to == b"x" for to, _ in out)


def test_duplicate_message_ids_are_routed_once_and_confirmed_again(router: Router) -> None:
    pub = Peer(router, b"p0", "pub").welcomed()
    Peer(router, b"p1", "sub").welcomed().subscribed(1, "news.>")
    header = pub.header("news.a", confirm=True)
    first = pub.send(P.PUB, header, b"once")
    again = pub.send(P.PUB, header, b"once")  # a resend after a reconnect
    assert len(deliveries(first, b"p1")) == 1 and deliveries(again, b"p1") == []
    assert [f[0] for _, f in again] == [P.CONFIRM]
    assert router.stats.duplicates == 1


def test_events_name_the_stored_message_even_when_a_queue_is_full() -> None:
    """Published comes before the DeadLettered it causes, and both carry the same stored
    seq; a CONFIRM waits for that seq to be stored (persistence on)."""
    from broker import event_records as R
    from broker.events import EventLog

    log = EventLog(epoch=1, confirm_by=P.PERSISTENCE_ID)
    router = make_router(RouterConfig(delivery=DeliveryConfig(queue_max=1)), stream=log)
    sub = Peer(router, b"s", "sub").welcomed()
    sub.send(P.SUB, pack({"sid": 1, "pattern": "market.>", "durable": True}))
    pub = Peer(router, b"p", "pub").welcomed()
    out = pub.pub(("market.a", b"1"), ("market.b", b"2"), ("market.c", b"3"), confirm=True)
    assert all(frames[0] != P.CONFIRM for _, frames in out)  # not stored yet
    batch = log.take_batch()
    assert batch is not None
    events = R.decode_events(batch[2])
    kinds = [(type(e.record).__name__, e.seq) for e in events]
    msgs = [e for e in events if isinstance(e.record, R.Published)]
    dead = [e for e in events if isinstance(e.record, R.DeadLettered)]
    assert dead, kinds
    for letter in dead:  # the dead letter refers to a Published event stored before it
        assert isinstance(letter.record, R.DeadLettered)
        stored = letter.record.stored_seq
        assert stored in {m.seq for m in msgs} and stored < letter.seq
    released = router.confirm_stored(log.last_seq)
    assert [frames[0] for _, frames in released] == [P.CONFIRM]
    assert len(unpack_map(released[0][1][1])["ids"]) == 3


# -- flow control: publish credit (broker.flow, protocol §3.17) -------------------------------

FLOW = DeliveryConfig(window=10, credit=8, flow_high=20, flow_low=5, queue_max=40)


class CreditedPublisher(Peer):
    """A publisher that sends only within its credit (WELCOME `credit`, then CREDITs)."""

    credit = 0
    sent = 0

    def welcomed(self) -> CreditedPublisher:
        [(_, frames)] = self.hello()
        self.credit = unpack_map(frames[1])["credit"]
        return self

    def take(self, out: list[Outbound]) -> list[Outbound]:
        for to, frames in out:
            if to == self.peer and frames[0] == P.CREDIT:
                self.credit += unpack_map(frames[1])["n"]
        return out

    def flood(self, limit: int) -> list[Outbound]:
        """Publish one message a PUB as long as credit lasts (at most `limit`)."""
        out: list[Outbound] = []
        while self.credit and self.sent < limit:
            self.credit -= 1
            self.sent += 1
            out += self.take(self.pub(("market.flow", self.sent.to_bytes(4, "big"))))
        return out


def ack_all(sub: Peer, out: list[Outbound]) -> list[Outbound]:
    seqs = [stamp.seq for _, stamp, _, _ in deliveries(out, sub.peer)]
    return sub.send(P.ACK, pack({"seqs": seqs})) if seqs else []


def test_welcome_announces_the_publish_credit() -> None:
    router = make_router(RouterConfig(delivery=FLOW))
    [(_, frames)] = Peer(router, b"p", "pub").hello()
    assert unpack_map(frames[1])["credit"] == 8
    [(_, frames)] = Peer(make_router(), b"p", "pub").hello()
    assert unpack_map(frames[1])["credit"] == DeliveryConfig().credit


def test_credit_comes_back_once_routed_while_receivers_keep_up() -> None:
    router = make_router(RouterConfig(delivery=FLOW))
    Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = CreditedPublisher(router, b"p", "pub").welcomed()
    out = pub.flood(8)
    credits = [unpack_map(f[1])["n"] for to, f in out if f[0] == P.CREDIT]
    assert credits == [2, 2, 2, 2]  # a quarter of the credit at a time
    assert pub.credit == 8 and router.stats.errors == {}


def test_publisher_is_held_before_the_queue_overflows_and_released_when_it_drains() -> None:
    """A slow receiver: its queue passes flow_high, the publisher's credit is held and it
    stops (queue stays under queue_max, nothing dead-lettered); acknowledgements are read
    all along, drain the queue to flow_low, and the credit comes back; every message
    arrives once, in order."""
    router = make_router(RouterConfig(delivery=FLOW))
    sub = Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = CreditedPublisher(router, b"p", "pub").welcomed()
    got: list[bytes] = []
    pending = pub.flood(1000)  # the receiver acknowledges nothing yet
    got += [payload for *_, payload in deliveries(pending, b"s")]
    receiver = router.sessions.by_key[("sub", "s")]
    assert pub.credit == 0 and pub.sent < 40  # stopped well before the queue bound
    assert FLOW.flow_high <= len(receiver.mailbox.queue) <= FLOW.flow_high + FLOW.credit
    assert router.flow.held and router.dlq.by_reason == {}
    assert router.snapshot(T0)["flow_held"] == 1
    # the receiver catches up, one DELIVER at a time; the publisher goes on when credited
    rounds = 0
    while pub.sent < 1000 or deliveries(pending, b"s"):
        rounds += 1
        assert rounds < 2000
        out = pub.take(ack_all(sub, pending))
        out += pub.flood(1000)
        got += [payload for *_, payload in deliveries(out, b"s")]
        pending = out
        assert len(receiver.mailbox.queue) < FLOW.queue_max
    assert got == [n.to_bytes(4, "big") for n in range(1, 1001)]
    assert router.dlq.by_reason == {} and router.flow.holds > 1
    assert router.snapshot(T0)["flow_held"] == 0


def test_detached_receiver_holds_nobody_back() -> None:
    router = make_router(RouterConfig(delivery=FLOW))
    Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = CreditedPublisher(router, b"p", "pub").welcomed()
    pub.flood(1000)
    assert pub.credit == 0 and router.flow.held
    router.drop_peer(b"s", T0)  # gone: its queue waits for a resume, nobody waits for it
    pub.take(router.housekeeping(T0 + SECOND))
    assert pub.credit > 0 and not router.flow.held
    before = pub.sent
    pub.flood(before + 30)  # a detached receiver's queue overflows into the DLQ, as before
    assert pub.sent == before + 30
    assert router.dlq.by_reason.get("queue-full", 0) > 0


def test_a_publisher_is_held_at_most_hold_max() -> None:
    from broker.flow import HOLD_MAX_NS

    router = make_router(RouterConfig(delivery=FLOW, peer_timeout_ms=3_600_000))
    Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = CreditedPublisher(router, b"p", "pub").welcomed()
    pub.flood(1000)
    assert pub.credit == 0
    assert pub.take(router.housekeeping(T0 + SECOND)) == []  # the hold is noted
    assert pub.credit == 0
    pub.take(router.housekeeping(T0 + SECOND + HOLD_MAX_NS))
    assert pub.credit > 0 and not router.flow.held


def test_own_messages_never_hold_a_session_back() -> None:
    router = make_router(RouterConfig(delivery=FLOW))
    both = CreditedPublisher(router, b"b", "both").welcomed()
    both.subscribed(1, "market.>")
    both.flood(100)
    assert both.sent == 100 and not router.flow.held


def test_credit_zero_turns_flow_control_off() -> None:
    config = DeliveryConfig(window=10, credit=0, flow_high=20, flow_low=5, queue_max=40)
    router = make_router(RouterConfig(delivery=config))
    Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = Peer(router, b"p", "pub").welcomed()
    out: list[Outbound] = []
    for n in range(100):
        out += pub.pub(("market.flow", b"%d" % n))
    assert not [f for _, f in out if f[0] == P.CREDIT] and not router.flow.held
    assert router.dlq.by_reason == {"queue-full": 100 - 40 - 10}


def test_overflow_is_one_log_line_per_reason_and_session() -> None:
    """A publisher that ignores its credit overflows a slow receiver: each dead letter is
    an event (the store needs it), the log gets one counted line, not one per message."""
    router = make_router(RouterConfig(delivery=FLOW))
    router.stream.register(P.PERSISTENCE_ID, 0)  # events are encoded, as with persistence
    Peer(router, b"s", "sub").welcomed().subscribed(1, "market.>")
    pub = Peer(router, b"p", "pub").welcomed()
    for n in range(100):
        pub.pub(("market.flow", b"%d" % n))
    dead = 100 - FLOW.queue_max - FLOW.window
    assert router.dlq.by_reason == {"queue-full": dead}
    notices = router.take_notices()
    [line] = [n for n in notices if n["event"] == "dead-letter"]
    assert (line["reason"], line["app"], line["count"]) == ("queue-full", "sub", dead)
    assert (line["id"], line["last_id"]) == (1, dead)
    assert router.take_notices() == []
    frames = router.stream.since(1)
    assert frames is not None
    kinds = [event[1] for event in msgpack.Unpacker(BytesIO(frames[2]))]
    assert kinds.count(5) == dead  # DeadLettered, one per message
