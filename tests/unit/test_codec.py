"""The wire codec: round trips, message ids, and hostile input that must only ever raise
ProtocolViolation."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.codec import (
    Envelope,
    MessageIdGenerator,
    PubHeader,
    Stamp,
    decode_envelope,
    decode_pub_header,
    decode_sids,
    decode_stamp,
    encode_pub_header,
    encode_sids,
    encode_stamp,
    new_message_id,
    pack,
    pub_fields,
    unpack_map,
)
from broker.errors import Code, ProtocolViolation
from broker.protocol import MAX_HEADER_BYTES, MAX_SID, MESSAGE_ID_BYTES

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

msg_ids = st.binary(min_size=MESSAGE_ID_BYTES, max_size=MESSAGE_ID_BYTES)
short_text = st.text(max_size=128)
traceparents = st.from_regex(r"\A[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.integers(0, 2**64 - 1)

# -- round trips ------------------------------------------------------------------------------


@given(
    msg_id=msg_ids,
    topic=st.text(max_size=255),
    cid=st.none() | short_text,
    tp=st.none() | traceparents,
    sensitive=st.booleans(),
    ts=st.none() | int64,
    confirm=st.booleans(),
)
def test_pub_header_round_trip(
    msg_id: bytes,
    topic: str,
    cid: str | None,
    tp: str | None,
    sensitive: bool,
    ts: int | None,
    confirm: bool,
) -> None:
    raw = encode_pub_header(msg_id, topic, cid, tp, sensitive, ts, confirm)
    assert decode_pub_header(raw) == PubHeader(
        msg_id, topic, confirm, sensitive=sensitive, correlation_id=cid or "", traceparent=tp or ""
    )
    fields = unpack_map(raw)
    assert fields["id"] == msg_id
    assert fields["topic"] == topic
    assert fields.get("cid") == cid
    assert fields.get("tp") == tp
    assert fields.get("sens", False) is sensitive
    assert fields.get("cf", False) is confirm
    if ts is not None:
        assert fields["ts"] == ts
    assert type(fields["ts"]) is int


@given(seq=uint64, sender=st.text(max_size=64), ts=int64, attempt=st.integers(1, 1000))
def test_stamp_round_trip(seq: int, sender: str, ts: int, attempt: int) -> None:
    assert decode_stamp(encode_stamp(seq, sender, ts, attempt)) == Stamp(seq, sender, ts, attempt)


def test_stamp_default_attempt_is_one() -> None:
    assert decode_stamp(encode_stamp(7, "app", 9)).attempt == 1


@given(st.lists(st.integers(1, MAX_SID), max_size=50).map(tuple))
def test_sids_round_trip(sids: tuple[int, ...]) -> None:
    assert decode_sids(encode_sids(sids)) == list(sids)


@given(
    msg_id=msg_ids,
    topic=st.text(min_size=1, max_size=64),
    cid=st.none() | short_text,
    tp=st.none() | traceparents,
    sensitive=st.booleans(),
    seq=uint64,
    sender=st.text(max_size=64),
    ts=int64,
    attempt=st.integers(1, 10),
    payload=st.binary(max_size=64),
)
def test_envelope_round_trip(
    msg_id: bytes,
    topic: str,
    cid: str | None,
    tp: str | None,
    sensitive: bool,
    seq: int,
    sender: str,
    ts: int,
    attempt: int,
    payload: bytes,
) -> None:
    header = encode_pub_header(msg_id, topic, cid, tp, sensitive, 5)
    envelope = decode_envelope(encode_stamp(seq, sender, ts, attempt), header, payload)
    assert envelope == Envelope(
        msg_id=msg_id,
        topic=topic,
        sender=sender,
        timestamp_ns=ts,
        seq=seq,
        attempt=attempt,
        correlation_id=cid,
        traceparent=tp,
        sensitive=sensitive,
        payload=payload,
    )


def test_envelope_sender_comes_from_the_stamp() -> None:
    header = pack({"id": b"\x01" * 16, "topic": "a.b", "ts": 1, "sender": "forged"})
    envelope = decode_envelope(encode_stamp(1, "real", 2), header, b"p")
    assert envelope.sender == "real"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", b"\x00" * 15),
        ("id", b"\x00" * 17),
        ("id", "0123456789abcdef"),
        ("id", None),
        ("topic", None),
        ("topic", b"a.b"),
        ("topic", 5),
        ("cid", 5),
        ("cid", "x" * 129),
        ("tp", "not-a-traceparent"),
        ("tp", TRACEPARENT.upper()),
        ("tp", 1),
        ("sens", 1),
        ("sens", "yes"),
        ("ts", 1.5),
        ("ts", True),
        ("ts", "1"),
        ("cf", 1),
        ("cf", None),
    ],
)
def test_pub_header_bad_fields(field: str, value: Any) -> None:
    header: dict[str, Any] = {"id": b"\x01" * 16, "topic": "a.b", "ts": 1}
    header[field] = value
    with pytest.raises(ProtocolViolation) as info:
        decode_pub_header(pack(header))
    assert info.value.code == Code.BAD_HEADER


def test_pub_header_missing_fields() -> None:
    for header in ({"topic": "a"}, {"id": b"\x01" * 16}, {}):
        with pytest.raises(ProtocolViolation):
            decode_pub_header(pack(header))


def test_traceparent_with_trailing_newline_is_rejected() -> None:
    # `re.match` with `$` also matches before a final "\n": "…-01\n" slips through.
    header = {"id": b"\x01" * 16, "topic": "a.b", "ts": 1, "tp": TRACEPARENT + "\n"}
    with pytest.raises(ProtocolViolation):
        decode_pub_header(pack(header))


def test_unpack_map_limits() -> None:
    with pytest.raises(ProtocolViolation) as info:
        unpack_map(pack({"k": "x" * MAX_HEADER_BYTES}))
    assert info.value.code == Code.TOO_LARGE
    with pytest.raises(ProtocolViolation) as info:
        unpack_map(pack({str(i): i for i in range(65)}))
    assert info.value.code == Code.BAD_HEADER
    with pytest.raises(ProtocolViolation) as info:
        unpack_map(pack({"k": list(range(1025))}))
    assert info.value.code == Code.BAD_HEADER
    with pytest.raises(ProtocolViolation):
        unpack_map(pack([1, 2]))
    with pytest.raises(ProtocolViolation):
        unpack_map(pack({"a": 1}) + b"\x00")  # trailing bytes
    with pytest.raises(ProtocolViolation):
        unpack_map(pack({1: 1}))  # non-string key
    with pytest.raises(ProtocolViolation):
        unpack_map(msgpack.packb({"t": msgpack.ExtType(1, b"x")}))
    not_bytes: Any = bytearray(pack({"a": 1}))
    with pytest.raises(ProtocolViolation) as info:
        unpack_map(not_bytes)
    assert info.value.code == Code.MALFORMED_FRAME


def test_unpack_map_rejects_non_string_keys() -> None:
    # The docstring and the return type promise string keys; msgpack's strict_map_key
    # also lets bin (bytes) keys through.
    with pytest.raises(ProtocolViolation):
        unpack_map(pack({b"id": b"\x01" * 16, "topic": "a"}))


def test_decode_stamp_rejects_non_integer_attempt() -> None:
    # The attempt field is passed to int() unchecked: str, None, list, nan escape as
    # ValueError/TypeError instead of ProtocolViolation.
    for attempt in ["x", None, [1], {"a": 1}, float("nan"), float("inf")]:
        with pytest.raises(ProtocolViolation):
            decode_stamp(pack([1, "app", 2, attempt]))


def test_decode_stamp_and_sids_reject_garbage() -> None:
    for raw in [b"", b"\xc1", pack([1, 2, 3]), pack([1, "a", 2, 1, 5]), pack({"seq": 1})]:
        with pytest.raises(ProtocolViolation):
            decode_stamp(raw)
    with pytest.raises(ProtocolViolation):
        decode_stamp(pack(["1", "a", 2, 1]))
    for raw in [b"", b"\xc1", pack(1), pack([1, "2"]), pack([1.0]), pack([True])]:
        with pytest.raises(ProtocolViolation):
            decode_sids(raw)


# -- message ids ------------------------------------------------------------------------------


def _check_layout(msg_id: bytes) -> None:
    assert isinstance(msg_id, bytes)
    assert len(msg_id) == MESSAGE_ID_BYTES
    assert msg_id[6] >> 4 == 0x7  # UUIDv7 version nibble
    assert msg_id[8] >> 6 == 0b10  # RFC 4122 variant


def test_message_ids_increase_strictly_and_are_unique() -> None:
    ids = [new_message_id() for _ in range(10_000)]
    for msg_id in ids[:50]:
        _check_layout(msg_id)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == len(ids)


class FakeClock:
    """A controllable replacement for time.time_ns."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(1_700_000_000_000 * 1_000_000)
    monkeypatch.setattr("broker.codec.time.time_ns", fake)
    yield fake


def _ms(msg_id: bytes) -> int:
    return int.from_bytes(msg_id[:6], "big")


def test_message_ids_frozen_clock_borrow_next_ms(clock: FakeClock) -> None:
    generator = MessageIdGenerator()
    ids = [generator.new() for _ in range(10_000)]
    for msg_id in ids:
        _check_layout(msg_id)
    assert all(a < b for a, b in itertools.pairwise(ids))
    start = clock.ns // 1_000_000
    assert _ms(ids[0]) == start
    assert start < _ms(ids[-1]) <= start + 3  # ≥ 4096 ids per ms before borrowing


def test_message_ids_clock_going_backwards(clock: FakeClock) -> None:
    generator = MessageIdGenerator()
    ids: list[bytes] = []
    for step in [0, 5, -3, -1000, 2, 0, 10_000, -10_000, 1]:
        clock.ns += step * 1_000_000
        ids.extend(generator.new() for _ in range(3))
    assert all(a < b for a, b in itertools.pairwise(ids))


def test_message_ids_embed_the_clock(clock: FakeClock) -> None:
    generator = MessageIdGenerator()
    for step in range(5):
        clock.ns += 7_000_000
        assert _ms(generator.new()) == clock.ns // 1_000_000, step


# -- hostile input ----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
keys = st.text(max_size=8) | st.binary(max_size=4) | st.integers(-5, 5)


def _nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=6) | st.dictionaries(keys, children, max_size=6)


values = st.recursive(scalars, _nest, max_leaves=30)
header_keys = ["id", "topic", "cid", "tp", "sens", "ts", "cf", "v", "sid", "pattern"]


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid PUB header with some fields replaced by arbitrary values."""
    header: dict[Any, Any] = {
        "id": b"\x01" * 16,
        "topic": "a.b",
        "cid": "c",
        "tp": TRACEPARENT,
        "sens": False,
        "ts": 1,
        "cf": True,
    }
    for key in draw(st.lists(st.sampled_from(header_keys), max_size=4)):
        if draw(st.booleans()):
            header[key] = draw(values)
        else:
            header.pop(key, None)
    return pack(header)


@st.composite
def hostile_stamps(draw: st.DrawFn) -> bytes:
    fields: list[Any] = [1, "app", 2, 1]
    for index in draw(st.lists(st.integers(0, 3), max_size=3)):
        fields[index] = draw(values)
    return pack(fields)


def _huge() -> list[bytes]:
    big = "x" * (MAX_HEADER_BYTES + 1)
    return [
        pack({"id": b"\x01" * 16, "topic": big}),
        pack(big),
        pack([1, big, 2, 1]),
        pack(list(range(100_000))),
        pack({"k": [[[]]] * 2000}),
    ]


def _deep(depth: int, opener: bytes, leaf: bytes = b"\xc0") -> bytes:
    return opener * depth + leaf


DEEP = [
    _deep(100_000, b"\x91"),  # fixarray of 1, nested
    _deep(100_000, b"\x81\xa1k"),  # fixmap {"k": ...}, nested
    b"\x81\xa1k" + _deep(100_000, b"\x91"),
    b"\x94" + _deep(10_000, b"\x91") + b"\xa1a\x02\x01",
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G items, truncated
    b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G entries, truncated
    b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GB, truncated
    b"\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GB, truncated
]


def _is_valid_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_valid_pub(value: Any) -> bool:
    return (
        isinstance(value, PubHeader)
        and isinstance(value.msg_id, bytes)
        and len(value.msg_id) == MESSAGE_ID_BYTES
        and isinstance(value.topic, str)
        and isinstance(value.confirm, bool)
    )


def _is_valid_stamp(value: Any) -> bool:
    return (
        isinstance(value, Stamp)
        and type(value.seq) is int
        and isinstance(value.sender, str)
        and type(value.timestamp_ns) is int
        and type(value.attempt) is int
    )


def _is_valid_sids(value: Any) -> bool:
    return isinstance(value, list) and all(type(s) is int for s in value)


DECODERS: list[tuple[str, Callable[[bytes], Any], Callable[[Any], bool]]] = [
    ("unpack_map", unpack_map, _is_valid_map),
    ("decode_pub_header", decode_pub_header, _is_valid_pub),
    ("decode_stamp", decode_stamp, _is_valid_stamp),
    ("decode_sids", decode_sids, _is_valid_sids),
]
DECODER_IDS = [name for name, _, _ in DECODERS]


def _only_protocol_violation(
    decoder: Callable[[bytes], Any], valid: Callable[[Any], bool], raw: bytes
) -> None:
    try:
        result = decoder(raw)
    except ProtocolViolation as exc:
        assert isinstance(exc.code, Code)
        return
    assert valid(result), result


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("name", "decoder", "valid"), DECODERS, ids=DECODER_IDS)
@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(
    name: str, decoder: Callable[[bytes], Any], valid: Callable[[Any], bool], raw: bytes
) -> None:
    _only_protocol_violation(decoder, valid, raw)


@pytest.mark.parametrize(("name", "decoder", "valid"), DECODERS, ids=DECODER_IDS)
@FUZZ
@given(value=values)
def test_fuzz_arbitrary_msgpack_values(
    name: str, decoder: Callable[[bytes], Any], valid: Callable[[Any], bool], value: Any
) -> None:
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return
    _only_protocol_violation(decoder, valid, raw)


@pytest.mark.parametrize(("name", "decoder", "valid"), DECODERS, ids=DECODER_IDS)
@FUZZ
@given(raw=mutated_headers() | hostile_stamps())
def test_fuzz_wrong_field_types(
    name: str, decoder: Callable[[bytes], Any], valid: Callable[[Any], bool], raw: bytes
) -> None:
    _only_protocol_violation(decoder, valid, raw)


@pytest.mark.parametrize(("name", "decoder", "valid"), DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("raw", _huge() + DEEP, ids=lambda raw: f"{len(raw)}B")
def test_huge_and_deep_input(
    name: str, decoder: Callable[[bytes], Any], valid: Callable[[Any], bool], raw: bytes
) -> None:
    _only_protocol_violation(decoder, valid, raw)


@FUZZ
@given(stamp=st.binary(max_size=40) | hostile_stamps(), header=mutated_headers())
def test_fuzz_decode_envelope(stamp: bytes, header: bytes) -> None:
    try:
        envelope = decode_envelope(stamp, header, b"payload")
    except ProtocolViolation:
        return
    assert isinstance(envelope, Envelope)
    assert envelope.payload == b"payload"


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    """The random bits come from a pooled buffer; a child must not inherit the pool."""
    import os

    from broker.codec import MessageIdGenerator

    generator = MessageIdGenerator()
    generator.new()  # fill the pool before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write_end, b"".join(generator.new() for _ in range(64)))
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    child = {data[i : i + 16][8:] for i in range(0, len(data), 16)}  # the random halves
    parent = {generator.new()[8:] for _ in range(64)}
    assert len(child) == 64 and not child & parent


_HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.binary(min_size=MESSAGE_ID_BYTES, max_size=MESSAGE_ID_BYTES),
    st.lists(st.integers(-1000, 1000), max_size=3),
)
_HEADER_KEYS = st.sampled_from(["id", "topic", "ts", "cf", "cid", "tp", "sens", "dest", "x"])


def _full_check(raw: bytes) -> PubHeader | tuple[Code, str]:
    try:
        return pub_fields(unpack_map(raw))
    except ProtocolViolation as exc:
        return (exc.code, exc.detail)


def _fast_check(raw: bytes) -> PubHeader | tuple[Code, str]:
    try:
        return decode_pub_header(raw)
    except ProtocolViolation as exc:
        return (exc.code, exc.detail)


@settings(max_examples=400)
@given(
    st.dictionaries(
        st.one_of(_HEADER_KEYS, st.binary(max_size=3), st.integers(0, 3)),
        _HEADER_VALUES,
        max_size=6,
    ),
    st.binary(min_size=MESSAGE_ID_BYTES, max_size=MESSAGE_ID_BYTES),
)
def test_the_fast_pub_header_path_agrees_with_the_full_check(
    header: dict[Any, Any], msg_id: bytes
) -> None:
    """decode_pub_header's inline check of a plain header gives exactly what the full
    check gives: the same PubHeader, or the same error."""
    if header.get("id") is None:
        header["id"] = msg_id  # most examples should be plausible headers
    raw = msgpack.packb(header, use_bin_type=True)
    assert _fast_check(raw) == _full_check(raw)


def test_a_plain_header_and_a_rich_one_decode_alike() -> None:
    msg_id = b"i" * MESSAGE_ID_BYTES
    plain = decode_pub_header(encode_pub_header(msg_id, "a.b", client_ts_ns=5, confirm=True))
    assert plain == PubHeader(msg_id, "a.b", confirm=True)
    rich = decode_pub_header(encode_pub_header(msg_id, "a.b", correlation_id="c", confirm=True))
    assert rich == PubHeader(msg_id, "a.b", confirm=True, correlation_id="c")
