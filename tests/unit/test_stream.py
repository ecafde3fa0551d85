"""clients.stream: the event feed's ordering and gap detection over v2 batches, and the
link's answers to what the broker says (no broker: the feed is pure, the link is driven
with wire records)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from broker import event_records as R
from broker import wire
from broker.errors import Code
from clients.stream import FETCH_RETRY_NS, HEARTBEAT_NS, BrokerLink, EventFeed
from security.credentials import Credential, ServerKeys


def record(n: int) -> R.EventRecord:
    return R.SessionChanged("app", f"s{n}", "opened", "hello")


def batch(first: int, count: int, epoch: int = 7) -> tuple[bytes, bytes]:
    blob = b"".join(R.encode_event(seq, seq, record(seq)) for seq in range(first, first + count))
    return R.batch_head(epoch, first), blob


def seqs(events: list[R.Event]) -> list[int]:
    return [e.seq for e in events]


def test_feed_takes_contiguous_batches_and_skips_duplicates() -> None:
    feed = EventFeed(received=0)
    assert seqs(feed.ingest(*batch(1, 3))) == [1, 2, 3]
    assert seqs(feed.ingest(*batch(2, 4))) == [4, 5]  # 2, 3 already taken
    assert seqs(feed.ingest(*batch(1, 5))) == []
    assert (feed.received, feed.gaps, feed.fetching_from) == (5, 0, 0)


def test_feed_starts_after_its_watermark() -> None:
    feed = EventFeed(received=10)
    assert seqs(feed.ingest(*batch(9, 4))) == [11, 12]


def test_a_gap_before_a_batch_takes_nothing_and_starts_one_fetch() -> None:
    feed = EventFeed(received=3)
    assert feed.ingest(*batch(6, 2)) == []
    assert (feed.fetching_from, feed.gaps) == (4, 1)
    assert feed.ingest(*batch(8, 1)) == []
    assert feed.fetching_from == 4  # one fetch in flight, not one per batch
    assert seqs(feed.ingest(*batch(4, 5))) == [4, 5, 6, 7, 8]
    assert feed.fetching_from == 0  # filled


def test_a_gap_inside_a_batch_keeps_the_contiguous_part() -> None:
    feed = EventFeed(received=0)
    head, blob = batch(1, 2)
    blob += R.encode_event(5, 5, record(5))
    assert seqs(feed.ingest(head, blob)) == [1, 2]
    assert feed.fetching_from == 3


def test_a_malformed_batch_or_an_old_schema_is_dropped_not_fatal() -> None:
    feed = EventFeed(received=0)
    assert feed.ingest(b"\0" * 16, b"") == []  # a v1 head (16 bytes)
    head, _ = batch(1, 1)
    assert feed.ingest(head, b"\xc1garbage") == []
    assert (feed.malformed, feed.received) == (2, 0)


def test_continue_after_moves_the_feed_either_way() -> None:
    feed = EventFeed(received=3, fetching_from=4)
    feed.continue_after(9)  # events that will never come
    assert (feed.received, feed.fetching_from) == (9, 0)
    feed.continue_after(6)  # a restored broker numbers after the store's watermark
    assert feed.received == 6
    assert seqs(feed.ingest(*batch(7, 2))) == [7, 8]


@given(
    order=st.permutations(list(range(6))),
    start=st.integers(0, 5),
)
def test_any_arrival_order_with_refetch_yields_every_event_once_in_order(
    order: list[int], start: int
) -> None:
    batches = [batch(1 + 5 * k, 5) for k in range(6)]  # seqs 1..30
    feed = EventFeed(received=start)
    got: list[int] = []
    for index in order:
        got += seqs(feed.ingest(*batches[index]))
        while feed.fetching_from:  # the broker re-sends from the gap
            first = feed.fetching_from
            got += seqs(feed.ingest(*batch(first, 31 - first)))
    assert got == list(range(start + 1, 31))


# -- the link, driven with wire records -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 10 * HEARTBEAT_NS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def pair() -> Iterator[tuple[BrokerLink, zmq.Socket[bytes], Clock]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
    keys = ServerKeys.generate()
    keys.serve(router)  # no ZAP handler in this context: every CURVE peer passes
    router.bind("inproc://broker")
    clock = Clock()
    token = Credential.mint(keys.public, keys.public).token
    link = BrokerLink(context, "inproc://broker", "$audit", token, "events", clock)
    yield link, router, clock
    link.close()
    router.close(linger=0)
    context.term()


def received(router: zmq.Socket[bytes]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    while router.poll(200):
        out.append(router.recv_multipart()[1:])
    return out


def test_link_says_hello_once_a_second_until_welcomed(
    pair: tuple[BrokerLink, zmq.Socket[bytes], Clock],
) -> None:
    link, router, clock = pair
    feed = EventFeed(0)
    link.tick(feed, 0)
    link.tick(feed, 0)
    (hello,) = received(router)
    assert wire.Hello.decode(hello).session == "events"
    clock.now += HEARTBEAT_NS
    link.tick(feed, 0)
    assert len(received(router)) == 1


def test_link_heartbeat_acks_and_asks_for_anything_newer(
    pair: tuple[BrokerLink, zmq.Socket[bytes], Clock],
) -> None:
    link, router, clock = pair
    feed = EventFeed(4)
    link.hello()
    link.welcome()
    link.synced_ok(wire.EvSyncOk(5, 1), feed)
    received(router)
    clock.now += HEARTBEAT_NS
    link.tick(feed, 4)
    ack, fetch = received(router)
    assert wire.EvAck.decode(ack) == wire.EvAck(4)
    assert wire.EvFetch.decode(fetch) == wire.EvFetch(5)


def test_syncok_behind_the_broker_fetches_unless_a_restore_sets_the_numbering(
    pair: tuple[BrokerLink, zmq.Socket[bytes], Clock],
) -> None:
    link, router, clock = pair
    feed = EventFeed(4)
    link.hello()
    link.welcome()
    received(router)
    link.synced_ok(wire.EvSyncOk(next=9, epoch=2, restore=True), feed)
    assert (link.synced, link.epoch, feed.fetching_from) == (True, 2, 0)
    link.synced_ok(wire.EvSyncOk(next=9, epoch=2), feed)
    assert feed.fetching_from == 5
    link.tick(feed, 4)
    (fetch,) = received(router)
    assert wire.EvFetch.decode(fetch) == wire.EvFetch(5)
    link.tick(feed, 4)  # not again before the retry interval
    assert received(router) == []
    clock.now += FETCH_RETRY_NS + 1
    link.tick(feed, 4)
    assert [wire.EvFetch.decode(f) for f in received(router)] == [wire.EvFetch(5)]


def test_evdata_keeps_fetching_until_the_broker_has_nothing_more(
    pair: tuple[BrokerLink, zmq.Socket[bytes], Clock],
) -> None:
    link, router, _ = pair
    feed = EventFeed(0, fetching_from=1)
    head, blob = batch(1, 3)
    assert seqs(link.data(wire.EvData(head, blob), feed)) == [1, 2, 3]
    assert [wire.EvFetch.decode(f) for f in received(router)] == [wire.EvFetch(4)]
    assert link.data(wire.EvData(R.batch_head(7, 4), b""), feed) == []
    assert feed.fetching_from == 0
    assert received(router) == []


def test_errors_resume_after_lost_events_or_restart_the_handshake(
    pair: tuple[BrokerLink, zmq.Socket[bytes], Clock],
) -> None:
    link, _, _ = pair
    feed = EventFeed(3, fetching_from=4)
    lost = wire.Error.for_code(Code.STORAGE_UNAVAILABLE, "not retained", resume_from=10)
    assert link.error(wire.Error.decode(lost.frames()), feed) is False
    assert (feed.received, feed.fetching_from) == (9, 0)
    link.welcome()
    forgot = wire.Error.for_code(Code.NOT_WELCOMED, "send HELLO first")
    assert link.error(forgot, feed) is True
    assert (link.welcomed, link.synced) == (False, False)
    other = wire.Error.for_code(Code.INTERNAL, "oops")
    assert link.error(other, feed) is False
