"""The delivery core without sockets or clocks: Mailbox rules, then a Hypothesis state
machine driving Router sessions against a model (nothing lost, FIFO, bounded attempts)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from broker.delivery import Delivery, DeliveryConfig, Mailbox
from broker.manifests import Permissions
from broker.router import Router, RouterConfig

MS = 1_000_000


def delivery(seq: int, size: int = 10) -> Delivery:
    return Delivery(seq, b"\x91\x01", "pub", 0, "a.b", b"i" * 16, b"h", b"x" * size)


def test_queue_is_bounded_by_count_and_bytes() -> None:
    box = Mailbox(DeliveryConfig(queue_max=2, queue_max_bytes=10_000))
    assert box.offer(delivery(1)) and box.offer(delivery(2))
    assert not box.offer(delivery(3))
    small = Mailbox(DeliveryConfig(queue_max=100, queue_max_bytes=25))
    assert small.offer(delivery(1)) and small.offer(delivery(2))
    assert not small.offer(delivery(3))


def test_window_limits_in_flight_and_acks_free_it() -> None:
    box = Mailbox(DeliveryConfig(window=2))
    for seq in range(1, 6):
        box.offer(delivery(seq))
    assert [d.seq for d in box.pull(0)] == [1, 2]
    assert box.pull(0) == []
    assert box.ack(1) and not box.ack(1)
    assert [d.seq for d in box.pull(0)] == [3]


def test_nack_retries_with_growing_backoff_then_dies() -> None:
    config = DeliveryConfig(retries=3, backoff_base_ms=100, backoff_cap_ms=10_000)
    box = Mailbox(config)
    box.offer(delivery(1))
    now = 0
    gaps = []
    (first,) = box.pull(now)
    assert first.attempt == 1
    for attempt in (2, 3, 4):
        outcome = box.nack(1, now, "boom")
        assert outcome is not None and outcome.dead == []
        [(retried, delay)] = outcome.retried
        assert (retried.seq, retried.attempt, delay) == (1, attempt, 100 * MS << (attempt - 2))
        assert box.pull(now) == []  # not yet due
        due = box.next_due_ns()
        assert due is not None
        gaps.append(due - now)
        now = due
        (again,) = box.pull(now)
        assert again.attempt == attempt
    assert gaps == [100 * MS, 200 * MS, 400 * MS]
    outcome = box.nack(1, now, "boom")
    assert outcome is not None and outcome.retried == []
    [dead] = outcome.dead
    assert dead.attempt == 4 and dead.last_error == "boom"
    assert len(box) == 0
    assert box.nack(1, now, "boom") is None  # no longer in flight


def test_ack_timeout_counts_as_a_failure() -> None:
    box = Mailbox(DeliveryConfig(ack_timeout_ms=1000, retries=0))
    box.offer(delivery(1))
    box.pull(0)
    assert not box.expire(999 * MS)
    outcome = box.expire(1000 * MS)
    assert outcome.retried == []
    (dead,) = outcome.dead
    assert dead.seq == 1 and "ack" in dead.last_error


def test_detach_requeues_in_flight_in_order_before_the_queue() -> None:
    box = Mailbox(DeliveryConfig(window=3))
    for seq in range(1, 6):
        box.offer(delivery(seq))
    box.pull(0)
    outcome = box.detach()
    assert outcome.dead == []
    assert [(d.seq, delay) for d, delay in outcome.retried] == [(1, 0), (2, 0), (3, 0)]
    resumed = box.pull(0)
    assert [d.seq for d in resumed] == [1, 2, 3]
    assert [d.attempt for d in resumed] == [2, 2, 2]
    assert [d.seq for d in box.drain()] == [1, 2, 3, 4, 5]


PERMS = Permissions(publish=(">",), subscribe=(">",))
RETRIES = 2


class SessionsMachine(RuleBasedStateMachine):
    """A publisher and a subscriber session; the subscriber acks, nacks, vanishes, resumes."""

    def __init__(self) -> None:
        super().__init__()
        config = RouterConfig(
            peer_timeout_ms=1000,
            delivery=DeliveryConfig(
                window=4,
                retries=RETRIES,
                backoff_base_ms=10,
                ack_timeout_ms=200,
                queue_max=50,
                grace_ms=500,
            ),
        )
        self.router = Router(lambda app: PERMS, config)
        self.now = 1_000 * MS
        self.peers = 0
        self.pub_peer = self._connect("pub")
        self.sub_peer: bytes | None = self._connect("sub")
        self._send(self.sub_peer, "sub", [P.SUB, pack({"sid": 1, "pattern": "t.*"})])
        self.published: list[tuple[str, int]] = []
        self.counter = 0
        self.unacked: dict[int, tuple[str, int]] = {}
        self.acked: set[tuple[str, int]] = set()
        self.first_seen: dict[str, list[int]] = {"t.a": [], "t.b": []}
        self.max_attempt = 0

    def _connect(self, app: str) -> bytes:
        self.peers += 1
        peer = f"peer-{self.peers}".encode()
        self._send(peer, app, [P.HELLO, pack({"v": [1]})])
        return peer

    def _send(self, peer: bytes, app: str, frames: list[bytes]) -> None:
        self._absorb(self.router.handle(peer, app, frames, self.now))

    def _absorb(self, outbound: list[tuple[bytes, list[bytes]]]) -> None:
        for peer, frames in outbound:
            if frames[0] != P.DELIVER or peer != self.sub_peer:
                continue
            for i in range(1, len(frames), 4):
                seq, _sender, _ts, attempt = msgpack.unpackb(frames[i + 1])
                topic, number = msgpack.unpackb(frames[i + 3])
                self.max_attempt = max(self.max_attempt, attempt)
                if attempt == 1:
                    self.first_seen[topic].append(number)
                self.unacked[seq] = (topic, number)

    @rule(topic=st.sampled_from(["t.a", "t.b"]), count=st.integers(1, 6))
    def publish(self, topic: str, count: int) -> None:
        frames = [P.PUB]
        for _ in range(count):
            self.counter += 1
            frames += [encode_pub_header(new_message_id(), topic), pack([topic, self.counter])]
            if ("sub", P.DEFAULT_SESSION) in self.router.sessions.by_key:  # else nobody subscribes
                self.published.append((topic, self.counter))
        self._send(self.pub_peer, "pub", frames)

    @precondition(lambda self: self.sub_peer is not None and self.unacked)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.unacked)))
        self.acked.add(self.unacked.pop(seq))
        assert self.sub_peer is not None
        self._send(self.sub_peer, "sub", [P.ACK, pack({"seqs": [seq]})])

    @precondition(lambda self: self.sub_peer is not None and self.unacked)
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.unacked)))
        del self.unacked[seq]
        assert self.sub_peer is not None
        self._send(self.sub_peer, "sub", [P.NACK, pack({"seq": seq, "error": "no"})])

    @rule(ms=st.integers(1, 400))
    def time_passes(self, ms: int) -> None:
        self.now += ms * MS
        if self.sub_peer is not None:  # the live subscriber keeps its session alive
            self._send(self.sub_peer, "sub", [P.PING, b"\x80"])
        self._send(self.pub_peer, "pub", [P.PING, b"\x80"])
        self._absorb(self.router.housekeeping(self.now))

    @precondition(lambda self: self.sub_peer is not None)
    @rule()
    def subscriber_vanishes(self) -> None:
        assert self.sub_peer is not None
        self.router.drop_peer(self.sub_peer, self.now)
        self.sub_peer = None
        self.unacked.clear()  # whatever it held unacked will be redelivered

    @precondition(lambda self: self.sub_peer is None)
    @rule()
    def subscriber_returns(self) -> None:
        """Within the grace period this resumes the session; after it, a new one starts."""
        self.sub_peer = f"peer-{self.peers + 1}".encode()
        self._connect("sub")
        self._send(self.sub_peer, "sub", [P.SUB, pack({"sid": 1, "pattern": "t.*"})])

    def _dead(self) -> set[tuple[str, int]]:
        dead = set()
        for entry in self.router.dlq.entries():
            dead.add(tuple(msgpack.unpackb(entry.delivery.payload)))
        return dead

    def _held(self) -> set[tuple[str, int]]:
        held: set[Any] = set()
        for session in self.router.sessions.by_key.values():
            box = session.mailbox
            for d in [*box.queue, *box.inflight.values(), *(e[2] for e in box.retry)]:
                held.add(tuple(msgpack.unpackb(d.payload)))
        return held

    @invariant()
    def nothing_is_lost(self) -> None:
        accounted = self.acked | self._dead() | self._held()
        assert set(self.published) <= accounted

    @invariant()
    def first_deliveries_are_fifo_per_topic(self) -> None:
        for topic, numbers in self.first_seen.items():
            expected = [n for t, n in self.published if t == topic]
            assert numbers == sorted(numbers)
            assert set(numbers) <= set(expected)

    @invariant()
    def attempts_are_bounded(self) -> None:
        assert self.max_attempt <= 1 + RETRIES
        for entry in self.router.dlq.entries():
            if entry.reason == "nacked":
                assert entry.delivery.attempt == 1 + RETRIES


TestSessions = SessionsMachine.TestCase
TestSessions.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_auto_ack_mailbox_sends_everything_and_keeps_nothing_in_flight() -> None:
    box = Mailbox(DeliveryConfig(window=2), auto_ack=True)
    for seq in range(1, 6):
        box.offer(delivery(seq))
    assert [d.seq for d in box.pull(0)] == [1, 2, 3, 4, 5]
    assert box.inflight == {} and len(box) == 0
