"""Per-app caps in the pure cores (broker.caps, the router, the core, the DLQ): no sockets,
the clocks passed in. Each overflow is a coded ERROR, a Denied event (action "limit",
the cap as target) and one counted `limit-exceeded` notice (the server's log line)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker import event_records as R
from broker import protocol as P
from broker.caps import APP_CAPS, UNCAPPED, Caps
from broker.codec import encode_pub_header
from broker.config import ConfigError, PlatformConfig, from_tables
from broker.core import BrokerCore, CoreConfig
from broker.delivery import Delivery
from broker.dlq import DeadLetterQueue
from broker.errors import ERRORS, Code
from broker.events import EventLog
from broker.manifests import Limits, ManifestError, Permissions, parse_manifest
from broker.router import Outbound, Router, RouterConfig
from broker.wire import Hello, Subscribe

NOW = 1_000 * 1_000_000_000
PERMISSIONS = {
    "greedy": Permissions(publish=(">",), subscribe=(">",), request=(">",)),
    "calm": Permissions(publish=(">",), subscribe=(">",), request=(">",)),
}
LIMITS = {
    "greedy": Limits(sessions=2, durable_subscriptions=1, pending_requests=1, pub_bytes=2**21)
}


class Bench:
    """A router (and a core over it) whose stream is followed, so events can be read."""

    def __init__(self, persistence: bool = False, caps: Caps | None = None) -> None:
        stream = EventLog(epoch=1, consumers=("$audit",), waiting=persistence)
        config = RouterConfig(caps=caps or Caps())
        self.router = Router(
            PERMISSIONS.get, config, stream=stream, wall_clock=lambda: NOW, limits_for=LIMITS.get
        )
        self.core = BrokerCore(self.router, CoreConfig(persistence=persistence), None, NOW)
        self._ids = 0

    def send(self, peer: bytes, app: str, frames: list[bytes]) -> list[Outbound]:
        return self.core.inbound(peer, app, frames, NOW)

    def hello(self, peer: bytes, app: str, session: str) -> list[Outbound]:
        return self.send(peer, app, Hello(session=session).frames())

    def header(self, topic: str) -> bytes:
        self._ids += 1
        return encode_pub_header(self._ids.to_bytes(16, "big"), topic, client_ts_ns=1)

    def denied(self) -> list[R.Denied]:
        self.router.stream.resume()
        frames = self.router.stream.take_batch()
        events = R.decode_events(frames[2]) if frames else []
        return [e.record for e in events if isinstance(e.record, R.Denied)]

    def notices(self, cap: str) -> list[dict[str, Any]]:
        notices = self.router.take_notices()
        return [n for n in notices if n["event"] == "limit-exceeded" and n["cap"] == cap]


def code_of(out: list[Outbound]) -> int:
    [(_, frames)] = [o for o in out if o[1][0] == P.ERROR]
    body = msgpack.unpackb(frames[1], raw=False)
    assert body["hint"] == ERRORS[Code(body["code"])].hint
    return int(body["code"])


def test_caps_for_an_app_take_its_manifest_over_the_platform_and_clamp_pub_bytes() -> None:
    platform = Caps(sessions=10, pub_bytes=2**22, pub_bytes_max=2**23)
    assert platform.for_app(None) is platform
    assert platform.for_app(Limits()) is platform
    mine = platform.for_app(Limits(sessions=3, pub_bytes=2**30))
    assert (mine.sessions, mine.pub_bytes, mine.dlq_entries) == (3, 2**23, Caps().dlq_entries)
    assert all(getattr(UNCAPPED, name) > 2**40 for name in APP_CAPS)


def test_limits_are_platform_config_and_manifest_fields() -> None:
    config = from_tables({"limits": {"sessions": 5, "dlq_entries": 7}}, "test")
    assert (config.limits.sessions, config.limits.dlq_entries) == (5, 7)
    assert PlatformConfig.from_document(config.to_document()) == config
    with pytest.raises(ConfigError, match="pub_bytes_max"):
        from_tables({"limits": {"pub_bytes": 2**25, "pub_bytes_max": 2**24}}, "test")
    with pytest.raises(ConfigError, match=r"limits\.sessions"):
        from_tables({"limits": {"sessions": 0}}, "test")
    manifest = parse_manifest(
        Path("a.toml"), {"id": "a", "limits": {"sessions": 3, "durable_subscriptions": 0}}
    )
    assert manifest.limits == Limits(sessions=3, durable_subscriptions=0)
    for key, value in (("sessions", 0), ("pub_bytes", 1000), ("dlq_entries", "9"), ("held", 1)):
        with pytest.raises(ManifestError) as bad:
            parse_manifest(Path("a.toml"), {"id": "a", "limits": {key: value}})
        assert bad.value.field == f"limits.{key}"


def test_sessions_over_the_cap_are_refused_and_reported_others_unaffected() -> None:
    bench = Bench()
    assert bench.hello(b"g1", "greedy", "one")[0][1][0] == P.WELCOME
    assert bench.hello(b"g2", "greedy", "two")[0][1][0] == P.WELCOME
    assert code_of(bench.hello(b"g3", "greedy", "three")) == Code.SESSION_LIMIT
    assert bench.hello(b"g3", "greedy", "one")[-1][1][0] != P.ERROR  # its own: a resume
    for n in range(5):
        assert bench.hello(b"c%d" % n, "calm", f"c{n}")[0][1][0] == P.WELCOME
    [denied] = bench.denied()
    assert (denied.app, denied.session, denied.action, denied.target) == (
        "greedy",
        "three",
        "limit",
        "sessions",
    )
    [notice] = bench.notices("sessions")
    assert (notice["app"], notice["limit"], notice["count"]) == ("greedy", 2, 1)
    bench.send(b"g3", "greedy", [P.BYE])  # a closed session frees its place
    assert bench.hello(b"g4", "greedy", "four")[0][1][0] == P.WELCOME


def test_durable_subscriptions_and_pending_requests_are_capped_per_app() -> None:
    bench = Bench()
    bench.hello(b"g", "greedy", "g")
    bench.hello(b"s", "calm", "server")
    durable = Subscribe(1, "a.>", durable=True).frames()
    assert bench.send(b"g", "greedy", durable)[0][1][0] == P.SUBOK
    over = bench.send(b"g", "greedy", Subscribe(2, "b.>", durable=True).frames())
    assert code_of(over) == Code.DURABLE_LIMIT
    assert bench.send(b"g", "greedy", Subscribe(2, "b.>").frames())[0][1][0] == P.SUBOK
    bench.send(b"s", "calm", Subscribe(9, "ask.>", serve=True).frames())

    def request(peer: bytes, app: str, reply: str) -> list[Outbound]:
        bench._ids += 1
        header = encode_pub_header(bench._ids.to_bytes(16, "big"), "ask.x", extra={"reply": reply})
        return bench.send(peer, app, [P.REQ, header, b"q"])

    assert not [o for o in request(b"g", "greedy", "r1") if o[1][0] == P.ERROR]
    assert code_of(request(b"g", "greedy", "r2")) == Code.PENDING_LIMIT
    assert code_of(request(b"s", "calm", "r1")) == Code.BAD_HEADER  # not greedy's to take
    bench.hello(b"c", "calm", "c")
    assert not [o for o in request(b"c", "calm", "r3") if o[1][0] == P.ERROR]
    assert {d.target for d in bench.denied()} == {"durable_subscriptions", "pending_requests"}


def test_a_pub_over_the_apps_pub_bytes_is_refused_whole_with_its_credit() -> None:
    bench = Bench()
    bench.hello(b"g", "greedy", "g")
    bench.hello(b"c", "calm", "c")
    big = [P.PUB]
    for _ in range(3):
        big += [bench.header("x.y"), b"x" * 2**20]
    out = bench.send(b"g", "greedy", big)
    assert code_of(out) == Code.PUB_TOO_LARGE
    assert bench.router.stats.published == 0
    assert not [o for o in bench.send(b"c", "calm", [P.PUB, *big[1:]]) if o[1][0] == P.ERROR]
    assert bench.router.stats.published == 3
    [denied] = bench.denied()
    assert (denied.app, denied.target, denied.code) == ("greedy", "pub_bytes", 413)
    out = bench.core.oversized(b"g", "greedy", 2**26, 2**24)
    assert code_of(out) == Code.PUB_TOO_LARGE
    assert bench.denied()[0].target == "pub_bytes_max"


def test_the_hold_is_bounded_per_app_by_bytes_and_count() -> None:
    bench = Bench(persistence=True, caps=Caps(held_bytes=3 * 2**20, held_messages=10))
    payload = b"x" * (2**20 - 100)
    refused = []
    for n in range(5):
        out = bench.send(b"g", "greedy", [P.PUB, bench.header("x.y"), payload])
        refused += [n for o in out if o[1][0] == P.ERROR]
    assert refused == [3, 4]
    assert code_of(bench.send(b"g", "greedy", [P.PUB, bench.header("x.y"), payload])) == 414
    for _ in range(10):  # the neighbour has a hold of its own
        assert bench.send(b"c", "calm", [P.PUB, bench.header("x.y"), b"small"]) == []
    assert code_of(bench.send(b"c", "calm", [P.PUB, bench.header("x.y"), b"small"])) == 414
    assert bench.core.held == 13
    assert {d.target for d in bench.denied()} == {"held_bytes", "held_messages"}


def dead(size: int = 10) -> Delivery:
    return Delivery(1, b"", "pub", 0, "t.x", b"\0" * 16, b"h", b"x" * size)


def test_an_app_over_its_dlq_quota_loses_its_own_oldest_never_another_apps() -> None:
    caps = {"flood": Caps(dlq_entries=100), "victim": Caps(dlq_entries=100)}
    dlq = DeadLetterQueue(max_entries=150, caps_of=caps.__getitem__)
    victims = [dlq.add(dead(), "rejected", "victim", "v", 0) for _ in range(3)]
    flood = [dlq.add(dead(), "rejected", "flood", "f", 0) for _ in range(10_240)]
    assert [e.entry_id for e in dlq.entries() if e.app_id == "victim"] == victims
    assert [e.entry_id for e in dlq.entries() if e.app_id == "flood"] == flood[-100:]
    assert dlq.over_quota == {"flood": 10_140} and dlq.dropped == 10_140
    assert dlq.take(victims[0]) is not None and dlq.count_of("victim") == 2
    assert dlq.purge((victims[1], 10**9)) == [victims[1]]


def test_a_full_dlq_drops_from_the_app_holding_the_most() -> None:
    dlq = DeadLetterQueue(max_entries=10)
    small = [dlq.add(dead(), "rejected", "small", "s", 0) for _ in range(2)]
    for _ in range(20):
        dlq.add(dead(), "rejected", "big", "b", 0)
    assert [e.entry_id for e in dlq.entries() if e.app_id == "small"] == small
    assert dlq.count_of("big") == 8 and dlq.over_quota == {}
    by_bytes = DeadLetterQueue(max_entries=100, max_bytes=1000)
    keep = by_bytes.add(dead(100), "rejected", "small", "s", 0)
    for _ in range(20):
        by_bytes.add(dead(300), "rejected", "big", "b", 0)
    assert keep in by_bytes.ids()


def test_the_router_reports_a_dlq_quota_overflow_once_per_pass() -> None:
    bench = Bench(caps=Caps(dlq_entries=5))
    bench.hello(b"g", "greedy", "g")
    session = bench.router.sessions.by_peer[b"g"]
    for _ in range(12):
        bench.router.dead(session, dead(), "rejected")
    denied = [d for d in bench.denied() if d.target == "dlq_entries"]
    assert [(d.app, d.code) for d in denied] == [("greedy", Code.DLQ_QUOTA)]
    [notice] = bench.notices("dlq_entries")
    assert notice["count"] == 7
    assert bench.router.dlq.count_of("greedy") == 5
