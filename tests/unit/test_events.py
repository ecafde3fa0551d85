"""The broker's event stream v2: typed records, their encoding, and the EventLog that
numbers, batches and retains them for several consumers."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import event_records as R
from broker.codec import encode_sids
from broker.errors import Code, ProtocolViolation
from broker.events import EventLog, Skip, StreamLimits

# -- helpers ------------------------------------------------------------------------------

SAMPLES: dict[int, R.EventRecord] = {
    r.KIND: r
    for r in (
        R.Published(
            "pub",
            "main",
            "market.AAPL",
            b"\x01" * 16,
            "cid-1",
            "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
            False,
            b"\x81\xa1k\x01",
            b"payload",
            [["sub", "s1", encode_sids((1, 2))]],
        ),
        R.Subscribed("sub", "s1", 3, "market.>", True, False),
        R.Unsubscribed("sub", "s1", 3, True, "unsubscribe"),
        R.Acked("sub", "s1", [5, 6], [b"\x02" * 16]),
        R.DeadLettered(
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
        R.DlqReplayed(7, "sub", "s1", 12, encode_sids((1,)), "$cli"),
        R.DlqPurged([1, 2, 3], "$cli"),
        R.Routed(b"\x01" * 16, "pub", "market.AAPL", [["sub", "s1"]]),
        R.DeliveryAttempted("sub", "s1", [[b"\x01" * 16, 1, 99]]),
        R.Nacked("sub", "s1", b"\x01" * 16, 1, "no", True),
        R.RetryScheduled("sub", "s1", b"\x01" * 16, 2, 200, "nacked"),
        R.SessionChanged("sub", "s1", "opened", "python"),
        R.AuthFailed("intruder", "", "CURVE", "bad credential", "unknown-key", "", 0),
        R.Denied("app", "main", "publish", "$sys.x", 302, "reserved", "cid"),
        R.Lifecycle("ticker", "launch", {"app": "ticker", "pid": 42}),
        R.ConsumerSkipped("$audit", 1, 9, "behind the retention bound"),
    )
}


def pack(value: Any) -> bytes:
    raw: bytes = msgpack.packb(value, use_bin_type=True)
    return raw


def acked(seq: int) -> R.Acked:
    return R.Acked("app", "s", [seq], [])


def ack_event(seq: int, ts: int = 1) -> bytes:
    return R.encode_event(seq, ts, acked(seq))


def fill(log: EventLog, count: int) -> list[bytes]:
    """Append `count` Acked events of growing size; returns their encodings."""
    encoded = []
    for _ in range(count):
        seq = log.last_seq + 1
        record = R.Acked("app", "s", list(range(seq % 7)), [])
        assert log.append(seq * 100, record) == seq
        encoded.append(R.encode_event(seq, seq * 100, record))
    return encoded


def frames_events(frames: list[bytes] | None) -> tuple[int, int, list[R.Event]]:
    assert frames is not None
    assert len(frames) == 3
    assert frames[0] == R.EV
    epoch, first = R.decode_head(frames[1])
    return epoch, first, R.decode_events(frames[2])


def log_for(*consumers: str, confirm_by: str | None = None, **limits: int) -> EventLog:
    return EventLog(
        epoch=3,
        consumers=consumers,
        confirm_by=confirm_by,
        limits=StreamLimits(**limits) if limits else None,
    )


# -- records ------------------------------------------------------------------------------


def test_samples_cover_every_kind() -> None:
    assert set(SAMPLES) == set(R.RECORDS)


@pytest.mark.parametrize("kind", sorted(R.RECORDS))
def test_round_trip_of_each_kind(kind: int) -> None:
    record = SAMPLES[kind]
    (event,) = R.decode_events(R.encode_event(42, 1_700_000_000_000_000_000, record))
    assert (event.seq, event.ts_ns, event.record) == (42, 1_700_000_000_000_000_000, record)
    assert event.kind == kind


@pytest.mark.parametrize("kind", sorted(R.RECORDS))
def test_fast_encoder_matches_the_record_encoder(kind: int) -> None:
    record = SAMPLES[kind]
    fields = tuple(R.values(record))
    assert R.encode_fields(5, kind, 9, fields) == R.encode_event(5, 9, record)


def test_batch_of_every_kind_decodes_in_order() -> None:
    blob = b"".join(
        R.encode_event(seq, seq * 10, SAMPLES[kind])
        for seq, kind in enumerate(sorted(R.RECORDS), start=1)
    )
    decoded = R.decode_events(blob)
    assert [(e.seq, e.kind, e.ts_ns) for e in decoded] == [
        (seq, kind, seq * 10) for seq, kind in enumerate(sorted(R.RECORDS), start=1)
    ]
    assert R.decode_events(b"") == []


@given(epoch=st.integers(0, 2**64 - 1), first=st.integers(0, 2**64 - 1))
def test_batch_head_round_trip(epoch: int, first: int) -> None:
    head = R.batch_head(epoch, first)
    assert len(head) == R.HEAD_BYTES == 18
    assert R.decode_head(head) == (epoch, first)


@pytest.mark.parametrize("size", [0, 1, 8, 16, 17, 19, 32])
def test_decode_head_rejects_wrong_length(size: int) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        R.decode_head(b"\0" * size)
    assert caught.value.code == Code.MALFORMED_FRAME


def test_decode_head_rejects_another_schema_version() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        R.decode_head(b"\x00\x01" + b"\0" * 16)
    assert caught.value.code == Code.UNSUPPORTED_VERSION


@pytest.mark.parametrize("kind", sorted(R.RECORDS))
def test_wrong_field_count_or_type_is_a_protocol_violation(kind: int) -> None:
    values = R.values(SAMPLES[kind])
    for bad in (values[:-1], [*values, "extra"], [object_of_wrong_type(v) for v in values]):
        with pytest.raises(ProtocolViolation) as caught:
            R.decode_events(pack([1, kind, 5, *bad]))
        assert caught.value.code == Code.MALFORMED_FRAME


def object_of_wrong_type(value: Any) -> Any:
    return 1.5 if not isinstance(value, float) else "x"


@pytest.mark.parametrize(
    "blob",
    [
        pack({"seq": 1}),
        pack(5),
        pack([]),
        pack([1, R.Acked.KIND]),
        pack(["1", R.Acked.KIND, 5, "a", "s", [], []]),
        pack([True, R.Acked.KIND, 5, "a", "s", [], []]),
        pack([1, R.Acked.KIND, "5", "a", "s", [], []]),
        pack([1, 0, 5]),
        pack([1, 99, 5, "a"]),
        pack([1, [4], 5, "a", "s", [], []]),
        b"\xc1",
        b"\x93\x01\x04\xa2\xff\xfe",
        ack_event(1) + b"\xc1",
        ack_event(1) + pack(7),
        ack_event(1)[:-1],
    ],
)
def test_malformed_batches_raise_protocol_violation(blob: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        R.decode_events(blob)
    assert caught.value.code == Code.MALFORMED_FRAME


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_violation_only(blob: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        R.decode_events(blob)


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
            R.encode_event(seq, seq, SAMPLES[kind])
            for seq, kind in enumerate(sorted(R.RECORDS), start=1)
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
    try:
        for event in R.decode_events(bytes(blob)):
            assert type(event.record) is R.RECORDS[event.kind]
    except ProtocolViolation:
        pass


# -- EventLog: numbering and batches ------------------------------------------------------


def test_append_numbers_contiguously_and_batches_what_was_appended() -> None:
    log = log_for("$audit")
    assert log.take_batch() is None
    fill(log, 3)
    epoch, first, events = frames_events(log.take_batch())
    assert (epoch, first) == (3, 1)
    assert [e.seq for e in events] == [1, 2, 3]
    assert [e.ts_ns for e in events] == [100, 200, 300]
    assert log.take_batch() is None
    fill(log, 2)
    _, first, events = frames_events(log.take_batch())
    assert first == 4
    assert [e.seq for e in events] == [4, 5]


def test_batch_due_by_age_on_the_callers_clock_or_by_count() -> None:
    log = log_for("$audit")
    assert not log.batch_due(1_000, 2_000, 3)
    fill(log, 1)
    assert not log.batch_due(10_000, 2_000, 3)  # first seen now
    assert not log.batch_due(11_999, 2_000, 3)
    assert log.batch_due(12_000, 2_000, 3)
    log.take_batch()
    fill(log, 3)
    assert log.batch_due(50_000, 2_000, 3)


def test_without_consumers_events_are_numbered_never_encoded() -> None:
    log = EventLog(epoch=1)
    assert not log.active
    assert [log.append(1, acked(0)) for _ in range(3)] == [1, 2, 3]
    assert log.take_batch() is None
    assert (log.backlog_bytes, log.retained) == (0, 0)
    assert log.since(1) is None
    assert not log.full
    assert not log.confirm_later(3, b"p", b"x")  # nothing stores: confirm at once


def test_a_consumer_registering_later_gets_everything_after_its_evsync() -> None:
    log = EventLog(epoch=1)
    fill(log, 5)
    assert log.register("$audit", 0) == 6
    assert log.cursors["$audit"] == 5
    fill(log, 2)
    _, first, events = frames_events(log.take_batch())
    assert (first, [e.seq for e in events]) == (6, [6, 7])
    assert log.since(5) is None
    assert [e.seq for e in frames_events(log.since(6))[2]] == [6, 7]


def test_waiting_holds_events_unnumbered_until_resume_after_the_watermark() -> None:
    log = EventLog(epoch=1, confirm_by="$persistence", waiting=True)
    assert log.append(1, acked(0)) == 0
    assert log.take_batch() is None
    log.start_after(41)
    log.resume()
    _, first, events = frames_events(log.take_batch())
    assert (first, [e.seq for e in events]) == (42, [42])
    assert log.append(2, acked(0)) == 43


def test_start_after_continues_numbering() -> None:
    log = log_for(confirm_by="$persistence")
    log.start_after(41)
    assert (log.last_seq, log.watermark) == (41, 41)
    log.start_after(7)  # never goes back
    assert (log.last_seq, log.watermark) == (41, 41)
    assert log.append(1, acked(0)) == 42
    _, first, events = frames_events(log.take_batch())
    assert (first, [e.seq for e in events]) == (42, [42])
    assert log.since(41) is None
    assert [e.seq for e in frames_events(log.since(42))[2]] == [42]
    assert not log.confirm_later(41, b"p", b"old")
    assert log.confirm_later(42, b"p", b"new")
    assert log.acknowledge("$persistence", 42) == {b"p": [b"new"]}


# -- EventLog: retention ------------------------------------------------------------------


def test_retention_is_dropped_exactly_up_to_the_watermark() -> None:
    log = log_for("$persistence")
    encoded = fill(log, 10)
    log.take_batch()
    assert log.backlog_bytes == sum(map(len, encoded))
    assert log.acknowledge("$persistence", 4) == {}
    assert log.cursors["$persistence"] == 4
    assert log.backlog_bytes == sum(map(len, encoded[4:]))
    assert log.since(4) is None
    assert log.since(1) is None
    _, first, events = frames_events(log.since(5))
    assert (first, [e.seq for e in events]) == (5, list(range(5, 11)))
    assert log.acknowledge("$persistence", 3) == {}  # an older watermark changes nothing
    assert log.cursors["$persistence"] == 4
    log.acknowledge("$persistence", 10)
    assert log.backlog_bytes == 0
    assert log.since(10) is None


def test_events_are_kept_until_every_consumer_passed_them() -> None:
    log = log_for("$persistence", "$audit")
    encoded = fill(log, 6)
    log.acknowledge("$persistence", 6)
    assert log.backlog_bytes == sum(map(len, encoded))  # audit has not taken any
    log.acknowledge("$audit", 2)
    assert log.oldest_available() == 3
    assert log.backlog_bytes == sum(map(len, encoded[2:]))
    log.acknowledge("$audit", 6)
    assert log.backlog_bytes == 0


def test_since_returns_exactly_the_retained_tail_from_any_point() -> None:
    log = log_for("$persistence")
    encoded = fill(log, 12)
    log.acknowledge("$persistence", 5)
    for first in range(6, 13):
        frames = log.since(first)
        assert frames is not None
        assert frames[2] == b"".join(encoded[first - 1 :])
        assert frames_events(frames)[1] == first
    for first in range(0, 6):
        assert log.since(first) is None


def test_since_past_the_end_is_an_empty_batch() -> None:
    log = log_for("$persistence")
    fill(log, 2)
    assert frames_events(log.since(3)) == (3, 3, [])
    assert frames_events(log.since(100))[1:] == (100, [])


def test_since_is_bounded_by_max_bytes_but_sends_at_least_one_event() -> None:
    log = log_for("$persistence")
    encoded = fill(log, 10)
    assert [e.seq for e in frames_events(log.since(1, max_bytes=1))[2]] == [1]
    limit = sum(map(len, encoded[2:5]))
    assert [e.seq for e in frames_events(log.since(3, max_bytes=limit))[2]] == [3, 4, 5]
    assert [e.seq for e in frames_events(log.since(3, max_bytes=limit + 1))[2]] == [3, 4, 5, 6]


def test_acknowledge_beyond_the_last_seq_is_clamped() -> None:
    log = log_for("$persistence")
    fill(log, 3)
    log.acknowledge("$persistence", 50)
    assert log.cursors["$persistence"] == 3
    assert log.backlog_bytes == 0
    assert log.append(1, acked(0)) == 4
    assert [e.seq for e in frames_events(log.since(4))[2]] == [4]


def test_a_laggard_is_skipped_past_the_bound_and_the_range_reported() -> None:
    log = log_for("$persistence", "$audit", confirm_by="$persistence", max_events=8)
    fill(log, 8)
    log.acknowledge("$persistence", 8)
    assert log.trim() == []  # at the bound, not beyond
    fill(log, 1)
    log.acknowledge("$persistence", 9)
    [skip] = log.trim()
    assert skip == Skip("$audit", 1, 3)  # dropped down to 3/4 of the bound: 6 kept
    assert log.cursors["$audit"] == 3
    assert log.oldest_available() == 4
    assert log.since(2) is None
    assert [e.seq for e in frames_events(log.since(4))[2]] == list(range(4, 10))


def test_the_confirming_consumer_is_never_skipped_it_pushes_back() -> None:
    log = log_for("$audit", confirm_by="$persistence", max_events=4, backpressure_bytes=200)
    encoded: list[bytes] = []
    while sum(map(len, encoded)) < 200:
        assert not log.full
        encoded += fill(log, 1)
    assert log.full
    log.acknowledge("$audit", log.last_seq)
    assert log.trim() == []  # persistence holds everything it has not stored
    assert log.oldest_available() == 1
    log.acknowledge("$persistence", log.last_seq - 1)
    assert log.backlog_bytes == len(encoded[-1])
    assert not log.full


def test_confirms_are_released_by_the_confirming_consumer_only_in_order_and_once() -> None:
    log = log_for("$audit", confirm_by="$persistence")
    fill(log, 6)
    for seq, peer, msg_id in [
        (1, b"p1", b"a"),
        (2, b"p2", b"b"),
        (3, b"p1", b"c"),
        (5, b"p1", b"d"),
        (6, b"p2", b"e"),
    ]:
        assert log.confirm_later(seq, peer, msg_id)
    assert log.acknowledge("$audit", 6) == {}  # audit's watermark releases nothing
    assert log.confirms_waiting == 5
    assert log.acknowledge("$persistence", 3) == {b"p1": [b"a", b"c"], b"p2": [b"b"]}
    assert log.acknowledge("$persistence", 3) == {}
    assert log.acknowledge("$persistence", 4) == {}
    assert log.acknowledge("$persistence", 6) == {b"p1": [b"d"], b"p2": [b"e"]}
    assert log.confirms_waiting == 0


def test_a_confirm_is_released_once_its_own_seq_is_stored() -> None:
    log = log_for(confirm_by="$persistence")
    fill(log, 5)
    assert log.confirm_later(5, b"p1", b"new")
    assert log.confirm_later(2, b"p2", b"resent")  # a duplicate of the publish stored as 2
    assert log.acknowledge("$persistence", 3) == {b"p2": [b"resent"]}
    assert log.acknowledge("$persistence", 5) == {b"p1": [b"new"]}


def test_confirm_later_refuses_what_is_already_stored() -> None:
    log = log_for(confirm_by="$persistence")
    fill(log, 4)
    log.acknowledge("$persistence", 2)
    assert not log.confirm_later(1, b"p", b"x")
    assert not log.confirm_later(2, b"p", b"x")
    assert log.confirm_later(3, b"p", b"x")


@settings(max_examples=100)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 4)),
            st.tuples(st.sampled_from(["ack-a", "ack-b"]), st.integers(0, 40)),
        ),
        max_size=30,
    )
)
def test_since_matches_a_reference_model_with_two_consumers(ops: list[tuple[str, int]]) -> None:
    log = log_for("a", "b")
    encoded: list[bytes] = []
    marks = {"a": 0, "b": 0}
    for op, value in ops:
        if op == "append":
            encoded += fill(log, value)
        else:
            name = op[-1]
            marks[name] = max(marks[name], min(value, len(encoded)))
            log.acknowledge(name, value)
        watermark = min(marks.values())
        assert log.backlog_bytes == sum(map(len, encoded[watermark:]))
        for first in range(0, len(encoded) + 3):
            frames = log.since(first)
            if first > len(encoded):
                assert frames is not None and frames[2] == b""
            elif first <= watermark:
                assert frames is None
            else:
                assert frames is not None
                assert frames[2] == b"".join(encoded[first - 1 :])
        assert log.oldest_available() == watermark + 1


# -- a lossy stream and a consumer that fetches its gaps ------------------------------------


class Consumer:
    """The consumer side in miniature: take contiguous events after `received`, report
    the first missing seq on a gap (the real library is clients/stream.py)."""

    def __init__(self, received: int) -> None:
        self.received = received
        self.got: list[R.Event] = []

    def take(self, first: int, blob: bytes) -> int | None:
        if first > self.received + 1:
            return self.received + 1
        for event in R.decode_events(blob):
            if event.seq <= self.received:
                continue
            if event.seq != self.received + 1:
                return self.received + 1
            self.got.append(event)
            self.received = event.seq
        return None


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=15),
    fetch_limit=st.integers(1, 400),
    start=st.integers(0, 50),
    data=st.data(),
)
def test_every_event_once_in_order_despite_a_lossy_stream(
    sizes: list[int], fetch_limit: int, start: int, data: st.DataObject
) -> None:
    """Batches are dropped, duplicated and reordered; each gap is answered with
    `since(gap)` (bounded, so partial); the consumer acknowledges what it took, so the log
    drops it. At the end the consumer fetches until an empty re-send."""
    log = log_for(confirm_by="$persistence")
    log.start_after(start)
    originals: list[bytes] = []
    batches: list[tuple[int, bytes]] = []
    for size in sizes:
        originals += fill(log, size)
        frames = log.take_batch()
        assert frames is not None
        batches.append((R.decode_head(frames[1])[1], frames[2]))
    order = data.draw(st.lists(st.integers(0, len(batches) - 1), max_size=3 * len(batches)))
    consumer = Consumer(start)

    def refetch(first: int) -> int | None:
        frames = log.since(first, max_bytes=fetch_limit)
        assert frames is not None, f"seq {first} requested but no longer retained"
        return consumer.take(R.decode_head(frames[1])[1], frames[2])

    for index in order:
        gap = consumer.take(*batches[index])
        while gap is not None:
            gap = refetch(gap)
        log.acknowledge("$persistence", consumer.received)
    while True:
        before = consumer.received
        assert refetch(consumer.received + 1) is None
        log.acknowledge("$persistence", consumer.received)
        if consumer.received == before:
            break
    assert [e.seq for e in consumer.got] == list(range(start + 1, log.last_seq + 1))
    assert [R.encode_event(e.seq, e.ts_ns, e.record) for e in consumer.got] == originals
    assert log.backlog_bytes == 0


def test_a_batch_a_confirm_waits_for_goes_at_once_when_the_confirmer_is_idle() -> None:
    """The broker's half of group commit: no window for a lone confirmed publish; while
    the confirming consumer commits, what arrives waits for its EVACK, then goes at once."""
    log = log_for("$persistence", confirm_by="$persistence")
    fill(log, 1)
    assert not log.confirmer_idle()  # nobody waits for this event: the window applies
    assert log.confirm_later(1, b"p", b"m1")
    assert log.confirmer_idle()  # a confirm waits, nothing in flight: now, not in 2 ms
    _, first, _ = frames_events(log.take_batch())
    assert (first, log.sent_through) == (1, 1)
    fill(log, 2)  # events 2, 3 arrive while the consumer commits event 1
    assert log.confirm_later(3, b"p", b"m3")
    assert not log.confirmer_idle()  # they wait for the consumer, not for a timer
    assert log.acknowledge("$persistence", 1) == {b"p": [b"m1"]}
    assert log.confirmer_idle()  # its EVACK frees them: one batch for the next commit
    _, first, events = frames_events(log.take_batch())
    assert (first, [e.seq for e in events]) == (2, [2, 3])
    assert not log.confirmer_idle()  # nothing left unsent


def test_held_confirms_release_in_seq_order_whatever_order_they_came_in() -> None:
    log = log_for("$persistence", confirm_by="$persistence")
    fill(log, 6)
    for seq, msg in ((2, b"a"), (5, b"b"), (3, b"c"), (6, b"d"), (1, b"e")):
        assert log.confirm_later(seq, b"p", msg)  # a resend's confirm waits on an older seq
    assert log.acknowledge("$persistence", 3) == {b"p": [b"e", b"a", b"c"]}
    assert log.acknowledge("$persistence", 6) == {b"p": [b"b", b"d"]}
