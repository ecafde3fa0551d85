"""The client's inline decode of a delivery (`clients.message.delivered_envelope`) against
the slow path it stands in for (`envelope_of(decode_stamp(...))`): the same Envelope for
every input the slow path accepts, the same categorised error for every one it refuses."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.codec import Envelope, Stamp, decode_stamp, encode_pub_header, encode_stamp, pack
from broker.errors import Code, ProtocolViolation
from broker.protocol import MAX_HEADER_BYTES, MESSAGE_ID_BYTES
from clients.message import delivered_envelope, envelope_of

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MSG_ID = b"m" * MESSAGE_ID_BYTES

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["", TRACEPARENT, "x" * 129, "market.x"]),
    st.binary(max_size=20),
    st.binary(min_size=MESSAGE_ID_BYTES, max_size=MESSAGE_ID_BYTES),
    st.lists(st.integers(-1000, 1000), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-1000, 1000), max_size=2),
)
_keys = st.sampled_from(
    ["id", "topic", "ts", "cf", "reply", "ttl_ms", "to", "err", "cid", "tp", "sens", "dest", "x"]
)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Mostly plausible headers (a valid id and topic, then any fields of any type), some
    with non-str keys, some not maps, some bytes that are not msgpack, some too large."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return pack(draw(_values))
    if kind == 2:
        return encode_pub_header(MSG_ID, "a.b", extra={"pad": "x" * MAX_HEADER_BYTES})
    keys = st.one_of(_keys, st.binary(max_size=3), st.integers(0, 3)) if kind == 3 else _keys
    fields: dict[Any, Any] = {"id": MSG_ID, "topic": "market.x"} if kind > 4 else {}
    fields.update(draw(st.dictionaries(keys, _values, max_size=6)))
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def stamps(draw: st.DrawFn) -> bytes:
    """Mostly valid stamps, then wrong arity, wrong types, attempt < 1, garbage."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=30))
    if kind == 1:
        return pack(draw(st.lists(_values, max_size=5)))
    if kind == 2:
        return pack([draw(_values) for _ in range(4)])
    seq = draw(st.integers(0, 2**63 - 1))
    sender = draw(st.text(max_size=20))
    ts = draw(st.integers(0, 2**63 - 1))
    attempt = draw(st.integers(-2, 10))
    return encode_stamp(seq, sender, ts, attempt)


def _outcome(decode: Any, stamp: bytes, header: bytes, payload: bytes) -> Any:
    try:
        return decode(stamp, header, payload)
    except ProtocolViolation as exc:
        return (type(exc), exc.code, exc.detail)


def _slow(stamp: bytes, header: bytes, payload: bytes) -> Envelope:
    return envelope_of(decode_stamp(stamp), header, payload)


@settings(max_examples=600)
@given(stamp=stamps(), header=headers(), payload=st.binary(max_size=20))
@example(stamp=encode_stamp(7, "pub", 9, 1), header=pack({"id": MSG_ID, "topic": "a"}), payload=b"")
@example(stamp=encode_stamp(7, "pub", 9, 0), header=pack({"id": MSG_ID, "topic": "a"}), payload=b"")
@example(
    stamp=encode_stamp(7, "pub", 9, 2),
    header=pack({"id": MSG_ID, "topic": "a", "cf": 1}),
    payload=b"",
)
@example(
    stamp=encode_stamp(7, "pub", 9, 2),
    header=pack({"id": MSG_ID, "topic": "a", "tp": TRACEPARENT, "cid": "c"}),
    payload=b"p",
)
def test_the_fast_delivery_decode_agrees_with_the_slow_path(
    stamp: bytes, header: bytes, payload: bytes
) -> None:
    assert _outcome(delivered_envelope, stamp, header, payload) == _outcome(
        _slow, stamp, header, payload
    )


def test_what_the_client_sends_takes_the_fast_path_and_decodes_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plain publish, a request's and a reply's header decode inline (no fallback)."""
    import clients.message as module

    calls: list[bytes] = []

    def counting(stamp: Stamp, header: bytes, payload: bytes) -> Envelope:
        calls.append(header)
        return envelope_of(stamp, header, payload)

    monkeypatch.setattr(module, "envelope_of", counting)
    stamp = encode_stamp(2**60, "pub", 5, 3)
    plain = encode_pub_header(MSG_ID, "a.b", confirm=True)
    request = encode_pub_header(MSG_ID, "a.b", extra={"reply": "r1", "ttl_ms": 500})
    reply = encode_pub_header(MSG_ID, "a.b", extra={"to": "r1", "err": "boom"})
    envelopes = [delivered_envelope(stamp, h, b"data") for h in (plain, request, reply)]
    assert calls == []
    rich = delivered_envelope(stamp, encode_pub_header(MSG_ID, "a.b", correlation_id="c"), b"")
    assert rich.correlation_id == "c" and len(calls) == 1  # the slow path checks cid
    assert envelopes[0] == Envelope(MSG_ID, "a.b", "pub", 5, 2**60, 3, None, None, False, b"data")
    assert (envelopes[1].reply_to, envelopes[2].in_reply_to, envelopes[2].error) == (
        "r1",
        "r1",
        "boom",
    )


def test_a_bad_stamp_is_the_slow_paths_error() -> None:
    header = encode_pub_header(MSG_ID, "a.b")
    for stamp, detail in ((b"\xc1", "bad DELIVER stamp"), (pack([1, "s", 2, 0]), "fields")):
        try:
            delivered_envelope(stamp, header, b"")
        except ProtocolViolation as exc:
            assert exc.code is Code.MALFORMED_FRAME and detail in exc.detail
        else:
            raise AssertionError("accepted a bad stamp")
