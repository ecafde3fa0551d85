"""broker.wire: every record survives its own encoding (Hypothesis), and every decoder
meets hostile frames with a typed ProtocolViolation, never another exception."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker import wire as W
from broker.codec import Stamp, decode_pub_header, encode_pub_header
from broker.errors import ProtocolViolation

text = st.text(max_size=20)
names = st.text(min_size=1, max_size=64)
session_names = st.text(
    st.characters(categories=("L", "M", "N", "P", "S")), min_size=1, max_size=64
)
"""Valid session names (broker.names): printable, no whitespace."""
u31 = st.integers(0, W.MAX_RID)
u63 = st.integers(0, 2**63 - 1)
sids = st.integers(1, P.MAX_SID)
msg_ids = st.binary(min_size=16, max_size=16)
scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | text | st.binary(max_size=8)
)
plain_maps = st.dictionaries(st.text(max_size=8), scalars, max_size=4)


@st.composite
def headers(draw: st.DrawFn, /, **extra: Any) -> bytes:
    fields = {key: draw(value) for key, value in extra.items()}
    return encode_pub_header(
        draw(msg_ids),
        draw(st.sampled_from(["market.a", "quote.x", "$sys.y"])),
        draw(st.none() | st.text(max_size=8)),
        confirm=draw(st.booleans()),
        extra=fields,
    )


def _request(header: bytes, payload: bytes) -> W.Request:
    fields = msgpack.unpackb(header)
    ttl = fields.get("ttl_ms", P.DEFAULT_REQUEST_TTL_MS)
    return W.Request(decode_pub_header(header), fields["reply"], ttl, header, payload)


def _reply(header: bytes, payload: bytes) -> W.Reply:
    fields = msgpack.unpackb(header)
    return W.Reply(decode_pub_header(header), fields["to"], fields.get("err"), header, payload)


stamps = st.builds(Stamp, u63, text, u63, st.integers(1, 100))
delivered = st.builds(
    W.Delivered,
    st.lists(st.integers(0, P.MAX_SID), max_size=4).map(tuple),
    stamps,
    st.binary(max_size=16),
    st.binary(max_size=16),
)
restore_delivery = st.tuples(
    text, text, u63, st.binary(max_size=4), text, u63, text, msg_ids, st.binary(max_size=8),
    st.binary(max_size=8), st.booleans(),
)  # fmt: skip
restore_dead = st.tuples(
    u63, text, text, text, u63, st.integers(1, 9), text, u63, text, u63, text, msg_ids,
    st.binary(max_size=8), st.binary(max_size=8), st.booleans(), st.binary(max_size=4),
)  # fmt: skip
stored_rows = st.tuples(u63, u63, text, st.binary(max_size=8), st.binary(max_size=8))

RECORDS: dict[type[Any], st.SearchStrategy[Any]] = {
    W.Hello: st.builds(
        W.Hello,
        st.lists(st.integers(0, 9), max_size=4).map(tuple),
        session_names,
        st.booleans(),
        text,
    ),
    W.Welcome: st.builds(
        W.Welcome,
        version=st.integers(1, 2**16),
        app=text,
        session=text,
        resumed=st.booleans(),
        subs=st.lists(st.tuples(sids, text), max_size=3).map(tuple),
        heartbeat_ms=st.integers(1, 2**31),
        timeout_ms=st.integers(1, 2**31),
        grace_ms=st.integers(0, 2**40),
        window=st.integers(1, 2**31),
        store=st.none() | text,
        max_payload=st.integers(1, 2**40),
        max_batch=st.integers(1, 2**31),
        credit=st.integers(0, 2**31),
    ),
    W.Ping: st.builds(W.Ping, st.binary(max_size=64)),
    W.Pong: st.builds(W.Pong, st.binary(max_size=64)),
    W.Bye: st.just(W.Bye()),
    W.Error: st.builds(W.Error, st.integers(100, 699), text, text, text, text, plain_maps),
    W.Subscribe: st.builds(W.Subscribe, sids, text, st.booleans(), st.booleans()),
    W.SubscribeOk: st.builds(W.SubscribeOk, sids, text, st.booleans()),
    W.Unsubscribe: st.builds(W.Unsubscribe, sids),
    W.UnsubscribeOk: st.builds(W.UnsubscribeOk, sids),
    W.Publish: st.builds(
        W.Publish,
        st.lists(
            st.tuples(st.binary(max_size=8), st.binary(max_size=8)), min_size=1, max_size=5
        ).map(tuple),
    ),
    W.Deliver: st.builds(W.Deliver, st.lists(delivered, min_size=1, max_size=4).map(tuple)),
    W.Confirm: st.builds(W.Confirm, st.lists(msg_ids, max_size=5).map(tuple)),
    W.Credit: st.builds(W.Credit, st.integers(1, 2**31)),
    W.Ack: st.builds(W.Ack, st.lists(u63, max_size=5).map(tuple)),
    W.Nack: st.builds(W.Nack, u63, st.text(max_size=512), st.booleans()),
    W.Request: st.builds(
        _request,
        headers(reply=names, ttl_ms=st.integers(1, 3_600_000)),
        st.binary(max_size=8),
    ),
    W.Reply: st.builds(_reply, headers(to=names, err=st.none() | text), st.binary(max_size=8)),
    W.Stats: st.builds(W.Stats, u31, st.booleans()),
    W.StatsOk: st.builds(
        W.StatsOk, u31, st.dictionaries(st.text(max_size=8).filter(lambda k: k != "rid"), scalars)
    ),
    W.Dlq: st.one_of(
        st.builds(W.Dlq, st.sampled_from(["list", "purge"]), st.just(0), u31),
        st.builds(W.Dlq, st.just("replay"), st.integers(1, 2**63 - 1), u31),
        st.builds(W.Dlq, st.just("purge"), st.just(0), u31, st.lists(u63, max_size=5).map(tuple)),
    ),
    W.DlqOk: st.builds(
        W.DlqOk, u31, st.dictionaries(st.text(max_size=8).filter(lambda k: k != "rid"), scalars)
    ),
    W.EvSync: st.builds(W.EvSync, u63),
    W.EvSyncOk: st.builds(W.EvSyncOk, u63, u63, st.booleans()),
    W.EvAck: st.builds(W.EvAck, u63),
    W.EvFetch: st.builds(W.EvFetch, st.integers(1, 2**63 - 1)),
    W.EvData: st.builds(W.EvData, st.binary(max_size=18), st.binary(max_size=32)),
    W.EvRestore: st.builds(
        W.EvRestore,
        u63,
        st.lists(st.tuples(text, text, st.dictionaries(sids, text, max_size=3)), max_size=2).map(
            tuple
        ),
        st.lists(restore_delivery, max_size=2).map(tuple),
        st.lists(restore_dead, max_size=2).map(tuple),
        st.lists(st.tuples(text, msg_ids, u63, u63), max_size=2).map(tuple),
        st.booleans(),
    ),
    W.History: st.builds(W.History, text, st.integers(1, W.MAX_HISTORY)),
    W.Replay: st.builds(W.Replay, text, u63, st.none() | u63, u63),
    W.Result: st.builds(W.Result, st.lists(stored_rows, max_size=3).map(tuple), u63, st.booleans()),
}


def test_every_record_has_a_strategy() -> None:
    assert set(RECORDS) == set(W.CONTROL_RECORDS.values())


@pytest.mark.parametrize("cls", sorted(RECORDS, key=str))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type[Any], data: st.DataObject) -> None:
    record = data.draw(RECORDS[cls])
    frames = record.frames()
    assert frames[0] == cls.COMMAND
    assert all(isinstance(frame, bytes) for frame in frames)
    assert cls.decode(frames) == record


def test_confirm_and_ack_split_keep_every_id_under_the_limits() -> None:
    ids = [i.to_bytes(16, "big") for i in range(1000)]
    confirms = W.Confirm.split(ids)
    assert [i for c in confirms for i in c.ids] == ids
    assert all(len(c.frames()[1]) <= P.MAX_HEADER_BYTES for c in confirms)
    acks = W.Ack.split(list(range(2000)))
    assert [s for a in acks for s in a.seqs] == list(range(2000))
    assert all(len(a.frames()[1]) <= P.MAX_HEADER_BYTES for a in acks)


# -- hostile input ----------------------------------------------------------------------------

KEYS = [
    "v", "session", "ack", "client", "app", "resumed", "subs", "heartbeat_ms", "timeout_ms",
    "grace_ms", "window", "store", "code", "ref", "sid", "pattern", "durable", "serve", "ids",
    "seqs", "seq", "error", "requeue", "rid", "reset", "op", "id", "wm", "next", "epoch",
    "restore", "from", "sessions", "deliveries", "dead_letters", "recent", "done", "topic",
    "last", "since", "until", "after", "messages", "reply", "to", "err", "ttl_ms",
]  # fmt: skip
values = st.recursive(
    scalars | st.sampled_from([1, 2, 2**31, "market.a", b"\x01" * 16]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)
    ),
    max_leaves=10,
)
bodies = (
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(
        lambda m: msgpack.packb(m, use_bin_type=True)
    )
    | st.binary(max_size=40)
    | values.map(lambda v: msgpack.packb(v, use_bin_type=True))
)


@pytest.mark.parametrize("cls", sorted(RECORDS, key=str))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rest=st.lists(bodies, max_size=6))
def test_malformed_frames_are_a_protocol_violation_only(cls: type[Any], rest: list[bytes]) -> None:
    try:
        record = cls.decode([cls.COMMAND, *rest])
    except ProtocolViolation as exc:
        assert 100 <= int(exc.code) < 200
        return
    assert isinstance(record, cls)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(bodies, min_size=1, max_size=4))
def test_decode_query_takes_only_history_and_replay(frames: list[bytes]) -> None:
    for command in (W.HISTORY, W.REPLAY, W.RESULT, b"NOPE"):
        try:
            query = W.decode_query([command, *frames])
        except ProtocolViolation:
            continue
        assert isinstance(query, W.History | W.Replay)
