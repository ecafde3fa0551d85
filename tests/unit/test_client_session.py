"""ClientSession without sockets: a fake broker made of wire records, a manual clock.

Every test joins the pure client core to frames built with `broker.wire` records and
reads what the core sends back by decoding it with the same records; time only moves
when a test moves it, so nothing sleeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.codec import decode_pub_header, encode_pub_header, encode_sids, encode_stamp, pack
from broker.errors import Code
from broker.wire import (
    CLOSING_ECHO,
    CONTROL_RECORDS,
    Ack,
    Bye,
    Confirm,
    Credit,
    Deliver,
    Dlq,
    DlqOk,
    Error,
    Hello,
    Nack,
    Ping,
    Pong,
    Publish,
    Request,
    Stats,
    StatsOk,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    Welcome,
)
from clients.errors import (
    AuthenticationError,
    BrokerUnavailable,
    NoResponders,
    PermissionDenied,
    RequestTimeout,
)
from clients.events import (
    Answered,
    CallFailed,
    Closed,
    Confirmed,
    ErrorReported,
    Failed,
    PublishRefused,
    ReconnectNeeded,
    Replied,
    RequestFailed,
    Subscribed,
    SubscribeFailed,
    Welcomed,
)
from clients.message import Message
from clients.session import (
    ACK_DELAY_S,
    FINAL,
    TRANSITIONS,
    ClientSession,
    Input,
    SessionConfig,
    State,
)

HEARTBEAT_S = 2.0
TIMEOUT_S = 10.0


def welcome(
    resumed: bool = False, subs: tuple[tuple[int, str], ...] = (), credit: int = 0
) -> list[bytes]:
    return Welcome(
        version=1,
        app="app",
        session="main",
        resumed=resumed,
        subs=subs,
        heartbeat_ms=int(HEARTBEAT_S * 1000),
        timeout_ms=int(TIMEOUT_S * 1000),
        grace_ms=30_000,
        window=256,
        store=None,
        credit=credit,
    ).frames()


def error(code: Code, **ref: Any) -> list[bytes]:
    return Error.for_code(code, f"{code.name.lower()} in a test", **ref).frames()


def header(msg_id: bytes, topic: str = "market.x", **extra: Any) -> bytes:
    return encode_pub_header(msg_id, topic, confirm=True, extra=extra or None)


def deliver(*items: tuple[tuple[int, ...], int, bytes], sender: str = "pub") -> list[bytes]:
    """DELIVER of (sids, seq, header) items with payload b'data'."""
    return Deliver.frames_of(
        [
            (encode_sids(sids), encode_stamp(seq, sender, 1_000 + seq), head, pack("data"))
            for sids, seq, head in items
        ]
    )


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Link:
    """A ClientSession, the clock it is driven with, and decoding of what it sends."""

    def __init__(self, **config: Any) -> None:
        self.now = 1000.0
        self.session = ClientSession(SessionConfig("app", **config), self._settle, self.now)

    def _settle(self, seq: int, error: str | None, requeue: bool) -> None:
        self.session.settle(seq, error, requeue)  # a Receipt's ack, on the test's thread

    def state(self) -> State:
        return self.session.state

    def sent(self) -> list[Any]:
        """What the session sends now, as wire records."""
        return [CONTROL_RECORDS[f[0]].decode(f) for f in self.session.outgoing(self.now)]

    def settled(self) -> list[Any]:
        """What the session sends by the end of the ACK delay (an ACK waits up to
        `ACK_DELAY_S` for company: the first `outgoing` starts its clock)."""
        out = self.sent()
        self.now += ACK_DELAY_S
        return out + self.sent()

    def give(self, frames: list[bytes]) -> list[Any]:
        """The broker sends `frames`; the events they caused."""
        self.session.receive(frames, self.now)
        return list(self.session.take_events())

    def events(self) -> list[Any]:
        return list(self.session.take_events())

    def welcomed(self, **kwargs: Any) -> Link:
        assert isinstance(self.sent()[0], Hello)
        assert [type(e) for e in self.give(welcome(**kwargs))] == [Welcomed]
        return self

    def publish(self, n: int) -> bytes:
        self.session.publish(mid(n), header(mid(n)), pack(n))
        return mid(n)

    def subscribed(self, pattern: str) -> int:
        sid = self.session.subscribe(pattern)
        assert Subscribe(sid, pattern) in self.sent()
        assert self.give(SubscribeOk(sid, pattern).frames()) == [Subscribed(sid)]
        return sid


def published_ids(records: list[Any]) -> list[bytes]:
    return [
        decode_pub_header(head).msg_id
        for r in records
        if isinstance(r, Publish)
        for head, _ in r.pairs
    ]


# -- connect, publish, deliver, ack ----------------------------------------------------------


def test_hello_first_then_nothing_until_welcome() -> None:
    link = Link(session="desk")
    link.publish(1)
    sent = link.sent()
    assert sent == [Hello(session="desk", client="plexus-py/0.1", app="app")]
    assert link.state() is State.CONNECTING
    assert link.sent() == []  # the publish waits for the session
    assert [type(e) for e in link.give(welcome())] == [Welcomed]
    assert link.state() is State.WELCOMED
    assert published_ids(link.sent()) == [mid(1)]


def test_publish_confirm_deliver_ack() -> None:
    link = Link().welcomed()
    sid = link.subscribed("market.>")
    link.publish(1)
    link.publish(2)
    assert published_ids(link.sent()) == [mid(1), mid(2)]  # one PUB batch
    assert link.session.unconfirmed == 2
    assert link.give(Confirm((mid(1), mid(2), mid(9))).frames()) == [Confirmed((mid(1), mid(2)))]
    assert link.session.unconfirmed == 0
    [message] = link.give(deliver(((sid,), 77, header(mid(5)))))
    assert isinstance(message, Message)
    assert (message.subscription_id, message.sender, message.data) == (sid, "pub", "data")
    assert link.sent() == []  # not settled yet: nothing to send
    message.ack()
    message.ack()  # once only
    assert link.settled() == [Ack((77,))]


def test_publishes_go_out_in_client_batches() -> None:
    link = Link().welcomed()
    for n in range(300):
        link.publish(n)
    batches = [r for r in link.sent() if isinstance(r, Publish)]
    assert [len(b.pairs) for b in batches] == [P.CLIENT_BATCH, P.CLIENT_BATCH, 300 - 256]
    assert published_ids(batches) == [mid(n) for n in range(300)]


def test_publishes_stay_within_the_brokers_credit() -> None:
    """Flow control (protocol §3.17): never more PUB messages than the credit allows; the
    rest wait in the outbox (unconfirmed, counted by the window) until a CREDIT comes."""
    link = Link().welcomed(credit=200)
    assert link.session.credit == 200
    for n in range(300):
        link.publish(n)
    batches = [r for r in link.sent() if isinstance(r, Publish)]
    assert [len(b.pairs) for b in batches] == [P.CLIENT_BATCH, 200 - P.CLIENT_BATCH]
    assert link.session.credit == 0 and link.session.unconfirmed == 300
    assert link.session.window_free == 10_000 - 300  # publish() blocks once this is 0
    assert published_ids(link.sent()) == []  # held back: out of credit
    assert link.give(Credit(64).frames()) == []
    assert published_ids(link.sent()) == [mid(n) for n in range(200, 264)]
    link.give(Credit(1000).frames())
    assert published_ids(link.sent()) == [mid(n) for n in range(264, 300)]
    assert link.session.credit == 1000 - 36


def test_a_new_welcome_brings_the_whole_credit_and_a_broker_without_one_none() -> None:
    link = Link().welcomed(credit=10)
    for n in range(30):
        link.publish(n)
    assert published_ids(link.sent()) == [mid(n) for n in range(10)]
    link.give(error(Code.NOT_WELCOMED))
    assert isinstance(link.sent()[0], Hello)
    link.give(welcome(credit=20))  # resend of the unconfirmed first, within the new credit
    assert published_ids(link.sent()) == [mid(n) for n in range(20)]
    link.give(error(Code.NOT_WELCOMED))
    link.sent()
    link.give(welcome())  # an older broker: no credit, no flow control
    assert link.session.credit is None
    assert published_ids(link.sent()) == [mid(n) for n in range(30)]
    link.give(Credit(5).frames())  # ignored without flow control
    assert link.session.credit is None


def test_one_delivery_to_two_subscriptions_is_acked_when_both_consumed() -> None:
    link = Link().welcomed()
    wide, narrow = link.subscribed("market.>"), link.subscribed("market.x")
    first, second = link.give(deliver(((wide, narrow), 5, header(mid(1)))))
    assert (first.subscription_id, second.subscription_id) == (wide, narrow)
    first.ack()
    assert link.sent() == []
    second.ack()
    assert link.settled() == [Ack((5,))]
    a, b = link.give(deliver(((wide, narrow), 6, header(mid(2)))))
    a.nack("boom")  # one failure is enough: nacked at once, the other copy changes nothing
    b.ack()
    assert link.sent() == [Nack(6, "boom", True)]
    [c] = link.give(deliver(((wide,), 7, header(mid(3)))))
    c.reject("never")
    assert link.sent() == [Nack(7, "never", False)]


def test_delivery_for_no_wanted_sid_is_acked_and_dropped() -> None:
    link = Link().welcomed()
    sid = link.subscribed("market.>")
    link.session.unsubscribe(sid)
    assert link.sent() == [Unsubscribe(sid)]
    assert link.give(deliver(((sid,), 9, header(mid(1))))) == []
    assert link.settled() == [Ack((9,))]


def test_acks_are_split_under_the_limit() -> None:
    """Seqs ≥ 2³² take 9 bytes (real ones start at the broker's start time in µs): an ACK
    frame holds at most 909 of them within 8 KiB (protocol §3.8); the client puts 512."""
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    base = 1_800_000_000_000_000
    items = [((sid,), base + n, header(mid(n))) for n in range(1, 1001)]
    for message in link.give(deliver(*items)):
        message.ack()
    frames = link.session.outgoing(link.now)
    acks = [Ack.decode(f) for f in frames]
    assert [len(a.seqs) for a in acks] == [P.MAX_ACK_BATCH, 1000 - P.MAX_ACK_BATCH]
    assert P.MAX_ACK_BATCH <= 909 and all(len(f[1]) <= P.MAX_HEADER_BYTES for f in frames)
    assert [s for a in acks for s in a.seqs] == [base + n for n in range(1, 1001)]


# -- ACK coalescing ----------------------------------------------------------------------------


def delivered(link: Link, sid: int, seqs: range) -> list[Message]:
    return link.give(deliver(*[((sid,), seq, header(mid(seq))) for seq in seqs]))


def test_acks_wait_for_company_until_the_ack_delay() -> None:
    """Fewer ACKs than a batch go out one ACK_DELAY_S after the first `outgoing` that saw
    them; `next_deadline` says when, so a driver sleeps exactly until then."""
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    for message in delivered(link, sid, range(1, 4)):
        message.ack()
    assert link.session.next_deadline() <= link.now  # not seen by outgoing yet: look now
    seen = link.now
    assert link.sent() == []
    assert link.session.next_deadline() == seen + ACK_DELAY_S
    link.now += ACK_DELAY_S / 2
    [fourth] = delivered(link, sid, range(4, 5))
    fourth.ack()
    assert link.sent() == []  # the clock runs from the first of them
    assert link.session.next_deadline() == seen + ACK_DELAY_S
    link.now = seen + ACK_DELAY_S
    assert link.sent() == [Ack((1, 2, 3, 4))]
    assert link.session.next_deadline() == seen + HEARTBEAT_S  # nothing pending: the PING


@pytest.mark.parametrize(("window", "batch"), [(256, 64), (8, 2), (3, 1), (1, 1)])
def test_a_quarter_of_the_brokers_window_goes_at_once(window: int, batch: int) -> None:
    link = Link()
    link.sent()
    frames = welcome()
    record = Welcome.decode(frames)
    link.give(dataclasses.replace(record, window=window).frames())
    assert link.session.ack_batch == batch
    sid = link.subscribed("a.>")
    messages = delivered(link, sid, range(1, 2 * batch + 1))
    for message in messages[: batch - 1]:
        message.ack()
    assert link.sent() == []
    messages[batch - 1].ack()
    assert link.sent() == [Ack(tuple(range(1, batch + 1)))]  # no waiting, no clock
    for message in messages[batch:]:
        message.ack()
    assert link.sent() == [Ack(tuple(range(batch + 1, 2 * batch + 1)))]


def test_the_ack_batch_can_be_configured_and_defaults_before_a_welcome() -> None:
    assert Link().session.ack_batch == 64  # the broker's default window of 256, / 4
    assert Link(ack_batch=5).welcomed().session.ack_batch == 5  # whatever WELCOME says


def test_a_nack_goes_at_once_after_the_acks_pending_before_it() -> None:
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    first, second, third, fourth = delivered(link, sid, range(1, 5))
    first.ack()
    second.ack()
    assert link.sent() == []
    third.nack("boom")
    fourth.reject("never")
    assert link.sent() == [Ack((1, 2)), Nack(3, "boom", True), Nack(4, "never", False)]


def test_closing_sends_every_pending_ack_before_the_closing_ping() -> None:
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    for message in delivered(link, sid, range(1, 3)):
        message.ack()
    assert link.sent() == []
    link.session.close(link.now, 2.0)
    assert link.sent() == [Ack((1, 2)), Ping(CLOSING_ECHO)]
    [late] = delivered(link, sid, range(3, 4))  # acked while the close waits for its PONG
    late.ack()
    assert link.sent() == [Ack((3,))]


def test_acks_wait_out_a_reconnect_without_a_busy_deadline() -> None:
    """ACKs pending while the session is CONNECTING are not due (nothing can be sent):
    `next_deadline` must not ask the driver to spin; they go after the WELCOME."""
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    [message] = delivered(link, sid, range(7, 8))
    message.ack()
    link.sent()
    link.session.connection_made(link.now)
    link.now += 1.0
    assert link.sent() == [Hello(client="plexus-py/0.1", app="app")]
    assert link.session.next_deadline() > link.now
    link.give(welcome(resumed=True))
    sent = link.sent()
    assert Ack((7,)) in sent and isinstance(sent[0], Subscribe)


SETTLE_OPS = st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 80)),
    st.tuples(st.just("ack"), st.integers(1, 80)),
    st.tuples(st.just("nack"), st.just(1)),
    st.tuples(st.just("wait"), st.integers(0, 8)),
    st.tuples(st.just("send"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(SETTLE_OPS, max_size=40))
def test_every_settlement_goes_out_once_in_order_and_never_late(
    ops: list[tuple[str, int]],
) -> None:
    """Any mix of deliveries, ACKs, NACKs, time and sends: each settled seq goes out once,
    ACKs in the order they were made, no ACK frame is larger than the protocol allows,
    never more than a batch stays pending after a send, and an ACK seen by a send at t
    has gone out by the first send at t + ACK_DELAY_S (which `next_deadline` announces)."""
    link = Link().welcomed()
    sid = link.subscribed("a.>")
    batch = link.session.ack_batch
    unsettled: list[Message] = []
    acked: list[int] = []
    nacked: list[int] = []
    sent_acks: list[int] = []
    sent_nacks: list[int] = []
    seen_at: dict[int, float] = {}  # pending ack -> when a send first saw it
    next_seq = 1

    def send() -> None:
        for record in link.sent():
            if isinstance(record, Ack):
                assert len(record.seqs) <= P.MAX_ACK_BATCH
                sent_acks.extend(record.seqs)
            elif isinstance(record, Nack):
                sent_nacks.append(record.seq)
        pending = [seq for seq in acked if seq not in sent_acks]
        assert len(pending) < batch
        for seq in pending:
            seen_at.setdefault(seq, link.now)
            assert link.now < seen_at[seq] + ACK_DELAY_S, "an ACK was held past its delay"
            assert link.session.next_deadline() <= seen_at[seq] + ACK_DELAY_S

    for kind, arg in ops:
        if kind == "deliver":
            unsettled += delivered(link, sid, range(next_seq, next_seq + arg))
            next_seq += arg
        elif kind == "ack":
            for message in unsettled[:arg]:
                message.ack()
                acked.append(message.envelope.seq)
            del unsettled[:arg]
        elif kind == "nack" and unsettled:
            message = unsettled.pop(0)
            message.nack("no")
            nacked.append(message.envelope.seq)
        elif kind == "wait":
            link.now += arg / 1000
        else:
            send()
    send()  # starts the clock of what is pending ...
    link.now += ACK_DELAY_S
    send()  # ... which is then due
    assert sent_acks == acked and sent_nacks == nacked


def test_malformed_frames_from_the_broker_are_ignored() -> None:
    link = Link().welcomed()
    link.subscribed("a.>")
    for frames in ([P.DELIVER, b"x"], [P.CONFIRM, b"\xc1"], [P.SUBOK, pack({"sid": "x"})]):
        assert link.give(frames) == []
    assert link.state() is State.WELCOMED


# -- reconnect and resume --------------------------------------------------------------------


def test_reconnect_resends_unconfirmed_in_order_and_resubscribes() -> None:
    link = Link().welcomed()
    sid = link.subscribed("market.>")
    for n in (1, 2, 3):
        link.publish(n)
    assert published_ids(link.sent()) == [mid(1), mid(2), mid(3)]
    link.give(Confirm((mid(2),)).frames())
    link.session.connection_made(link.now)  # a new ZMTP handshake: maybe a new broker
    assert link.state() is State.CONNECTING
    assert link.session.reconnects == 1
    link.publish(4)
    assert link.sent() == [Hello(client="plexus-py/0.1", app="app")]
    assert [type(e) for e in link.give(welcome(resumed=False))] == [Welcomed]
    again = link.sent()
    assert Subscribe(sid, "market.>") in again  # a new session holds no subscriptions
    assert published_ids(again) == [mid(1), mid(3), mid(4)]  # unconfirmed, in order, once
    assert link.sent() == []


def test_resumed_subscription_is_held_until_claimed_then_delivered_first() -> None:
    link = Link().welcomed(resumed=True, subs=((5, "orders.*"),))
    # the broker delivers what it kept before the app has subscribed again
    assert link.give(deliver(((5,), 40, header(mid(1))), ((5,), 41, header(mid(2))))) == []
    assert link.sent() == []  # held, not acknowledged
    sid = link.session.subscribe("orders.*")
    assert sid == 5  # the same pattern claims the resumed sid
    held = link.events()
    assert [m.envelope.seq for m in held] == [40, 41]
    assert link.sent() == [Subscribe(5, "orders.*")]
    assert link.give(SubscribeOk(5, "orders.*").frames()) == [Subscribed(5)]
    for message in held:
        message.ack()
    assert link.settled() == [Ack((40, 41))]
    assert link.session.subscribe("orders.*") != 5  # a second one gets a fresh sid


def test_not_welcomed_re_hellos_once_and_resends_calls() -> None:
    link = Link().welcomed()
    rid = link.session.call(Stats(), link.now + 5, "stats-token")
    assert link.sent() == [Stats(rid)]
    for _ in range(3):  # the broker forgot the session: every command gets 105
        assert link.give(error(Code.NOT_WELCOMED)) == []
    assert link.sent() == [Hello(client="plexus-py/0.1", app="app")]
    assert link.sent() == []
    link.give(welcome(resumed=True))
    assert link.sent() == [Stats(rid)]  # refused unexecuted: asked again
    assert link.give(StatsOk(rid, {"sessions": 1}).frames()) == [
        Answered("stats-token", {"sessions": 1})
    ]


def test_broker_silence_asks_for_a_new_transport() -> None:
    link = Link().welcomed()
    link.now += HEARTBEAT_S
    assert link.sent() == [Ping()]
    link.now += TIMEOUT_S + 0.1  # nothing received since the WELCOME
    assert link.sent() == []
    assert link.events() == [ReconnectNeeded()]
    assert link.state() is State.CONNECTING
    link.session.connection_made(link.now)
    assert link.sent() == [Hello(client="plexus-py/0.1", app="app")]


def test_next_deadline_follows_heartbeat_and_expiry() -> None:
    link = Link().welcomed()
    assert link.session.next_deadline() == link.now + HEARTBEAT_S
    link.session.call(Stats(), link.now + 0.5, "t")
    assert link.session.next_deadline() == link.now + 0.5


def test_calls_in_flight_are_lost_with_the_transport() -> None:
    link = Link().welcomed()
    link.session.call(Stats(), link.now + 5, "sent")
    link.sent()
    link.session.call(Dlq("list"), link.now + 5, "queued")
    link.session.connection_made(link.now)
    [lost] = link.events()
    assert isinstance(lost, CallFailed) and lost.token == "sent"
    assert isinstance(lost.error, BrokerUnavailable)
    link.sent()
    link.give(welcome())
    assert [type(r) for r in link.sent()] == [Dlq]  # the unsent one goes out now


# -- failures --------------------------------------------------------------------------------


def test_taken_over_fails_everything_pending() -> None:
    link = Link().welcomed()
    sid = link.session.subscribe("a.>")
    link.session.request(Request.build(mid(7), "q.x", "r1", 1000, b""), link.now + 5, "req")
    link.session.call(Stats(), link.now + 5, "call")
    link.sent()
    events = link.give(error(Code.SESSION_TAKEN_OVER))
    assert [type(e) for e in events] == [SubscribeFailed, RequestFailed, CallFailed, Failed]
    assert events[0].sid == sid
    assert link.state() is State.FAILED
    assert link.session.failure is events[-1].error
    link.publish(1)
    link.now += 100
    assert link.sent() == []  # finished: never re-HELLOs (it would take the session back)


@pytest.mark.parametrize("code", [Code.MANIFEST_MISSING, Code.UNSUPPORTED_VERSION])
def test_hello_refused_fails_the_session(code: Code) -> None:
    link = Link()
    link.sent()
    [failed] = link.give(error(code))
    assert isinstance(failed, Failed) and failed.error.code == int(code)
    assert link.state() is State.FAILED


def test_credential_refused_by_the_transport() -> None:
    link = Link()
    link.session.auth_failed(AuthenticationError("no", 200))
    assert [type(e) for e in link.events()] == [Failed]
    assert link.state() is State.FAILED


def test_errors_go_to_what_they_concern() -> None:
    link = Link().welcomed()
    sid = link.session.subscribe("news.>")
    link.sent()
    [refused] = link.give(error(Code.SUBSCRIBE_DENIED, sid=sid, pattern="news.>"))
    assert isinstance(refused, SubscribeFailed) and isinstance(refused.error, PermissionDenied)
    assert link.sent() == []  # forgotten: never re-sent
    msg_id = link.publish(1)
    link.sent()
    [denied] = link.give(error(Code.PUBLISH_DENIED, id=msg_id, topic="market.x"))
    assert isinstance(denied, PublishRefused) and denied.msg_id == msg_id
    assert link.session.unconfirmed == 0
    link.session.connection_made(link.now)
    link.sent()
    link.give(welcome())
    assert published_ids(link.sent()) == []  # refused by id: final, never resent
    [other] = link.give(error(Code.BAD_HEADER, index=0))
    assert isinstance(other, ErrorReported)


def test_publish_refused_by_id_is_reported_once() -> None:
    link = Link().welcomed()
    msg_id = link.publish(1)
    link.sent()
    [refused] = link.give(error(Code.PUBLISH_DENIED, id=msg_id, topic="market.x"))
    assert isinstance(refused, PublishRefused) and refused.msg_id == msg_id
    assert isinstance(refused.error, PermissionDenied) and refused.error.code == 300
    [again] = link.give(error(Code.PUBLISH_DENIED, id=msg_id, topic="market.x"))
    assert isinstance(again, ErrorReported)


# -- requests and calls ----------------------------------------------------------------------


def reply_to(reply: str, seq: int, sender: str = "responder") -> list[bytes]:
    return deliver(((P.REPLY_SID,), seq, header(mid(seq), "q.x", to=reply)), sender=sender)


def test_replies_find_their_request_by_reply_id() -> None:
    link = Link().welcomed()
    first = Request.build(mid(1), "q.x", "reply-a", 5000, pack(1))
    second = Request.build(mid(2), "q.x", "reply-b", 5000, pack(2))
    link.session.request(first, link.now + 5, "token-a")
    link.session.request(second, link.now + 5, "token-b")
    assert [type(r) for r in link.sent()] == [Request, Request]
    [b] = link.give(reply_to("reply-b", 11))
    [a] = link.give(reply_to("reply-a", 12))
    assert (a.token, b.token) == ("token-a", "token-b")
    assert isinstance(a, Replied) and a.message.envelope.in_reply_to == "reply-a"
    assert link.settled() == [Ack((11, 12))]  # replies: acknowledged by the core itself
    assert link.give(reply_to("reply-a", 13)) == []  # a late duplicate: dropped
    assert link.settled() == [Ack((13,))]


def test_request_expires_at_its_deadline_and_a_late_reply_is_dropped() -> None:
    link = Link().welcomed()
    link.session.request(Request.build(mid(1), "q.x", "r", 500, b""), link.now + 0.5, "t")
    link.sent()
    link.now += 0.49
    link.sent()
    assert link.events() == []
    link.now += 0.02
    link.sent()
    [expired] = link.events()
    assert isinstance(expired, RequestFailed) and isinstance(expired.error, RequestTimeout)
    assert link.give(reply_to("r", 20)) == []


def test_request_refused_by_id() -> None:
    link = Link().welcomed()
    link.session.request(Request.build(mid(3), "q.x", "r", 500, b""), link.now + 5, "t")
    link.sent()
    [refused] = link.give(error(Code.NO_RESPONDERS, id=mid(3)))
    assert isinstance(refused, RequestFailed) and isinstance(refused.error, NoResponders)


def test_calls_are_answered_by_rid_in_any_order() -> None:
    link = Link().welcomed()
    rids = {link.session.call(Stats(), link.now + 5, f"s{i}"): f"s{i}" for i in range(3)}
    rids |= {link.session.call(Dlq("list"), link.now + 5, f"d{i}"): f"d{i}" for i in range(2)}
    assert len(rids) == 5 and [r.rid for r in link.sent()] == list(rids)
    answers: list[Any] = []
    for rid in reversed(list(rids)):
        record = StatsOk if rids[rid].startswith("s") else DlqOk
        answers += link.give(record(rid, {"who": rids[rid]}).frames())
    assert all(isinstance(a, Answered) and a.data == {"who": a.token} for a in answers)
    assert sorted(a.token for a in answers) == sorted(rids.values())


def test_call_refused_by_rid() -> None:
    link = Link().welcomed()
    first = link.session.call(Dlq("replay", 4), link.now + 5, "first")
    second = link.session.call(Dlq("replay", 5), link.now + 5, "second")
    link.sent()
    [refused] = link.give(error(Code.UNKNOWN_DLQ_ENTRY, rid=second))
    assert isinstance(refused, CallFailed) and refused.token == "second"
    assert link.give(DlqOk(first, {"replayed": 4}).frames()) == [Answered("first", {"replayed": 4})]


def test_answers_without_rid_go_to_the_oldest_call_of_their_command() -> None:
    """An older broker echoes no rid: it answers in order, so the oldest call matches."""
    link = Link().welcomed()
    link.session.call(Stats(), link.now + 5, "s1")
    link.session.call(Dlq("list"), link.now + 5, "d1")
    link.session.call(Stats(), link.now + 5, "s2")
    link.sent()
    old_dlq_ok = [P.DLQOK, pack({"entries": [], "dropped": 0})]
    old_stats_ok = [P.STATSOK, pack({"sessions": 3})]
    assert link.give(old_dlq_ok) == [Answered("d1", {"entries": [], "dropped": 0})]
    assert link.give(old_stats_ok) == [Answered("s1", {"sessions": 3})]
    [denied] = link.give(error(Code.COMMAND_DENIED))  # no rid in ref either
    assert isinstance(denied, CallFailed) and denied.token == "s2"


def test_call_expires_and_cancel_forgets() -> None:
    link = Link().welcomed()
    link.session.call(Stats(), link.now + 1, "late")
    cancelled = link.session.call(Stats(), link.now + 1, "gone")
    link.session.cancel("gone")
    link.sent()
    link.now += 1
    link.sent()
    [expired] = link.events()
    assert isinstance(expired, CallFailed) and expired.token == "late"
    assert link.give(StatsOk(cancelled, {}).frames()) == []


# -- closing ---------------------------------------------------------------------------------


def test_clean_close_flushes_pings_waits_for_the_pong_then_byes() -> None:
    link = Link().welcomed()
    link.publish(1)
    link.session.close(link.now, 2.0)
    assert link.state() is State.CLOSING
    sent = link.sent()
    assert published_ids(sent) == [mid(1)] and sent[-1] == Ping(CLOSING_ECHO)
    assert link.give(Pong().frames()) == []  # a heartbeat's PONG is not the one
    assert link.give(Pong(CLOSING_ECHO).frames()) == []
    assert link.sent() == [Bye()]
    assert link.events() == [Closed(True)]
    assert link.state() is State.CLOSED and link.sent() == []


def test_close_gives_up_after_its_timeout() -> None:
    link = Link().welcomed()
    link.session.close(link.now, 2.0)
    link.sent()
    link.now += 2.0
    assert link.sent() == []
    assert link.events() == [Closed(False)]


def test_close_before_welcome_ends_at_once() -> None:
    link = Link()
    link.session.close(link.now, 2.0)
    assert link.events() == [Closed(False)]
    assert link.state() is State.CLOSED


# -- the state machine -----------------------------------------------------------------------


def test_every_state_handles_every_input() -> None:
    for state in State:
        for what in Input:
            if state not in FINAL:
                assert (state, what) in TRANSITIONS, (state, what)
    assert all(key[0] not in FINAL for key in TRANSITIONS)


STIMULI = [
    "welcome",
    "not-welcomed",
    "taken-over",
    "refused",
    "reconnected",
    "auth-failed",
    "close",
    "closing-pong",
    "heartbeat",
    "silence",
    "publish",
]


def stimulate(link: Link, what: str) -> list[Any]:
    """Apply one input; the events it caused."""
    session = link.session
    frames = {
        "welcome": welcome(resumed=True),
        "not-welcomed": error(Code.NOT_WELCOMED),
        "taken-over": error(Code.SESSION_TAKEN_OVER),
        "refused": error(Code.MANIFEST_MISSING),
        "closing-pong": Pong(CLOSING_ECHO).frames(),
    }.get(what)
    if frames is not None:
        return link.give(frames)
    if what == "reconnected":
        session.connection_made(link.now)
    elif what == "auth-failed":
        session.auth_failed(AuthenticationError("no", 200))
    elif what == "close":
        session.close(link.now, 1.0)
    elif what == "heartbeat":
        link.now += HEARTBEAT_S
    elif what == "silence":
        link.now += TIMEOUT_S + 1
    else:
        link.publish(int(link.now))
    return link.events()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(STIMULI), max_size=25))
def test_any_sequence_of_inputs_keeps_the_lifecycle_sound(stimuli: list[str]) -> None:
    """Driven the real session through any inputs: it ends at most once, a final state
    never changes, a failed session sends nothing, a closed one at most its BYE."""
    link = Link()
    ends: list[Any] = []
    final: State | None = None
    for what in stimuli:
        events = stimulate(link, what)
        sent = link.sent()
        events += link.events()
        ends += [e for e in events if isinstance(e, Failed | Closed)]
        state = link.session.state
        if final is not None:
            assert state is final
            assert sent in ([], [Bye()]) if final is State.CLOSED else sent == []
        elif state in FINAL:
            final = state
        assert len(ends) <= 1, ends
        assert (final is State.FAILED) == any(isinstance(e, Failed) for e in ends)


# -- property: no unconfirmed publish lost or duplicated -------------------------------------

Op = tuple[str, int]
OPS = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 5)),
    st.tuples(st.just("send"), st.just(0)),
    st.tuples(st.just("confirm"), st.integers(0, 10_000)),
    st.tuples(st.just("refuse"), st.integers(0, 10_000)),
    st.tuples(st.just("reconnect"), st.just(0)),
    st.tuples(st.just("forgotten"), st.just(0)),
    st.tuples(st.just("welcome"), st.just(0)),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(OPS, max_size=40))
@example(  # a late CONFIRM of an earlier session's send, after the resend was queued
    [("publish", 2), ("send", 0), ("reconnect", 0), ("welcome", 0), ("confirm", 0), ("send", 0)]
)
def test_confirms_and_reconnects_never_lose_or_duplicate_an_unconfirmed_publish(
    ops: list[Op],
) -> None:
    link = Link().welcomed()
    published: list[bytes] = []  # every publish, in order
    expected: list[bytes] = []  # the model: unconfirmed publishes, in publish order
    sent_this_epoch: list[bytes] = []  # publishes sent since the last WELCOME
    sent_ever: list[bytes] = []  # the broker may confirm a send of an earlier session late
    counter = 0

    def send() -> None:
        ids = published_ids(link.sent())
        for msg_id in ids:
            assert msg_id in expected, "a confirmed or refused publish went out again"
            assert msg_id not in sent_this_epoch, "sent twice on one session"
        sent_this_epoch.extend(ids)
        sent_ever.extend(ids)
        went = set(sent_this_epoch)
        assert sent_this_epoch == [i for i in published if i in went], "out of order"

    for kind, arg in ops:
        link.events()
        if kind == "publish":
            for _ in range(arg):
                counter += 1
                published.append(link.publish(counter))
                expected.append(published[-1])
        elif kind == "send":
            send()
        elif kind in ("confirm", "refuse") and sent_ever:
            msg_id = sent_ever[arg % len(sent_ever)]
            if kind == "confirm":
                link.give(Confirm((msg_id,)).frames())
            else:
                link.give(error(Code.PUBLISH_DENIED, id=msg_id, topic="market.x"))
            if msg_id in expected:
                expected.remove(msg_id)
        elif kind == "reconnect":
            link.session.connection_made(link.now)
            link.sent()
        elif kind == "forgotten":
            link.give(error(Code.NOT_WELCOMED))
            link.sent()
        elif kind == "welcome" and link.state() is State.CONNECTING:
            link.give(welcome(resumed=True))
            sent_this_epoch = []
        assert link.session.unconfirmed == len(expected)
    if link.state() is State.CONNECTING:
        link.sent()
        link.give(welcome(resumed=True))
        sent_this_epoch = []
    send()
    went = set(sent_this_epoch)
    assert [i for i in published if i in went and i in expected] == expected, (
        "an unconfirmed publish was not sent on the current session"
    )


def test_a_late_confirm_after_a_reconnect_stops_the_resend() -> None:
    link = Link().welcomed()
    link.publish(1)
    link.publish(2)
    link.sent()
    link.session.connection_made(link.now)
    link.sent()
    link.give(welcome(resumed=True))
    link.give(Confirm((mid(1),)).frames())  # the broker confirms the first send late
    assert published_ids(link.sent()) == [mid(2)]
