"""Packed batches (protocol version 2): a PUB or DELIVER batch in one frame.

The codec round-trips and refuses anything else with MALFORMED_FRAME only (Hypothesis);
the router packs DELIVERs for sessions that negotiated version 2, within the byte bound,
and keeps four frames per message for version 1; the client packs its PUB batches once the
broker speaks version 2. The socket-level proof is tests/integration/test_packed_wire.py.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import protocol as P
from broker import wire
from broker.codec import decode_pub_header, encode_pub_header, pack
from broker.errors import Code, ProtocolViolation
from broker.wire import PACKED_BATCH_BYTES, Publish, Welcome, pack_batch, unpack_batch
from clients.session import ClientSession, SessionConfig
from tests.unit.test_router import Peer, make_router

frames_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=40)


@given(items=frames_lists, group=st.sampled_from([2, 4]))
def test_a_packed_batch_round_trips(items: list[bytes], group: int) -> None:
    items = items[: len(items) - len(items) % group] or [b""] * group
    assert unpack_batch([P.PUB, pack_batch(items)], group) == [P.PUB, *items]


@given(
    raw=st.binary(max_size=200)
    | st.builds(
        msgpack.packb,
        st.recursive(
            st.none()
            | st.integers(-(2**63), 2**64 - 1)
            | st.text(max_size=5)
            | st.binary(max_size=5),
            lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner),
            max_leaves=12,
        ),
    )
)
def test_anything_else_is_malformed_frame_and_nothing_worse(raw: bytes) -> None:
    """Junk, truncated msgpack, maps, ints, nested lists, text: a MALFORMED_FRAME or a
    well-formed batch of byte strings, never another exception."""
    try:
        frames = unpack_batch([P.PUB, raw], 2)
    except ProtocolViolation as exc:
        assert exc.code == Code.MALFORMED_FRAME and exc.detail
    else:
        assert len(frames) >= 3 and len(frames) % 2 == 1
        assert all(type(item) is bytes for item in frames)


@pytest.mark.parametrize(
    "raw",
    [
        pack_batch([]),  # empty
        pack_batch([b"a", b"b", b"c"]),  # not whole groups
        msgpack.packb([b"h", 7]),  # not bytes
        msgpack.packb({"h": b"p"}),  # not an array
        b"\x91" * 5000 + b"\x00",  # deeper than the decoder goes
        pack_batch([b"h", b"p"])[:-1],  # truncated
    ],
)
def test_the_cases_named(raw: bytes) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        unpack_batch([P.PUB, raw], 2)
    assert caught.value.code == Code.MALFORMED_FRAME


# -- the router ------------------------------------------------------------------------------


def routed_to_sub(versions: tuple[int, ...], payloads: list[bytes]) -> list[list[bytes]]:
    """DELIVER frame lists a subscriber that offered `versions` gets for `payloads`."""
    router = make_router()
    sub = Peer(router, b"s", "sub")
    sub.hello(versions)
    sub.subscribed(1, "market.>")
    out = Peer(router, b"p", "pub").welcomed().pub(*[("market.a", p) for p in payloads])
    return [frames for to, frames in out if to == b"s" and frames[0] == P.DELIVER]


def test_a_version_2_session_gets_one_frame_per_deliver_version_1_four_per_message() -> None:
    payloads = [b"one", b"two", b"three"]
    [packed] = routed_to_sub((1, 2), payloads)
    assert len(packed) == 2
    [plain] = routed_to_sub((1,), payloads)
    assert len(plain) == 1 + 4 * len(payloads)
    for frames in (packed, plain):
        items = wire.Deliver.decode(frames).items
        assert [item.payload for item in items] == payloads
        assert [item.stamp.seq for item in items] == sorted({i.stamp.seq for i in items})


def test_a_packed_deliver_stays_within_its_byte_bound_and_a_big_message_goes_alone() -> None:
    big = PACKED_BATCH_BYTES // 2 + 1
    payloads = [b"a" * big, b"b" * big, b"c" * 10, b"d" * 10, b"e" * (PACKED_BATCH_BYTES - 100)]
    delivers = routed_to_sub((2,), payloads)
    assert [[len(i.payload) for i in wire.Deliver.decode(f).items] for f in delivers] == [
        [big],
        [big, 10, 10],
        [PACKED_BATCH_BYTES - 100],
    ]
    assert all(len(f[1]) < P.MAX_FRAME_BYTES for f in delivers)


def test_a_resume_takes_the_layout_of_the_new_connection() -> None:
    router = make_router()
    sub = Peer(router, b"s", "sub")
    sub.hello((2,))
    sub.subscribed(1, "market.>")
    sub.hello((1,))  # the same session again, from an older client
    out = Peer(router, b"p", "pub").welcomed().pub(("market.a", b"x"))
    [frames] = [f for to, f in out if to == b"s" and f[0] == P.DELIVER]
    assert len(frames) == 5
    session = router.session_of(b"s")
    assert session is not None and session.version == 1


# -- the client ------------------------------------------------------------------------------


def welcomed_client(version: int) -> ClientSession:
    session = ClientSession(SessionConfig("app"), lambda *_: None, 0.0)
    session.outgoing(0.0)  # the HELLO
    welcome = Welcome(
        version=version,
        app="app",
        session="main",
        resumed=False,
        subs=(),
        heartbeat_ms=2000,
        timeout_ms=10_000,
        grace_ms=30_000,
        window=256,
    )
    session.receive(welcome.frames(), 0.0)
    session.take_events()
    return session


def publish(session: ClientSession, n: int, payload: bytes) -> None:
    msg_id = n.to_bytes(16, "big")
    session.publish(msg_id, encode_pub_header(msg_id, "market.a", confirm=True), payload)


def test_the_client_packs_its_pub_batches_for_a_version_2_broker() -> None:
    session = welcomed_client(2)
    for n in range(10):
        publish(session, n, pack(n))
    [frames] = [f for f in session.outgoing(0.0) if f[0] == P.PUB]
    assert len(frames) == 2
    pairs = Publish.decode(frames).pairs
    assert [decode_pub_header(h).msg_id for h, _ in pairs] == [
        n.to_bytes(16, "big") for n in range(10)
    ]


def test_a_version_1_broker_gets_two_frames_per_message() -> None:
    session = welcomed_client(1)
    for n in range(3):
        publish(session, n, pack(n))
    [frames] = [f for f in session.outgoing(0.0) if f[0] == P.PUB]
    assert len(frames) == 7


def test_packed_pubs_keep_to_the_byte_bound_in_order() -> None:
    session = welcomed_client(2)
    big = PACKED_BATCH_BYTES // 2
    sizes = [big, big, 100, P.MAX_PAYLOAD_BYTES, 5]
    for n, size in enumerate(sizes):
        publish(session, n, b"x" * size)
    batches = [Publish.decode(f).pairs for f in session.outgoing(0.0) if f[0] == P.PUB]
    assert [[len(p) for _, p in pairs] for pairs in batches] == [
        [big],
        [big, 100],
        [P.MAX_PAYLOAD_BYTES],
        [5],
    ]
    assert all(
        len(pack_batch([h for pair in pairs for h in pair])) < P.MAX_FRAME_BYTES
        for pairs in batches
    )
