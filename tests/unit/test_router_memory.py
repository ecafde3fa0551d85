"""Memory of the routing core under hostile input and slow consumers, measured with
tracemalloc on the pure `Router` (no sockets, no allocator, no machine in the way).

Each check drives the same input for many rounds after a warm-up and asserts that what
the Python heap retains does not climb round after round (tests.leaks). The planted-leak
tests prove the check can fail: a router double that keeps a little of every message it
handles is caught.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from broker import protocol as P
from broker import router as router_module
from broker import wire
from broker.codec import encode_pub_header, pack
from broker.delivery import DeliveryConfig
from broker.manifests import Permissions
from broker.router import Outbound, Router, RouterConfig
from tests.leaks import assert_flat, growth_per_round, traced_rounds

SECOND = 1_000_000_000
T0 = 1_000 * SECOND
PERMISSIONS = {
    "pub": Permissions(publish=("market.>", "orders.*")),
    "sub": Permissions(subscribe=("market.>", "orders.*")),
}
MESSAGES_PER_ROUND = 400
ROUNDS = 8
PER_ROUND_BOUND = 4 * 1024
"""Retained growth allowed per round of 400 messages: about 10 bytes a message, so a leak
of even a small tuple per message fails, while one-off cache fills do not."""


def nested(depth: int) -> bytes:
    """msgpack bytes of `depth` nested one-element arrays/maps (too deep for the decoder)."""
    return b"\x91\x81\xa1k" * (depth // 2) + b"\x00"


def hostile(rng: random.Random, serial: int) -> list[bytes]:
    """One malformed or forbidden message, of the kinds the broker fuzz test sends."""
    fresh_id = serial.to_bytes(16, "big")
    kinds: list[list[bytes]] = [
        [rng.randbytes(rng.randint(1, 12))],  # unknown command
        [P.PUB, nested(rng.randint(100, 5000)), b"x"],
        [P.PUB, b"\xc1", b"x", b"\xc1"],  # odd frame count
        [P.PUB, pack({"id": fresh_id, "topic": "market.a"})[:-1], b"x"],  # truncated
        [P.PUB, pack({"id": fresh_id, "topic": "market." + "x" * 300}), b""],  # too long
        [P.PUB, pack({"id": fresh_id, "topic": f"secret.{serial % 8}"}), b"x"],  # denied
        [P.PUB, pack({"id": fresh_id[:7], "topic": "market.a"}), b"x"],  # short id
        [P.PUB] + [b"x"] * (2 * P.MAX_PUB_BATCH + 2),  # batch too large
        [P.SUB, msgpack.packb({"sid": 1, "pattern": "a" * 10_000})],
        [P.SUB, pack({"sid": rng.choice([-1, 0, 2**40, "x"]), "pattern": "market.>"})],
        [P.SUB, pack({"sid": 1, "pattern": "market.>"})],  # 'pub' may not subscribe
        [P.UNSUB, pack({"sid": rng.randint(1, 2**31 - 1)})],  # no such subscription
        [P.HELLO, pack({"v": [rng.randint(3, 99)]})],  # unsupported version
        [P.HELLO, pack({"v": [1], "session": "s" * 65})],  # session name too long
        [P.ACK, rng.randbytes(rng.randint(0, 20))],
        [P.NACK, pack({"seq": -rng.randint(1, 2**40)})],
        [P.STATS],  # not a platform identity
        [P.DLQ, pack({"op": "list"})],  # not a platform identity
    ]
    return kinds[serial % len(kinds)]


class Harness:
    """A router with an attacker session ('pub') and an at-most-once subscriber ('sub').

    `handle` is the seam the planted-leak tests replace.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self.now = T0
        self.serial = 0
        self._hello(b"attacker", "pub", {"v": [1], "session": "attacker"})
        self._hello(b"sub", "sub", {"v": [1], "session": "sub", "ack": False})
        [(_, frames)] = self.handle(b"sub", "sub", [P.SUB, pack({"sid": 1, "pattern": "market.>"})])
        assert frames[0] == P.SUBOK

    def _hello(self, peer: bytes, app_id: str, header: dict[str, Any]) -> None:
        [(_, frames)] = self.handle(peer, app_id, [P.HELLO, pack(header)])
        assert frames[0] == P.WELCOME

    def handle(self, peer: bytes, app_id: str, frames: list[bytes]) -> list[Outbound]:
        self.now += 1_000
        return self.router.handle(peer, app_id, frames, self.now)

    def attack(self, round_number: int) -> None:
        """One round of hostile messages, each answered by ERRORs only (and the CREDIT
        giving back what refused messages used), then proof that the router still routes
        a good publish."""
        rng = random.Random(round_number)
        for _ in range(MESSAGES_PER_ROUND):
            self.serial += 1
            out = self.handle(b"attacker", "pub", hostile(rng, self.serial))
            out = [item for item in out if item[1][0] != P.CREDIT]
            assert out and all(frames[0] == P.ERROR for _, frames in out), out
        self.serial += 1
        header = encode_pub_header(self.serial.to_bytes(16, "big"), "market.check")
        out = self.handle(b"attacker", "pub", [P.PUB, header, b"still serving"])
        [(to, frames)] = [item for item in out if item[1][0] != P.CREDIT]
        assert to == b"sub" and frames[0] == P.DELIVER
        assert wire.Deliver.decode(frames).items[-1].payload == b"still serving"
        self.router.notices.clear()  # the server drains these into log lines


@pytest.fixture(autouse=True)
def small_dedupe_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router remembers the ids of the last 131072 accepted publishes to drop resends:
    bounded, but it takes that many publishes to fill (~170 bytes each, so it would show
    as a slow climb). A window of one id is full at once: growth left is not the window."""
    monkeypatch.setattr(router_module, "_DEDUPE_LIMIT", 1)


def make_router() -> Router:
    return Router(PERMISSIONS.get, RouterConfig())


def test_hostile_input_leaves_nothing_behind_in_the_router() -> None:
    """Round after round of malformed, oversized and forbidden messages: every one gets an
    ERROR, and the heap the router retains stays flat (what the broker fuzz test once
    asserted with an RSS ceiling, which measured the allocator instead)."""
    harness = Harness(make_router())
    samples = traced_rounds(harness.attack, ROUNDS)
    assert_flat(samples, PER_ROUND_BOUND, "the router under hostile input")
    assert harness.router.stats.errors  # the input really was refused, not ignored


class KeepsFrames(Router):
    """A planted leak: keeps every inbound message (say, 'for debugging')."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept: list[Any] = []

    def handle(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self.kept.append(frames)
        return super().handle(peer, app_id, frames, now_ns)


class KeepsATuple(KeepsFrames):
    """A small planted leak: one (peer, frame count) tuple per message."""

    def handle(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self.kept.append((peer, len(frames)))
        return Router.handle(self, peer, app_id, frames, now_ns)


@pytest.mark.parametrize("leaky", [KeepsFrames, KeepsATuple])
def test_the_check_catches_a_planted_leak(leaky: type[Router]) -> None:
    """The same check as above fails for a router that keeps something of every message,
    even when that is only a small tuple: the hostile-input test can fail."""
    harness = Harness(leaky(PERMISSIONS.get, RouterConfig()))
    samples = traced_rounds(harness.attack, ROUNDS)
    with pytest.raises(AssertionError, match="grows by"):
        assert_flat(samples, PER_ROUND_BOUND, "the leaky router")


def test_slow_consumer_memory_is_bounded_by_the_queue_and_dlq_limits() -> None:
    """A subscriber that never acks: its window and queue fill, then every further message
    is dead-lettered, and the DLQ drops its oldest entries past its limit. After that,
    flooding on retains nothing more (this replaces an RSS ceiling on the live broker)."""
    config = RouterConfig(delivery=DeliveryConfig(window=10, queue_max=100), dlq_max=200)
    router = Router(PERMISSIONS.get, config)
    now = T0
    router.handle(b"slow", "sub", [P.HELLO, pack({"v": [1], "session": "slow"})], now)
    router.handle(b"slow", "sub", [P.SUB, pack({"sid": 1, "pattern": "market.>"})], now)
    router.handle(b"pub", "pub", [P.HELLO, pack({"v": [1], "session": "pub"})], now)
    payload = b"x" * 4096
    serial = 0

    def flood(_round: int) -> None:
        nonlocal serial, now
        for _ in range(300):
            serial += 1
            now += 1_000
            header = encode_pub_header(serial.to_bytes(16, "big"), "market.flood")
            router.handle(b"pub", "pub", [P.PUB, header, payload], now)
        router.notices.clear()  # the server drains these into log lines

    samples = traced_rounds(flood, ROUNDS)
    snapshot = router.snapshot(now)
    assert snapshot["queued"] <= 110
    assert snapshot["dlq_size"] == 200 and snapshot["dlq_dropped"] > 0
    # 300 payloads of 4 KiB a round: keeping even one in ten would add ~120 KiB a round
    assert_flat(samples, 16 * 1024, "the router with a slow consumer")


def test_growth_per_round_sees_trends_not_steps() -> None:
    """The trend statistic itself: the noise, the jumps and the transient peaks of a plateau
    stay near zero, a steady climb shows at its full rate even when noisy."""
    mib = 2**20
    plateau = [0, 480, 532, 532, 228, 468, 520, 1372, 472, 540]  # measured broker RSS, KiB
    assert abs(growth_per_round(plateau)) < 100
    steps = [0, 0, 6 * mib, 6 * mib, 6 * mib, 6 * mib, 9 * mib, 9 * mib, 9 * mib, 9 * mib]
    assert growth_per_round(steps) == 0  # two allocator jumps, flat in between
    leak = [r * mib + (mib // 2 if r % 3 == 0 else 0) for r in range(10)]
    assert 0.9 * mib <= growth_per_round(leak) <= 1.1 * mib
    kib = 1024
    peaks = [28_070, 28_040, 27_870, 31_040, 28_350, 29_610, 33_180, 28_050, 27_990]
    assert growth_per_round([r * kib for r in peaks]) <= 0  # transient peaks, measured
    climbing_peaks = [r * mib + (3 * mib if r % 2 else 0) for r in range(10)]
    assert growth_per_round(climbing_peaks) >= 0.9 * mib  # a leak under the peaks still shows
    with pytest.raises(ValueError, match="two samples"):
        growth_per_round([1])
