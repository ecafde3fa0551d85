"""The broker's pure core (broker.core over broker.router) driven without sockets: every
event kind, the consumers' link (two consumers, one stopped and restarted), recovery
over the link, and timers against a wall clock that jumps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import pytest

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.codec import encode_pub_header, pack, unpack_map
from broker.core import BrokerCore, CoreConfig
from broker.delivery import Delivery, DeliveryConfig
from broker.dlq import DeadLetter
from broker.errors import Code
from broker.events import EventLog, StreamLimits
from broker.manifests import Permissions
from broker.router import Outbound, Router, RouterConfig
from broker.wire import (
    Dlq,
    EvAck,
    EvFetch,
    EvRestore,
    EvSync,
    EvSyncOk,
    Hello,
    Nack,
    Stats,
    Subscribe,
    Unsubscribe,
)

MS = 1_000_000
SECOND = 1000 * MS
HOUR = 3600 * SECOND
WALL0 = 1_700_000_000 * SECOND
MONO0 = 50 * SECOND

PERMISSIONS = {
    "pub": Permissions(publish=("market.>",), request=("quote.>",)),
    "sub": Permissions(subscribe=("market.>", "quote.>")),
    "narrow": Permissions(publish=("orders.new",), subscribe=("orders.*",)),
}


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


class Broker:
    """A core with its two clocks and helpers to speak for connections."""

    def __init__(
        self,
        persistence: bool = False,
        consumers: tuple[str, ...] = (),
        delivery: DeliveryConfig | None = None,
        limits: StreamLimits | None = None,
        restorer: Any = None,
    ) -> None:
        self.wall = Clock(WALL0)
        self.mono = MONO0
        stream = EventLog(
            epoch=7,
            consumers=consumers,
            confirm_by=P.PERSISTENCE_ID if persistence else None,
            limits=limits,
            waiting=persistence,
        )
        config = RouterConfig(
            peer_timeout_ms=10_000,
            delivery=delivery or DeliveryConfig(retries=1, backoff_base_ms=100, grace_ms=30_000),
        )
        self.router = Router(PERMISSIONS.get, config, stream=stream, wall_clock=self.wall)
        self.core = BrokerCore(
            self.router, CoreConfig(persistence=persistence, hold_limit=3), restorer, self.mono
        )
        self._ids = 0

    def send(self, peer: bytes, app: str, frames: list[bytes]) -> list[Outbound]:
        return self.core.inbound(peer, app, frames, self.mono)

    def hello(self, peer: bytes, app: str, session: str | None = None) -> list[Outbound]:
        name = session or peer.decode()
        return self.send(peer, app, Hello(session=name, client="test").frames())

    def pub(self, peer: bytes, app: str, topic: str, **header: Any) -> list[Outbound]:
        self._ids += 1
        raw = encode_pub_header(self._ids.to_bytes(16, "big"), topic, client_ts_ns=1, **header)
        return self.send(peer, app, [P.PUB, raw, pack({"n": self._ids})])

    def tick(self, advance_ns: int = 0) -> list[Outbound]:
        self.mono += advance_ns
        return self.core.tick(self.mono)

    def events(self) -> list[R.Event]:
        frames = self.router.stream.take_batch()
        return R.decode_events(frames[2]) if frames else []


def kinds(events: Iterable[R.Event]) -> list[str]:
    return [type(e.record).__name__ for e in events]


def of_type(events: Iterable[R.Event], cls: type[Any]) -> list[Any]:
    return [e.record for e in events if isinstance(e.record, cls)]


def delivered_seqs(out: list[Outbound], peer: bytes) -> list[int]:
    return [
        item.stamp.seq
        for to, frames in out
        if to == peer and frames[0] == P.DELIVER
        for item in wire.Deliver.decode(frames).items  # either layout, packed or not
    ]


def error_codes(out: list[Outbound]) -> list[int]:
    return [unpack_map(frames[1])["code"] for _, frames in out if frames[0] == P.ERROR]


# -- an event for every kind ------------------------------------------------------------------


def test_an_event_for_every_kind() -> None:
    b = Broker(consumers=("$audit",), limits=StreamLimits(max_events=10_000))
    seen: list[R.Event] = []
    b.hello(b"s", "sub")
    b.send(b"s", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"p", "pub")
    out = b.pub(
        b"p",
        "pub",
        "market.a",
        correlation_id="c-1",
        traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    )
    [seq] = delivered_seqs(out, b"s")
    b.send(b"s", "sub", [P.ACK, pack({"seqs": [seq]})])
    [seq] = delivered_seqs(b.pub(b"p", "pub", "market.b"), b"s")
    b.send(b"s", "sub", Nack(seq, "boom").frames())  # retried once ...
    [seq] = delivered_seqs(b.tick(200 * MS), b"s")
    b.send(b"s", "sub", Nack(seq, "boom").frames())  # ... then dead
    b.hello(b"c", "$cli")
    entry = b.router.dlq.ids()[0]
    out = b.send(b"c", "$cli", Dlq("replay", entry, rid=5).frames())
    b.send(b"s", "sub", [P.ACK, pack({"seqs": delivered_seqs(out, b"s")})])
    [seq] = delivered_seqs(b.pub(b"p", "pub", "market.c"), b"s")
    b.send(b"s", "sub", Nack(seq, "poison", requeue=False).frames())
    b.send(b"c", "$cli", Dlq("purge", rid=6).frames())
    seen += b.events()
    # denials of every action
    b.pub(b"p", "pub", "orders.x", correlation_id="c-2")
    b.send(b"s", "sub", Subscribe(2, "orders.>").frames())
    b.send(b"s", "sub", Subscribe(3, "orders.>", serve=True).frames())
    req = encode_pub_header(b"\x09" * 16, "orders.q", extra={"reply": "r1"})
    b.send(b"p", "pub", [P.REQ, req, b""])
    rep = encode_pub_header(b"\x0a" * 16, "quote.x", extra={"to": "nobody"})
    b.send(b"s", "sub", [P.REP, rep, b""])
    b.send(b"s", "sub", Stats(rid=9).frames())
    b.core.auth_failed(
        R.AuthFailed("intruder", "", "CURVE", "bad credential", "unknown-key", "", 0)
    )
    # the supervisor's report of an app
    b.hello(b"v", "$supervisor")
    body = pack({"app": "ticker", "event": "launch", "pid": 42})
    b.send(
        b"v",
        "$supervisor",
        [P.PUB, encode_pub_header(b"\x0b" * 16, "$sys.audit.apps.launch"), body],
    )
    # sessions: resumed, taken over, detached, expired, closed; unsubscribe
    b.send(b"s", "sub", Unsubscribe(1).frames())
    b.hello(b"s2", "sub", session="s")  # takes "s" over from connection b"s"
    b.router.drop_peer(b"s2", b.mono)
    b.hello(b"s3", "sub", session="s")
    b.send(b"s3", "sub", Subscribe(4, "market.>").frames())
    b.send(b"s3", "sub", [P.BYE])
    b.hello(b"g", "sub")
    b.send(b"g", "sub", Subscribe(1, "market.>").frames())
    b.router.drop_peer(b"g", b.mono)
    b.tick(31 * SECOND)
    seen += b.events()
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))  # contiguous, in order
    # a consumer skipped past the retention bound
    small = Broker(consumers=("$audit",), limits=StreamLimits(max_events=4))
    small.hello(b"p", "pub")
    for _ in range(6):
        small.pub(b"p", "pub", "market.x")
    small.hello(b"w", "$cli")
    small.tick()
    seen += small.events()

    assert set(kinds(seen)) == {cls.__name__ for cls in R.RECORDS.values()}, kinds(seen)
    [published, *_] = of_type(seen, R.Published)
    assert (published.sender, published.session, published.topic) == ("pub", "p", "market.a")
    assert (published.correlation_id, published.traceparent[:5]) == ("c-1", "00-11")
    routed = of_type(seen, R.Routed)[0]
    assert routed.to == [["sub", "s"]]
    attempts = of_type(seen, R.DeliveryAttempted)
    assert attempts[0].items[0][1] == 1 and any(a.items[0][1] == 2 for a in attempts)
    [acked] = of_type(seen, R.Acked)[:1]
    assert acked.msg_ids == [published.msg_id]
    nacks = of_type(seen, R.Nacked)
    assert [(n.reason, n.requeue, n.attempt) for n in nacks] == [
        ("boom", True, 1),
        ("boom", True, 2),
        ("poison", False, 1),
    ]
    [retry] = [r for r in of_type(seen, R.RetryScheduled) if r.reason == "nacked"]
    assert (retry.attempt, retry.due_in_ms) == (2, 100)
    assert of_type(seen, R.DeadLettered)[0].reason == "nacked"
    assert of_type(seen, R.DlqReplayed)[0].actor == "$cli"
    assert "$cli" in [p.actor for p in of_type(seen, R.DlqPurged)]
    denied = {(d.action, d.target, d.code) for d in of_type(seen, R.Denied)}
    assert {
        ("publish", "orders.x", Code.PUBLISH_DENIED),
        ("subscribe", "orders.>", Code.SUBSCRIBE_DENIED),
        ("serve", "orders.>", Code.SUBSCRIBE_DENIED),
        ("request", "orders.q", Code.REQUEST_DENIED),
        ("reply", "quote.x", Code.UNKNOWN_REPLY),
        ("command", "STATS", Code.COMMAND_DENIED),
    } <= denied
    assert "c-2" in {d.correlation_id for d in of_type(seen, R.Denied)}
    [life] = of_type(seen, R.Lifecycle)
    assert (life.app, life.change, life.details["pid"]) == ("ticker", "launch", 42)
    changes = {c.change for c in of_type(seen, R.SessionChanged)}
    assert changes == set(R.SESSION_CHANGES)
    reasons = {u.reason for u in of_type(seen, R.Unsubscribed)}
    assert reasons == {"unsubscribe", "session-ended", "expired"}
    assert all(s.serve is False for s in of_type(seen, R.Subscribed))
    [skip] = of_type(seen, R.ConsumerSkipped)
    assert (skip.consumer, skip.first) == ("$audit", 1)


def test_no_consumer_means_no_event_is_encoded() -> None:
    b = Broker()
    b.hello(b"s", "sub")
    b.send(b"s", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"p", "pub")
    b.pub(b"p", "pub", "market.a")
    assert not b.router.stream.active
    assert b.router.stream.last_seq > 0 and b.events() == []


# -- the consumers' link ----------------------------------------------------------------------


class LinkConsumer:
    """A stream consumer over the pure core: EVSYNC, batches from the PUB side, EVFETCH
    for gaps, EVACK of what it took. `stop()` forgets the connection (a crash); what it
    took survives (its store), `received`."""

    def __init__(self, broker: Broker, identity: str, peer: bytes) -> None:
        self.b, self.identity, self.peer = broker, identity, peer
        self.received = 0
        self.got: list[R.Event] = []
        self.running = False

    def start(self) -> None:
        self.b.hello(self.peer, self.identity, session="stream")
        out = self.b.send(self.peer, self.identity, EvSync(self.received).frames())
        [(_, frames)] = [o for o in out if o[1][0] == P.EVSYNCOK]
        ok = EvSyncOk.decode(frames)
        assert ok.epoch == 7 and not ok.restore
        self.running = True
        self._catch_up(ok.next - 1)

    def stop(self) -> None:
        self.running = False
        self.b.router.drop_peer(self.peer, self.b.mono)

    def batch(self, frames: list[bytes]) -> None:
        if self.running:
            self._take(R.decode_head(frames[1])[1], frames[2])

    def _take(self, first: int, blob: bytes) -> None:
        if first > self.received + 1:
            self._catch_up(first - 1)
        for event in R.decode_events(blob):
            if event.seq == self.received + 1:
                self.got.append(event)
                self.received = event.seq
            elif event.seq > self.received + 1:
                self._catch_up(event.seq - 1)
                self._take(event.seq, R.encode_event(event.seq, event.ts_ns, event.record))
        self.b.send(self.peer, self.identity, EvAck(self.received).frames())

    def _catch_up(self, upto: int) -> None:
        while self.received < upto:
            [(_, frames)] = self.b.send(
                self.peer, self.identity, EvFetch(self.received + 1).frames()
            )
            assert frames[0] == P.EVDATA, unpack_map(frames[1])
            for event in R.decode_events(frames[2]):
                if event.seq == self.received + 1:
                    self.got.append(event)
                    self.received = event.seq


def test_two_consumers_one_stopped_and_restarted_each_get_every_event_once_in_order() -> None:
    b = Broker(consumers=("$audit", "$tracing"))
    audit = LinkConsumer(b, "$audit", b"a")
    tracing = LinkConsumer(b, "$tracing", b"t")
    audit.start()
    tracing.start()
    b.hello(b"s", "sub")
    b.send(b"s", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"p", "pub")
    for round_ in range(12):
        for _ in range(5):
            out = b.pub(b"p", "pub", f"market.{round_}")
            seqs = delivered_seqs(out, b"s")
            b.send(b"s", "sub", [P.ACK, pack({"seqs": seqs})])
        if round_ == 3:
            tracing.stop()  # it misses the batches meanwhile
        if round_ == 8:
            tracing.start()  # re-syncs from what it had, fetches the gap
        frames = b.router.stream.take_batch()
        assert frames is not None
        if round_ % 4 != 1:  # PUB/SUB drops every fourth batch for audit
            audit.batch(frames)
        tracing.batch(frames)
    last = b.router.stream.last_seq
    for consumer in (audit, tracing):
        consumer._catch_up(last)
        assert [e.seq for e in consumer.got] == list(range(1, last + 1))
    assert [e.record for e in audit.got] == [e.record for e in tracing.got]
    assert b.router.stream.cursors == {"$audit": last, "$tracing": last}
    assert b.router.stream.backlog_bytes == 0  # both passed everything: nothing retained


def test_event_commands_are_for_stream_consumers_only() -> None:
    b = Broker()
    b.hello(b"x", "pub")
    b.hello(b"c", "$cli")
    for peer, app in ((b"x", "pub"), (b"c", "$cli")):
        for frames in (EvSync(0).frames(), EvAck(1).frames(), EvFetch(1).frames()):
            assert error_codes(b.send(peer, app, frames)) == [Code.COMMAND_DENIED]
    assert error_codes(b.send(b"q", "$audit", EvSync(0).frames())) == [Code.NOT_WELCOMED]
    b.hello(b"a", "$audit")
    assert error_codes(b.send(b"a", "$audit", EvRestore(0, done=True).frames())) == [
        Code.COMMAND_DENIED
    ]
    assert b.router.stream.take_batch() is None  # nobody registered: nothing encoded ...
    assert b.router.stats.denied == 7  # ... but every refusal was counted


def test_fetch_of_a_dropped_range_says_where_to_resume() -> None:
    b = Broker(consumers=("$audit",), limits=StreamLimits(max_events=4))
    b.hello(b"p", "pub")
    for _ in range(6):
        b.pub(b"p", "pub", "market.x")
    b.hello(b"w", "$cli")
    b.send(b"w", "$cli", Subscribe(1, P.EVENTS_ALERT_TOPIC).frames())
    out = b.tick()
    [(_, frames)] = [o for o in out if o[0] == b"w"]
    notice = msgpack.unpackb(wire.Deliver.decode(frames).items[0].payload)
    assert notice["consumer"] == "$audit" and notice["first"] == 1
    b.hello(b"a", "$audit")
    [(_, frames)] = b.send(b"a", "$audit", EvFetch(1).frames())
    error = unpack_map(frames[1])
    assert error["code"] == Code.STORAGE_UNAVAILABLE
    assert error["ref"]["resume_from"] == b.router.stream.oldest_available() > 1


def test_stats_and_dlq_answers_and_errors_echo_the_rid() -> None:
    b = Broker()
    b.hello(b"c", "$cli")
    [(_, frames)] = b.send(b"c", "$cli", Stats(rid=41).frames())
    assert (frames[0], unpack_map(frames[1])["rid"]) == (P.STATSOK, 41)
    [(_, frames)] = b.send(b"c", "$cli", Dlq("list", rid=42).frames())
    assert (frames[0], unpack_map(frames[1])["rid"]) == (P.DLQOK, 42)
    [(_, frames)] = b.send(b"c", "$cli", Dlq("replay", 99, rid=43).frames())
    assert frames[0] == P.ERROR and unpack_map(frames[1])["ref"]["rid"] == 43
    b.hello(b"p", "pub")
    [(_, frames)] = b.send(b"p", "pub", Stats(rid=44).frames())
    assert unpack_map(frames[1])["ref"] == {"rid": 44}


# -- recovery over the link -------------------------------------------------------------------


class StubRestorer:
    """What broker.recovery.apply_restore does, in miniature, over the same four names."""

    def __init__(self) -> None:
        self.pages = 0

    def apply(self, router: Router, page: EvRestore, now_ns: int) -> None:
        self.pages += 1
        router.stream.start_after(page.watermark)
        for app, session, subscriptions in page.sessions:
            deliveries = [
                Delivery(
                    0, d[3], d[4], d[5], d[6], d[7], d[8], d[9], stored_seq=d[2], durable_sids=d[3]
                )
                for d in page.deliveries
                if (d[0], d[1]) == (app, session)
            ]
            router.restore_session((app, session), subscriptions, deliveries, now_ns)
        for sender, msg_id, seq, ts in page.recent:
            router.remember_published(sender, msg_id, seq, ts)
        for row in page.dead_letters:
            delivery = Delivery(0, row[15], row[8], row[9], row[10], row[11], row[12], row[13])
            router.dlq.restore(DeadLetter(row[0], row[1], row[2], row[3], row[4], delivery))

    def summary(self) -> dict[str, Any]:
        return {"pages": self.pages}


def test_recovery_holds_apps_until_persistence_restored_the_state() -> None:
    restorer = StubRestorer()
    b = Broker(persistence=True, restorer=restorer)
    assert b.hello(b"s", "sub", session="durable") == []  # held
    assert b.pub(b"p", "pub", "market.a") == []  # held too
    b.hello(b"x", "$persistence", session="store")
    [(_, frames)] = b.send(b"x", "$persistence", EvSync(100).frames())
    assert EvSyncOk.decode(frames) == EvSyncOk(101, 7, restore=True)
    stored = encode_pub_header(b"\x05" * 16, "market.a")
    page = EvRestore(
        100,
        sessions=(("sub", "durable", {1: "market.>"}),),
        deliveries=(
            (
                "sub",
                "durable",
                90,
                pack([1]),
                "pub",
                WALL0 - HOUR,
                "market.a",
                b"\x05" * 16,
                stored,
                b"old",
                False,
            ),
        ),
        recent=(("pub", b"\x05" * 16, 90, WALL0 - HOUR),),
    )
    assert b.send(b"x", "$persistence", page.frames()) == []
    assert b.core.recovering and b.core.held == 2
    assert error_codes(b.pub(b"q", "pub", "market.b")) == []  # third held message
    assert error_codes(b.pub(b"q", "pub", "market.c")) == [Code.STORAGE_UNAVAILABLE]  # bound
    out = b.send(b"x", "$persistence", EvRestore(100, done=True).frames())
    assert not b.core.recovering and restorer.pages == 2
    welcome = [f for to, f in out if to == b"s" and f[0] == P.WELCOME]
    assert welcome and unpack_map(welcome[0][1])["resumed"] is True
    assert any(to == b"s" and f[0] == P.DELIVER for to, f in out)  # the stored delivery
    events = b.events()
    assert events[0].seq == 101  # numbered after the store's watermark
    assert [e.seq for e in events] == list(range(101, 101 + len(events)))
    assert any(n["event"] == "broker-recovered" for n in b.router.notices)


def test_a_silent_persistence_is_warned_about_each_timeout_and_nothing_is_served() -> None:
    b = Broker(persistence=True)
    b.hello(b"s", "sub")
    assert b.tick(9 * SECOND) == [] and b.router.notices == []
    b.tick(SECOND)
    assert [n["event"] for n in b.router.notices] == ["persistence-silent"]
    b.tick(5 * SECOND)
    b.tick(5 * SECOND)
    assert [n["event"] for n in b.router.notices] == ["persistence-silent"] * 2
    assert b.core.recovering and b.core.held == 1


def test_evrestore_outside_recovery_is_refused() -> None:
    b = Broker(consumers=())
    b.hello(b"x", "$persistence")
    assert error_codes(b.send(b"x", "$persistence", EvRestore(0, done=True).frames())) == [
        Code.UNKNOWN_COMMAND
    ]


def test_overflow_and_unreachable_peers() -> None:
    b = Broker()
    [(peer, frames)] = b.core.overflow(b"z")
    assert peer == b"z" and unpack_map(frames[1])["code"] == Code.TOO_LARGE
    b.hello(b"s", "sub")
    b.core.unreachable(b"s", [P.DELIVER, b"", b"", b"", b""], gone=False, now_ns=b.mono)
    assert b.router.session_of(b"s") is not None
    b.core.unreachable(b"s", [P.DELIVER, b"", b"", b"", b""], gone=True, now_ns=b.mono)
    assert b.router.session_of(b"s") is None
    assert b.router.stats.undeliverable == 2
    packed = [P.DELIVER, wire.pack_batch([b"sids", b"stamp", b"header", b"payload"] * 3)]
    b.core.unreachable(b"s", packed, gone=False, now_ns=b.mono)
    assert b.router.stats.undeliverable == 5  # a packed DELIVER counts every message in it


# -- sessions ending: a clean close discards, an expiry dead-letters ------------------------


def test_bye_discards_what_a_session_held_while_grace_expiry_still_dead_letters() -> None:
    delivery = DeliveryConfig(window=2, retries=0, grace_ms=30_000)
    b = Broker(consumers=("$audit",), limits=StreamLimits(max_events=10_000), delivery=delivery)
    b.hello(b"p", "pub")
    b.hello(b"s", "sub")  # leaves cleanly: 2 in flight (out of attempts) + 3 queued
    b.send(b"s", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"g", "sub")  # vanishes: its grace period runs out
    b.send(b"g", "sub", Subscribe(1, "market.>").frames())
    for _ in range(5):
        b.pub(b"p", "pub", "market.a")
    b.events()
    b.send(b"s", "sub", [P.BYE])
    assert len(b.router.dlq) == 0
    assert b.router.stats.discarded_on_close == 5
    seen = b.events()
    [closed] = [c for c in of_type(seen, R.SessionChanged) if c.change == "closed"]
    assert (closed.session, closed.reason) == ("s", "bye; 5 queued discarded")
    assert of_type(seen, R.DeadLettered) == [] and of_type(seen, R.RetryScheduled) == []
    b.hello(b"c", "$cli")
    [(_, frames)] = b.send(b"c", "$cli", Stats(rid=1).frames())
    stats = unpack_map(frames[1])
    assert stats["discarded_on_close"] == 5 and stats["dlq_size"] == 0
    b.router.drop_peer(b"g", b.mono)
    b.tick(31 * SECOND)
    dead = b.router.dlq.entries()
    assert {(e.reason, e.session) for e in dead} == {("ack-timeout", "g"), ("expired", "g")}
    assert len(dead) == 5 and b.router.stats.discarded_on_close == 5
    assert [e.delivery.last_error for e in dead if e.reason == "expired"] == [
        "session ended (grace period over)"
    ] * 3
    # purge by ids drops just those (unknown ids skipped); without ids, every entry
    first, second, *rest = b.router.dlq.ids()
    b.hello(b"c", "$cli")  # the operator went silent over the grace period too
    [(_, frames)] = b.send(b"c", "$cli", Dlq("purge", rid=2, ids=(second, 999, first)).frames())
    assert unpack_map(frames[1]) == {"purged": 2, "rid": 2}
    assert b.router.dlq.ids() == rest
    assert [p.entry_ids for p in of_type(b.events(), R.DlqPurged)] == [[second, first]]
    [(_, frames)] = b.send(b"c", "$cli", Dlq("purge", rid=3).frames())
    assert unpack_map(frames[1])["purged"] == 3 and len(b.router.dlq) == 0


# -- time -------------------------------------------------------------------------------------


@pytest.mark.parametrize("jump", [HOUR, -HOUR])
def test_a_wall_clock_jump_changes_no_timer(jump: int) -> None:
    delivery = DeliveryConfig(retries=2, backoff_base_ms=200, ack_timeout_ms=5_000, grace_ms=30_000)
    b = Broker(delivery=delivery)
    b.hello(b"s", "sub")
    b.send(b"s", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"g", "sub")  # will detach and wait out its grace period
    b.send(b"g", "sub", Subscribe(1, "market.>").frames())
    b.hello(b"p", "pub")
    [seq] = delivered_seqs(b.pub(b"p", "pub", "market.a"), b"s")
    stamp_before = b.router.stamp()
    b.router.drop_peer(b"g", b.mono)
    b.send(b"s", "sub", Nack(seq, "retry me").frames())
    b.wall.now += jump  # the wall clock jumps; the monotonic one does not
    for peer, app in ((b"s", "sub"), (b"p", "pub")):
        b.send(peer, app, [P.PING])
    assert delivered_seqs(b.tick(199 * MS), b"s") == []  # backoff not yet over
    assert len(delivered_seqs(b.tick(MS), b"s")) == 1  # exactly on the monotonic clock
    assert b.router.session_of(b"s") is not None  # not unresponsive
    assert ("sub", "g") in b.router.sessions.by_key  # grace period still running
    for _ in range(29):
        for peer, app in ((b"s", "sub"), (b"p", "pub")):
            b.send(peer, app, [P.PING])
        b.tick(SECOND)
    assert ("sub", "g") in b.router.sessions.by_key
    b.tick(SECOND)  # 30 s and a bit after the detach, by the monotonic clock
    assert ("sub", "g") not in b.router.sessions.by_key
    assert b.router.stamp() >= stamp_before  # broker stamps never go backwards
    if jump < 0:
        assert b.router.stamp() == stamp_before
