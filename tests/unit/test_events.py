"""The broker's event stream: encoding, the EventLog that retains it, and the EventFeed
that turns batches (with drops, duplicates and reorderings) back into one ordered run."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persistence.link import EventFeed

from broker import events as E
from broker.codec import encode_sids
from broker.errors import Code, ProtocolViolation

# -- helpers ------------------------------------------------------------------------------

SAMPLES: dict[int, tuple[Any, ...]] = {
    E.MSG: (
        "pub",
        "market.AAPL",
        b"\x01" * 16,
        False,
        b"\x81\xa1k\x01",
        b"payload",
        [["sub", "s1", encode_sids((1, 2))]],
    ),
    E.SUB: ("sub", "s1", 3, "market.>", True),
    E.UNSUB: ("sub", "s1", 3),
    E.ACK: ("sub", "s1", [5, 6]),
    E.DEAD: (
        7,
        "sub",
        "s1",
        "nacked",
        4,
        "boom",
        12,
        "pub",
        123,
        "market.AAPL",
        b"id",
        True,
        b"h",
        b"p",
        encode_sids((1,)),
    ),
    E.DLQ_REPLAY: (7, "sub", "s1", 12, encode_sids((1,))),
    E.DLQ_PURGE: ([1, 2, 3],),
}


def pack(value: Any) -> bytes:
    raw: bytes = msgpack.packb(value, use_bin_type=True)
    return raw


def decode_all(blob: bytes) -> list[E.Event]:
    return list(E.decode_events(blob))


def ack_event(seq: int, ts: int = 1) -> bytes:
    return E.encode_event(seq, E.ACK, ts, "app", "s", [seq])


msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_values = st.recursive(
    msgpack_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8
)

# -- encoding -----------------------------------------------------------------------------


def test_sample_table_covers_every_kind() -> None:
    assert set(SAMPLES) == set(E.FIELDS)
    for kind, fields in SAMPLES.items():
        assert len(fields) == len(E.FIELDS[kind])


@pytest.mark.parametrize("kind", sorted(E.FIELDS))
def test_round_trip_of_each_kind_with_named_fields(kind: int) -> None:
    fields = SAMPLES[kind]
    blob = E.encode_event(42, kind, 1_700_000_000_000_000_000, *fields)
    (event,) = decode_all(blob)
    assert (event.seq, event.kind, event.ts_ns) == (42, kind, 1_700_000_000_000_000_000)
    assert event.fields == fields
    for name, value in zip(E.FIELDS[kind], fields, strict=True):
        assert event.get(name) == value


@settings(max_examples=60)
@given(
    kind=st.sampled_from(sorted(E.FIELDS)),
    seq=st.integers(0, 2**64 - 1),
    ts=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_round_trip_of_any_msgpack_fields(
    kind: int, seq: int, ts: int, data: st.DataObject
) -> None:
    fields = tuple(data.draw(msgpack_values) for _ in E.FIELDS[kind])
    (event,) = decode_all(E.encode_event(seq, kind, ts, *fields))
    assert event == E.Event(seq, kind, ts, fields)


def test_batch_of_every_kind_decodes_in_order() -> None:
    kinds = sorted(E.FIELDS)
    blob = b"".join(
        E.encode_event(seq, kind, seq * 10, *SAMPLES[kind])
        for seq, kind in enumerate(kinds, start=1)
    )
    decoded = decode_all(blob)
    assert [(e.seq, e.kind, e.ts_ns) for e in decoded] == [
        (seq, kind, seq * 10) for seq, kind in enumerate(kinds, start=1)
    ]
    assert decode_all(b"") == []


@given(epoch=st.integers(0, 2**64 - 1), first=st.integers(0, 2**64 - 1))
def test_batch_head_round_trip(epoch: int, first: int) -> None:
    head = E.batch_head(epoch, first)
    assert len(head) == 16
    assert E.decode_head(head) == (epoch, first)


@pytest.mark.parametrize("size", [0, 1, 8, 15, 17, 32])
def test_decode_head_rejects_wrong_length(size: int) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        E.decode_head(b"\0" * size)
    assert caught.value.code == Code.MALFORMED_FRAME


def _wrong_field_counts() -> list[tuple[int, tuple[Any, ...]]]:
    cases: list[tuple[int, tuple[Any, ...]]] = []
    for kind, fields in SAMPLES.items():
        cases.append((kind, fields[:-1]))
        cases.append((kind, (*fields, "extra")))
    return cases


@pytest.mark.parametrize(("kind", "fields"), _wrong_field_counts())
def test_wrong_field_count_is_a_protocol_violation(kind: int, fields: tuple[Any, ...]) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        decode_all(E.encode_event(1, kind, 5, *fields))
    assert caught.value.code == Code.MALFORMED_FRAME


@pytest.mark.parametrize(
    "blob",
    [
        pack({"seq": 1}),  # not an array
        pack(5),
        pack("event"),
        pack([]),
        pack([1, E.ACK]),  # fewer than [seq, kind, ts]
        pack(["1", E.ACK, 5, "a", "s", []]),  # seq not an int
        pack([True, E.ACK, 5, "a", "s", []]),  # seq a bool
        pack([1.0, E.ACK, 5, "a", "s", []]),  # seq a float
        pack([1, E.ACK, "5", "a", "s", []]),  # ts not an int
        pack([1, E.ACK, 5.0, "a", "s", []]),  # ts a float
        pack([1, E.ACK, None, "a", "s", []]),
        pack([1, 0, 5]),  # unknown kinds
        pack([1, 99, 5, "a"]),
        pack([1, "ack", 5, "a", "s", []]),
        pack([1, [4], 5, "a", "s", []]),  # unhashable kind
        pack([1, E.DLQ_PURGE, 5, [1], "extra"]),
        b"\xc1",  # the byte msgpack never uses
        b"\x93\x01\x04\xa2\xff\xfe",  # invalid UTF-8 in a str
        ack_event(1) + b"\xc1",  # garbage after a valid event
        ack_event(1) + pack(7),  # a valid event, then a non-event
    ],
)
def test_malformed_batches_raise_protocol_violation(blob: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        decode_all(blob)
    assert caught.value.code == Code.MALFORMED_FRAME


def test_truncated_batch_is_a_protocol_violation() -> None:
    blob = ack_event(1) + ack_event(2) + E.encode_event(3, E.MSG, 9, *SAMPLES[E.MSG])
    for cut in (len(blob) - 1, len(blob) - 5, len(ack_event(1)) + 3):
        with pytest.raises(ProtocolViolation):
            decode_all(blob[:cut])


@pytest.mark.parametrize("kind", [True, 1.0])
def test_non_int_kind_is_a_protocol_violation(kind: object) -> None:
    with pytest.raises(ProtocolViolation):
        decode_all(pack([1, kind, 5, *SAMPLES[E.MSG]]))


def _only_protocol_violation(blob: bytes) -> None:
    try:
        decoded = decode_all(blob)
    except ProtocolViolation as exc:
        assert exc.code == Code.MALFORMED_FRAME
        return
    for event in decoded:
        assert type(event.seq) is int
        assert type(event.ts_ns) is int
        assert len(event.fields) == len(E.FIELDS[event.kind])


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_violation_only(blob: bytes) -> None:
    _only_protocol_violation(blob)


@settings(max_examples=300)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "insert", "delete"]), st.integers(0), st.integers(0, 255)
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_valid_batches_decode_or_raise_protocol_violation_only(
    edits: list[tuple[str, int, int]],
) -> None:
    blob = bytearray(
        b"".join(
            E.encode_event(seq, kind, seq, *SAMPLES[kind])
            for seq, kind in enumerate(sorted(E.FIELDS), start=1)
        )
    )
    for action, where, value in edits:
        if not blob:
            break
        index = where % len(blob)
        if action == "flip":
            blob[index] = value
        elif action == "insert":
            blob.insert(index, value)
        else:
            del blob[index]
    _only_protocol_violation(bytes(blob))


# -- EventLog -----------------------------------------------------------------------------


def fill(log: E.EventLog, count: int) -> list[bytes]:
    """Append `count` ACK events of growing size; returns their encodings."""
    encoded = []
    for _ in range(count):
        seq = log.last_seq + 1
        assert log.append(E.ACK, seq * 100, "app", "s", list(range(seq % 7))) == seq
        encoded.append(E.encode_event(seq, E.ACK, seq * 100, "app", "s", list(range(seq % 7))))
    return encoded


def frames_events(frames: list[bytes] | None) -> tuple[int, int, list[E.Event]]:
    assert frames is not None
    assert len(frames) == 3
    assert frames[0] == E.EV
    epoch, first = E.decode_head(frames[1])
    return epoch, first, decode_all(frames[2])


def test_append_numbers_contiguously_and_batches_what_was_appended() -> None:
    log = E.EventLog(epoch=9, retain=True)
    assert log.take_batch() is None
    fill(log, 3)
    epoch, first, events = frames_events(log.take_batch())
    assert (epoch, first) == (9, 1)
    assert [e.seq for e in events] == [1, 2, 3]
    assert [e.ts_ns for e in events] == [100, 200, 300]
    assert log.take_batch() is None
    fill(log, 2)
    _, first, events = frames_events(log.take_batch())
    assert first == 4
    assert [e.seq for e in events] == [4, 5]
    assert log.last_seq == 5


def test_retention_is_dropped_exactly_up_to_the_watermark() -> None:
    log = E.EventLog(epoch=1, retain=True)
    encoded = fill(log, 10)
    log.take_batch()
    assert log.backlog_bytes == sum(map(len, encoded))
    assert log.acknowledge(4) == {}
    assert log.watermark == 4
    assert log.backlog_bytes == sum(map(len, encoded[4:]))
    assert log.since(4) is None
    assert log.since(1) is None
    _, first, events = frames_events(log.since(5))
    assert first == 5
    assert [e.seq for e in events] == list(range(5, 11))
    # an older or equal watermark changes nothing
    assert log.acknowledge(3) == {}
    assert log.acknowledge(4) == {}
    assert log.watermark == 4
    assert log.backlog_bytes == sum(map(len, encoded[4:]))
    log.acknowledge(10)
    assert log.backlog_bytes == 0
    assert log.since(10) is None


def test_since_returns_exactly_the_retained_tail_from_any_point() -> None:
    log = E.EventLog(epoch=3, retain=True)
    encoded = fill(log, 12)
    log.acknowledge(5)
    for first in range(6, 13):
        frames = log.since(first)
        assert frames is not None
        assert frames[2] == b"".join(encoded[first - 1 :])
        _, head_first, events = frames_events(frames)
        assert head_first == first
        assert [e.seq for e in events] == list(range(first, 13))
    for first in range(0, 6):
        assert log.since(first) is None


def test_since_past_the_end_is_an_empty_batch() -> None:
    log = E.EventLog(epoch=3, retain=True)
    fill(log, 2)
    epoch, first, events = frames_events(log.since(3))
    assert (epoch, first, events) == (3, 3, [])
    assert frames_events(log.since(100))[1:] == (100, [])


def test_since_is_bounded_by_max_bytes_but_sends_at_least_one_event() -> None:
    log = E.EventLog(epoch=3, retain=True)
    encoded = fill(log, 10)
    _, _, events = frames_events(log.since(1, max_bytes=1))
    assert [e.seq for e in events] == [1]
    limit = sum(map(len, encoded[2:5]))
    _, _, events = frames_events(log.since(3, max_bytes=limit))
    assert [e.seq for e in events] == [3, 4, 5]
    _, _, events = frames_events(log.since(3, max_bytes=limit + 1))
    assert [e.seq for e in events] == [3, 4, 5, 6]


def test_acknowledge_beyond_the_last_seq_is_clamped() -> None:
    log = E.EventLog(epoch=1, retain=True)
    fill(log, 3)
    log.acknowledge(50)
    assert log.watermark == 3
    assert log.backlog_bytes == 0
    assert log.append(E.ACK, 1, "a", "s", []) == 4
    _, _, events = frames_events(log.since(4))
    assert [e.seq for e in events] == [4]


def test_confirms_are_released_in_order_and_only_once() -> None:
    log = E.EventLog(epoch=1, retain=True)
    fill(log, 6)
    for seq, peer, msg_id in [
        (1, b"p1", b"a"),
        (2, b"p2", b"b"),
        (3, b"p1", b"c"),
        (5, b"p1", b"d"),
        (6, b"p2", b"e"),
    ]:
        assert log.confirm_later(seq, peer, msg_id)
    assert log.confirms_waiting == 5
    assert log.acknowledge(3) == {b"p1": [b"a", b"c"], b"p2": [b"b"]}
    assert log.confirms_waiting == 2
    assert log.acknowledge(3) == {}
    assert log.acknowledge(4) == {}
    assert log.acknowledge(6) == {b"p1": [b"d"], b"p2": [b"e"]}
    assert log.acknowledge(6) == {}
    assert log.confirms_waiting == 0


def test_a_confirm_is_released_once_its_own_seq_is_stored() -> None:
    log = E.EventLog(epoch=1, retain=True)
    fill(log, 5)
    assert log.confirm_later(5, b"p1", b"new")  # a fresh publish, seq 5
    assert log.confirm_later(2, b"p2", b"resent")  # a duplicate of the publish stored as 2
    assert log.acknowledge(3) == {b"p2": [b"resent"]}
    assert log.acknowledge(5) == {b"p1": [b"new"]}


def test_confirm_later_refuses_what_is_already_stored() -> None:
    log = E.EventLog(epoch=1, retain=True)
    fill(log, 4)
    log.acknowledge(2)
    assert not log.confirm_later(1, b"p", b"x")
    assert not log.confirm_later(2, b"p", b"x")
    assert log.confirm_later(3, b"p", b"x")
    assert log.confirms_waiting == 1


def test_without_retention_confirms_go_at_once() -> None:
    log = E.EventLog(epoch=1, retain=False)
    fill(log, 2)
    assert not log.confirm_later(2, b"p", b"x")
    assert log.confirms_waiting == 0


def test_full_when_retained_bytes_reach_the_max_and_not_after_acknowledge() -> None:
    log = E.EventLog(epoch=1, retain=True, max_retained_bytes=200)
    encoded: list[bytes] = []
    while sum(map(len, encoded)) < 200:
        assert not log.full
        encoded += fill(log, 1)
    assert log.backlog_bytes == sum(map(len, encoded)) >= 200
    assert log.full
    encoded += fill(log, 1)
    assert log.full
    log.acknowledge(log.last_seq - 1)
    assert log.backlog_bytes == len(encoded[-1])
    assert not log.full


def test_never_full_without_retention() -> None:
    log = E.EventLog(epoch=1, retain=False, max_retained_bytes=1, publish=True)
    fill(log, 20)
    assert not log.full
    assert log.backlog_bytes == 0
    assert log.since(1) is None
    _, first, events = frames_events(log.take_batch())
    assert first == 1
    assert len(events) == 20


def test_start_after_continues_numbering() -> None:
    log = E.EventLog(epoch=2, retain=True)
    log.start_after(41)
    assert (log.last_seq, log.watermark) == (41, 41)
    log.start_after(7)  # never goes back
    assert (log.last_seq, log.watermark) == (41, 41)
    assert log.append(E.ACK, 1, "a", "s", []) == 42
    _, first, events = frames_events(log.take_batch())
    assert first == 42
    assert [e.seq for e in events] == [42]
    assert log.since(41) is None
    assert [e.seq for e in frames_events(log.since(42))[2]] == [42]
    assert not log.confirm_later(41, b"p", b"old")
    assert log.confirm_later(42, b"p", b"new")
    assert log.acknowledge(42) == {b"p": [b"new"]}


def test_publish_false_numbers_but_encodes_nothing() -> None:
    log = E.EventLog(epoch=1, retain=False)
    assert not log.publish
    assert [log.append(E.ACK, 1, "a", "s", []) for _ in range(3)] == [1, 2, 3]
    assert log.take_batch() is None
    assert log.backlog_bytes == 0
    assert log.since(1) is None
    assert not log.full


@settings(max_examples=100)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 4)),
            st.tuples(st.just("ack"), st.integers(0, 40)),
        ),
        max_size=30,
    )
)
def test_since_matches_a_reference_model(ops: list[tuple[str, int]]) -> None:
    log = E.EventLog(epoch=5, retain=True)
    encoded: list[bytes] = []
    watermark = 0
    for op, value in ops:
        if op == "append":
            encoded += fill(log, value)
        else:
            watermark = max(watermark, min(value, len(encoded)))
            log.acknowledge(value)
        assert log.watermark == watermark
        assert log.backlog_bytes == sum(map(len, encoded[watermark:]))
        for first in range(0, len(encoded) + 3):
            frames = log.since(first)
            if first > len(encoded):
                assert frames is not None
                assert frames[2] == b""
            elif first <= watermark:
                assert frames is None
            else:
                assert frames is not None
                assert frames[2] == b"".join(encoded[first - 1 :])
        oldest = log.oldest_available()
        assert oldest == watermark + 1
        assert log.since(oldest) is not None
        assert log.since(oldest - 1) is None


# -- EventFeed ----------------------------------------------------------------------------


def test_feed_takes_contiguous_batches_and_skips_duplicates() -> None:
    feed = EventFeed(received=0)
    fresh, gap = feed.take(1, ack_event(1) + ack_event(2))
    assert ([e.seq for e in fresh], gap) == ([1, 2], None)
    fresh, gap = feed.take(1, ack_event(1) + ack_event(2))  # a re-sent duplicate
    assert (fresh, gap) == ([], None)
    fresh, gap = feed.take(2, ack_event(2) + ack_event(3) + ack_event(4))  # overlapping
    assert ([e.seq for e in fresh], gap) == ([3, 4], None)
    assert feed.received == 4
    assert feed.gaps == 0


def test_feed_starts_after_its_watermark() -> None:
    feed = EventFeed(received=10)
    fresh, gap = feed.take(9, ack_event(9) + ack_event(10) + ack_event(11))
    assert ([e.seq for e in fresh], gap) == ([11], None)


def test_feed_reports_a_gap_before_a_batch_and_takes_nothing() -> None:
    feed = EventFeed(received=3)
    fresh, gap = feed.take(6, ack_event(6) + ack_event(7))
    assert (fresh, gap) == ([], 4)
    assert feed.received == 3
    assert feed.gaps == 1
    fresh, gap = feed.take(4, ack_event(4) + ack_event(5) + ack_event(6))
    assert ([e.seq for e in fresh], gap) == ([4, 5, 6], None)


def test_feed_reports_a_gap_inside_a_batch_after_taking_the_contiguous_part() -> None:
    feed = EventFeed(received=0)
    fresh, gap = feed.take(1, ack_event(1) + ack_event(2) + ack_event(4) + ack_event(5))
    assert ([e.seq for e in fresh], gap) == ([1, 2], 3)
    assert feed.received == 2


def test_feed_empty_batch_is_neither_news_nor_a_gap() -> None:
    feed = EventFeed(received=5)
    assert feed.take(6, b"") == ([], None)
    assert feed.take(3, b"") == ([], None)
    assert feed.gaps == 0


def test_feed_clears_fetching_from_once_reached() -> None:
    feed = EventFeed(received=2)
    feed.fetching_from = 3
    feed.take(1, ack_event(1) + ack_event(2))
    assert feed.fetching_from == 3
    feed.take(3, ack_event(3) + ack_event(4))
    assert feed.fetching_from == 0


def test_feed_malformed_batch_raises_protocol_violation() -> None:
    feed = EventFeed(received=0)
    with pytest.raises(ProtocolViolation):
        feed.take(1, b"\xc1")
    assert feed.received == 0


def test_feed_malformed_tail_does_not_swallow_the_valid_head() -> None:
    feed = EventFeed(received=0)
    blob = ack_event(1) + ack_event(2) + pack([3, E.ACK, 9])  # event 3 lacks its fields
    with pytest.raises(ProtocolViolation):
        feed.take(1, blob)
    # Either the whole batch is refused (nothing marked received) ...
    assert feed.received == 0
    # ... so the well-formed events come back on the next (re-sent) batch.
    fresh, gap = feed.take(1, ack_event(1) + ack_event(2))
    assert ([e.seq for e in fresh], gap) == ([1, 2], None)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=15),
    fetch_limit=st.integers(1, 400),
    start=st.integers(0, 50),
    data=st.data(),
)
def test_feed_recovers_every_event_once_in_order_despite_a_lossy_stream(
    sizes: list[int], fetch_limit: int, start: int, data: st.DataObject
) -> None:
    """The broker's EventLog produces batches; the "network" drops, duplicates and reorders
    them; each gap the feed reports is answered with `since(gap)` (bounded by
    `fetch_limit` bytes, so a re-send may be partial); the consumer acknowledges what it
    took, so the log drops it. When the stream ends the consumer catches up by fetching
    from its position until an empty re-send says it is at the end."""
    log = E.EventLog(epoch=11, retain=True)
    log.start_after(start)
    originals: list[bytes] = []
    batches: list[tuple[int, bytes]] = []
    for size in sizes:
        originals += fill(log, size)
        frames = log.take_batch()
        assert frames is not None
        batches.append((E.decode_head(frames[1])[1], frames[2]))
    deliveries = data.draw(
        st.lists(st.integers(0, len(batches) - 1), max_size=3 * len(batches)), label="order"
    )

    feed = EventFeed(received=start)
    got: list[E.Event] = []

    def refetch(first: int) -> int | None:
        frames = log.since(first, max_bytes=fetch_limit)
        assert frames is not None, f"seq {first} requested but no longer retained"
        _, head_first, _ = frames_events(frames)
        assert head_first == first
        fresh, gap = feed.take(head_first, frames[2])
        got.extend(fresh)
        return gap

    def consume(first: int, blob: bytes) -> None:
        fresh, gap = feed.take(first, blob)
        got.extend(fresh)
        while gap is not None:
            gap = refetch(gap)
        log.acknowledge(feed.received)

    for index in deliveries:
        consume(*batches[index])
    while True:  # end of stream: fetch until the re-send comes back empty
        before = feed.received
        assert refetch(feed.received + 1) is None
        log.acknowledge(feed.received)
        if feed.received == before:
            break

    assert [e.seq for e in got] == list(range(start + 1, log.last_seq + 1))
    assert [E.encode_event(e.seq, e.kind, e.ts_ns, *e.fields) for e in got] == originals
    assert log.backlog_bytes == 0
