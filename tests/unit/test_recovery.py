"""broker.recovery.apply_restore: EVRESTORE pages into router state, without a store.

First against a fake router that records what recovery asks of it (the contract:
restore_session, dlq.restore, remember_published, stream.start_after), then the whole path on
real LMDB: events written by StoreWriter, read back as pages by persistence.restore, sent
through the wire record, applied to the real pure Router, which then delivers the
restored backlog to the app that comes back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.codec import decode_sids, encode_pub_header, encode_sids, unpack_map
from broker.delivery import Delivery
from broker.dlq import DeadLetter
from broker.manifests import Permissions
from broker.recovery import RecoveryReport, SessionKey, apply_restore
from broker.router import Router
from persistence.restore import RestoreReader
from persistence.state import StateStore
from persistence.store import MessageStore
from persistence.writer import StoreWriter

NOW = 5_000_000_000
ID = b"\x07" * 16


@dataclass
class FakeLog:
    starts: list[int] = field(default_factory=list)

    def start_after(self, seq: int) -> None:
        self.starts.append(seq)


@dataclass
class FakeDlq:
    entries: list[DeadLetter] = field(default_factory=list)

    def restore(self, entry: DeadLetter) -> None:
        self.entries.append(entry)


class FakeRouter:
    def __init__(self, apps: set[str]) -> None:
        self._apps = apps
        self.stream = FakeLog()
        self.dlq = FakeDlq()
        self.sessions: dict[SessionKey, tuple[dict[int, str], list[Delivery], int]] = {}
        self.published: list[tuple[str, bytes, int, int]] = []

    def restore_session(
        self,
        key: SessionKey,
        subscriptions: dict[int, str],
        deliveries: list[Delivery],
        now_ns: int,
    ) -> bool:
        if key[0] not in self._apps:
            return False
        assert key not in self.sessions, "a session is restored once, whole"
        self.sessions[key] = (subscriptions, deliveries, now_ns)
        return True

    def remember_published(
        self, sender: str, msg_id: bytes, stored_seq: int, stored_ts_ns: int
    ) -> None:
        self.published.append((sender, msg_id, stored_seq, stored_ts_ns))


def delivery_row(app: str, session: str, seq: int, payload: bytes = b"p") -> tuple[Any, ...]:
    return (app, session, seq, [1, 2], "pub", seq * 10, "t.a", ID, b"hdr", payload, False)


def dead_row(entry_id: int) -> tuple[Any, ...]:
    return (
        *(entry_id, "nacked", "sub", "s1", 99, 4, "boom", 0),
        *("pub", 42, "t.a", ID, b"hdr", b"dead", True, [3]),
    )


def wired(page: wire.EvRestore) -> wire.EvRestore:
    return wire.EvRestore.decode(page.frames())


def test_an_empty_store_is_one_page_and_restores_nothing() -> None:
    router = FakeRouter({"sub"})
    report = RecoveryReport()
    apply_restore(router, wired(wire.EvRestore(0, done=True)), NOW, report)
    assert report.done
    assert router.stream.starts == [0]
    assert (router.sessions, router.dlq.entries, router.published) == ({}, [], [])
    assert asdict(report) == {
        "watermark": 0,
        "pages": 1,
        "sessions": 0,
        "subscriptions": 0,
        "deliveries": 0,
        "dead_letters": 0,
        "recent_ids": 0,
        "skipped": 0,
        "done": True,
    }


def test_a_sessions_backlog_spanning_pages_is_restored_once_in_order() -> None:
    router = FakeRouter({"sub"})
    report = RecoveryReport()
    pages = [
        wire.EvRestore(
            40,
            sessions=(("sub", "s1", {1: "t.>", 2: "t.a"}),),
            deliveries=(delivery_row("sub", "s1", 3), delivery_row("sub", "s1", 5)),
        ),
        wire.EvRestore(40, deliveries=(delivery_row("sub", "s1", 8, b"last"),)),
        wire.EvRestore(40, recent=(("pub", ID, 8, 80),), done=True),
    ]
    for page in pages[:2]:
        apply_restore(router, wired(page), NOW, report)
        assert router.sessions == {}  # not before the last page: the backlog may go on
        assert not report.done
    apply_restore(router, wired(pages[2]), NOW, report)
    subscriptions, deliveries, now = router.sessions["sub", "s1"]
    assert (subscriptions, now) == ({1: "t.>", 2: "t.a"}, NOW)
    assert [d.stored_seq for d in deliveries] == [3, 5, 8]
    last = deliveries[-1]
    assert (last.sender, last.timestamp_ns, last.topic, last.msg_id) == ("pub", 80, "t.a", ID)
    assert (last.header, last.payload, last.sensitive) == (b"hdr", b"last", False)
    assert decode_sids(last.sids) == decode_sids(last.durable_sids) == [1, 2]
    assert router.stream.starts == [40, 40, 40]
    assert router.published == [("pub", ID, 8, 80)]
    assert (report.sessions, report.subscriptions, report.deliveries) == (1, 2, 3)
    assert (report.pages, report.watermark, report.recent_ids) == (3, 40, 1)


def test_dead_letters_keep_their_ids_and_recent_ids_keep_their_order() -> None:
    router = FakeRouter(set())
    report = RecoveryReport()
    recent = (("pub", b"a" * 16, 1, 10), ("pub", b"b" * 16, 2, 20))
    page = wire.EvRestore(2, dead_letters=(dead_row(7), dead_row(9)), recent=recent, done=True)
    apply_restore(router, wired(page), NOW, report)
    assert [e.entry_id for e in router.dlq.entries] == [7, 9]
    entry = router.dlq.entries[0]
    assert (entry.reason, entry.app_id, entry.session, entry.dead_at_ns) == (
        "nacked",
        "sub",
        "s1",
        99,
    )
    d = entry.delivery
    assert (d.attempt, d.last_error, d.stored_seq, d.sensitive) == (4, "boom", 0, True)
    assert (d.sender, d.timestamp_ns, d.payload, decode_sids(d.sids)) == ("pub", 42, b"dead", [3])
    assert router.published == list(recent)
    assert report.dead_letters == 2


def test_gone_apps_orphans_and_malformed_rows_are_skipped_not_fatal() -> None:
    router = FakeRouter({"sub"})
    report = RecoveryReport()
    bad_delivery = ("sub", "s1", "not-a-seq", [1], "pub", 1, "t.a", ID, b"h", b"p", False)
    bad_sids = ("sub", "s1", 9, ["x"], "pub", 1, "t.a", ID, b"h", b"p", False)
    bad_dead = (1, "nacked", *(None,) * 14)
    page = wire.EvRestore(
        9,
        sessions=(("sub", "s1", {1: "t.>"}), ("removed-app", "s", {1: "t.>"})),
        deliveries=(
            delivery_row("sub", "s1", 1),
            bad_delivery,
            bad_sids,
            delivery_row("removed-app", "s", 2),
            delivery_row("sub", "no-durable-subscription", 3),
        ),
        dead_letters=(bad_dead, dead_row(4)),
        done=True,
    )
    # the wire decoder refuses such rows outright; apply_restore stays defensive for
    # pages built in-process, so this one is applied as built
    apply_restore(router, page, NOW, report)
    assert list(router.sessions) == [("sub", "s1")]
    assert [d.stored_seq for d in router.sessions["sub", "s1"][1]] == [1]
    assert [e.entry_id for e in router.dlq.entries] == [4]
    # 3 malformed rows, the removed app's delivery, the orphan delivery
    assert report.skipped == 5
    assert (report.sessions, report.deliveries, report.dead_letters) == (1, 1, 1)


# -- the whole path, on real LMDB and the real router ---------------------------------------


def _event(seq: int, record: R.EventRecord) -> R.Event:
    (event,) = R.decode_events(R.encode_event(seq, seq * 1_000, record))
    return event


def test_store_to_pages_to_router_restores_a_durable_subscriber(tmp_path: Path) -> None:
    messages = MessageStore(tmp_path / "segments", readonly=False)
    state = StateStore(tmp_path / "state.mdb", readonly=False)
    try:
        writer = StoreWriter(messages, state, None)
        target: list[R.Target] = [["sub", "s1", encode_sids((1,))]]
        events = [_event(1, R.Subscribed("sub", "s1", 1, "t.>", True, False))]
        for seq in range(2, 7):
            msg_id = seq.to_bytes(16, "big")
            header = encode_pub_header(msg_id, "t.a")
            payload = b"m%d" % seq
            events.append(
                _event(
                    seq,
                    R.Published("pub", "p", "t.a", msg_id, "", "", False, header, payload, target),
                )
            )
        events.append(_event(7, R.Acked("sub", "s1", [2], [(2).to_bytes(16, "big")])))
        writer.commit(events)
        pages = list(RestoreReader(messages, state, _NoKeys(), page_rows=3).pages())
    finally:
        messages.close()
        state.close()

    permissions = {"sub": Permissions(subscribe=(">",)), "pub": Permissions(publish=(">",))}
    router = Router(permissions.get)
    report = RecoveryReport()
    for page in pages:
        apply_restore(router, wired(page), NOW, report)
    assert report.done
    assert (report.sessions, report.deliveries, report.recent_ids, report.watermark) == (
        1,
        4,
        5,
        7,
    )

    out = router.handle(b"back", "sub", wire.Hello(session="s1").frames(), NOW + 1)
    welcome = wire.Welcome.decode(out[0][1])
    assert welcome.resumed
    assert welcome.subs == ((1, "t.>"),)
    delivered = [
        item.payload
        for _, frames in out
        if frames[0] == P.DELIVER
        for item in wire.Deliver.decode(frames).items
    ]
    assert delivered == [b"m3", b"m4", b"m5", b"m6"]  # unacked, in publish order

    # a publisher resending a stored message is confirmed, the message not routed again
    router.handle(b"pub", "pub", wire.Hello(session="p").frames(), NOW + 2)
    resend = encode_pub_header((4).to_bytes(16, "big"), "t.a", confirm=True)
    out = router.handle(b"pub", "pub", [P.PUB, resend, b"m4"], NOW + 3)
    assert [(peer, frames[0]) for peer, frames in out] == [(b"pub", P.CONFIRM)]
    assert unpack_map(out[0][1][1])["ids"] == [(4).to_bytes(16, "big")]


class _NoKeys:
    def open_record(self, context: object, sealed: bytes) -> bytes:
        raise AssertionError("nothing here is sealed")
