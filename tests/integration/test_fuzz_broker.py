"""Hypothesis throws malformed frames at a live broker: every one gets an ERROR, the broker
keeps serving other clients, and its memory stays bounded."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.codec import new_message_id, pack
from broker.errors import ProtocolViolation
from broker.wire import unpack_batch
from tests.conftest import BrokerHandle, authenticate
from tests.leaks import assert_flat


def nested(depth: int) -> bytes:
    """msgpack bytes of `depth` nested one-element arrays/maps (too deep for the packer)."""
    return b"\x91\x81\xa1k" * (depth // 2) + b"\x00"


deep_msgpack = st.builds(nested, st.integers(min_value=100, max_value=5000))


msgpack_junk = st.one_of(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=5) | st.integers(-9, 9), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    st.builds(lambda n: "x" * n, st.integers(min_value=8000, max_value=20000)),
    st.builds(lambda n: {"id": b"\x00" * n, "topic": "market.a"}, st.integers(0, 40)),
    st.fixed_dictionaries(
        {"id": st.binary(min_size=16, max_size=16), "topic": st.text(max_size=30)}
    ),
    st.fixed_dictionaries(
        {
            "sid": st.integers(-(2**63), 2**63) | st.text(max_size=3),
            "pattern": st.text(max_size=30) | st.integers(-(2**63), 2**63),
        }
    ),
)


malformed_messages = st.one_of(
    # random bytes as command and frames (never a real command: ACK or NACK may be silent)
    st.lists(st.binary(max_size=64), min_size=1, max_size=6).filter(
        lambda f: f[0] not in P.CLIENT_COMMANDS
    ),
    # real command, junk msgpack header or wrong frame count
    st.builds(
        lambda cmd, parts: [cmd, *parts],
        st.sampled_from([P.SUB, P.UNSUB, P.HELLO]),
        st.lists(
            st.builds(lambda v: msgpack.packb(v, use_bin_type=True), msgpack_junk)
            | deep_msgpack
            | st.binary(max_size=64),
            min_size=0,
            max_size=3,
        ),
    ).filter(lambda f: len(f) != 2 or f[0] != P.HELLO),
    # packed PUB (version 2): junk, or an array of junk pairs
    st.builds(
        lambda raw: [P.PUB, raw],
        st.binary(max_size=64)
        | st.builds(lambda v: msgpack.packb(v, use_bin_type=True), msgpack_junk)
        | st.builds(
            lambda items: msgpack.packb(items, use_bin_type=True),
            st.lists(st.binary(max_size=20), min_size=1, max_size=8),
        ),
    ),
    # PUB with junk headers, odd frame counts, truncated msgpack
    st.builds(
        lambda parts: [P.PUB, *parts],
        st.lists(
            st.builds(lambda v: msgpack.packb(v, use_bin_type=True)[:-1] or b"\xc1", msgpack_junk)
            | deep_msgpack
            | st.binary(max_size=32),
            min_size=0,
            max_size=5,
        ),
    ),
)


@pytest.fixture
def attacker(broker: BrokerHandle) -> Any:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    authenticate(sock, broker.credentials.mint("pub"))
    sock.connect(broker.endpoint)
    sock.send_multipart([P.HELLO, pack({"v": [1]})])
    assert sock.recv_multipart()[0] == P.WELCOME
    yield sock
    sock.close()


def replies_owed(frames: list[bytes]) -> int:
    """ERRORs the broker owes `frames`: one per header/payload pair of a PUB batch with a
    sound frame count (each entry is refused on its own, packed or not), otherwise one."""
    if frames[0] == P.PUB and len(frames) == 2:
        try:
            frames = unpack_batch(frames, 2)
        except ProtocolViolation:
            return 1
    pairs, odd = divmod(len(frames) - 1, 2)
    if frames[0] == P.PUB and pairs and not odd and pairs <= P.MAX_PUB_BATCH:
        return pairs
    return 1


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=malformed_messages)
def test_every_malformed_message_gets_an_error(
    broker: BrokerHandle, attacker: zmq.Socket[bytes], frames: list[bytes]
) -> None:
    """Every generated message is malformed by construction (a PUB header is truncated or
    too deep msgpack or a few random bytes, a HELLO never has its two frames, 'pub' may
    not subscribe), so every one, and every entry of a PUB batch, gets its own ERROR:
    never a CONFIRM, a WELCOME or silence. (This replaces a guard that skipped "valid"
    PUBs but could only ever answer no.)"""
    attacker.send_multipart(frames)
    owed = replies_owed(frames)
    while owed:
        assert attacker.poll(5000), f"no reply to {frames!r}"
        reply = attacker.recv_multipart()
        if reply[0] == P.CREDIT:  # refused PUB messages used credit too; it comes back
            continue
        owed -= 1
        if frames[0] == P.PUB and reply[0] == P.CONFIRM:
            pytest.fail(f"malformed PUB confirmed: {frames!r}")
        assert reply[0] == P.ERROR, (frames, reply)
        body = msgpack.unpackb(reply[1], raw=False)
        assert 100 <= body["code"] < 700 and body["message"] and body["hint"]
    while attacker.poll(20):
        assert attacker.recv_multipart()[0] == P.CREDIT, f"more replies than owed to {frames!r}"


ROUNDS = 8
MESSAGES_PER_ROUND = 1000
RSS_GROWTH_PER_ROUND = 2**20
"""Generous for noise (a plateau's increments are a few KiB, its jumps are too few to move
the median), tight enough for a real leak: a round carries 125 copies each of eight kinds,
among them a 10 KiB pattern, a 10 KiB nested header, a 2059-frame PUB and a packed PUB of
600 pairs, so keeping any of them adds more than 1.2 MiB every round. The router core
itself is checked to the byte with tracemalloc in tests/unit/test_router_memory.py."""


def test_broker_survives_fuzzing_serves_others_and_stays_bounded(
    broker: BrokerHandle, attacker: zmq.Socket[bytes]
) -> None:
    """Rounds of hostile input: the broker keeps routing for others, survives a frame over
    its size limit, and its RSS does not climb round after round. RSS is sampled after
    every round, once the broker has answered all of it, and judged by its trend
    (tests.leaks): the allocator's jumps are a few rounds, a leak is all of them; one
    absolute ceiling measured the machine instead."""
    assert broker.process is not None
    sub = broker.connect("sub").subscribe("market.>")
    pub = broker.connect("pub")
    broker_proc = psutil.Process(broker.process.pid)
    junk = [
        [b"\xff" * 10],
        [P.PUB, nested(5000), b"x"],
        [P.PUB, b"\xc1", b"x", b"\xc1"],
        [P.SUB, msgpack.packb({"sid": 1, "pattern": "a" * 10_000})],
        [P.PUB, msgpack.packb({"id": new_message_id(), "topic": "market." + "x" * 300}), b""],
        [P.PUB] + [b"x"] * (P.MAX_FRAMES + 10),
        [P.PUB, msgpack.packb([b"\xc1", b"x"] * 600)],  # packed: 600 junk pairs
        [P.PUB, b"\x91" * 4000],  # packed: too deep
    ]

    def round_trip(tag: int) -> None:
        pub.publish("market.check", tag, confirm=True)
        message = sub.get(5)
        assert message is not None and message.data == tag

    def attack(count: int) -> None:
        for i in range(count):
            attacker.send_multipart(junk[i % len(junk)])
            while attacker.poll(0):
                attacker.recv_multipart()
            if i % 500 == 0:
                round_trip(i)
        settle(count)

    def settle(tag: int) -> None:
        """Until the PONG: the broker has processed and answered the whole round."""
        body = str(tag).encode()
        attacker.send_multipart([P.PING, body])
        while True:
            assert attacker.poll(10_000), "the broker stopped answering the attacker"
            if attacker.recv_multipart() == [P.PONG, body]:
                return

    def settled_rss() -> int:
        """The least of a few readings: what the broker keeps, not a transient peak (a
        2059-frame PUB or a burst of ERRORs in flight lifts RSS for a moment)."""
        readings = []
        for _ in range(5):
            readings.append(int(broker_proc.memory_info().rss))
            time.sleep(0.02)
        return min(readings)

    attack(2 * MESSAGES_PER_ROUND)  # warm-up: caches, allocator arenas
    round_trip(-1)
    samples = [settled_rss()]
    for number in range(ROUNDS):
        attack(MESSAGES_PER_ROUND)
        round_trip(number)
        samples.append(settled_rss())
    # a frame over ZMQ_MAXMSGSIZE makes libzmq drop that connection, not the broker
    attacker.send_multipart([P.PUB, b"h", b"x" * (P.MAX_FRAME_BYTES + 1)])
    round_trip(10**6)
    assert broker.process.poll() is None
    assert_flat(samples, RSS_GROWTH_PER_ROUND, "broker RSS under malformed input")
