"""The persistence service against a scripted broker: real sockets, real LMDB, the link of
docs/protocol.md §14.4-14.5 played step by step (HELLO, EVSYNC, EVSYNCOK with and without
restore, EVRESTORE pages, EVACK after the group commit, EVFETCH for a gap, EVDATA, a
broker restart), and the query socket answering with the wire records.

The broker is a ROUTER and a PUB in the test's own context, authenticating with the
platform's ZAP handler and credentials as the real one does, so this runs without the
real broker's side of the link.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.codec import encode_pub_header, encode_sids
from broker.errors import Code
from broker.manifests import Permissions
from broker.paths import PlatformPaths
from broker.recovery import RecoveryReport, apply_restore
from broker.router import Router
from persistence.restore import RestoreReader
from persistence.service import PersistenceConfig, PersistenceService
from security.credentials import ServerKeys
from security.grant_channel import GrantReceiver
from security.grants import GrantKind, GrantRegistry
from security.peers import LiveProcessTree
from security.zap import answer, bind_zap
from supervisor.identity import Identities
from tests.conftest import authenticate, wait_for, write_manifest

TIMEOUT_MS = 5_000
TS = 1_700_000_000_000_000_000


class FakeBroker:
    """The broker's end of the link and of the event stream, driven by the test."""

    def __init__(self, paths: PlatformPaths, identities: Identities) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.identities = identities
        self.registry = GrantRegistry(os.getuid(), LiveProcessTree())
        self.zap = bind_zap(self.context)
        self.bus = self._server(zmq.ROUTER, paths.bus_endpoint())
        self.events = self._server(zmq.PUB, paths.events_endpoint())
        self.peer = b""
        self.epoch = 1
        self.authenticated: list[str] = []
        self.retained: dict[int, R.EventRecord] = {}
        """What the broker keeps for a consumer's EVFETCH (a PUB batch may be lost)."""

    def _server(self, kind: int, endpoint: str) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        self.identities.broker_keys.serve(sock)
        sock.zap_domain = P.ZAP_DOMAIN.encode()
        sock.linger = 0
        sock.bind(endpoint)
        return sock

    def close(self) -> None:
        for sock in (self.bus, self.events, self.zap):
            sock.close()
        self.context.term()

    def mint(self, app_id: str) -> str:
        """A credential for `app_id` in this process, known here and to the store."""
        grant, credential = self.identities.grant(app_id, GrantKind.SERVICE, pid=os.getpid())
        self.registry.register(grant)
        return credential.token

    def authenticate(self, timeout_ms: int = 0) -> None:
        while self.zap.poll(timeout_ms):
            got = answer(self.zap, self.registry, {P.ZAP_DOMAIN: None})
            assert got is not None and got.accepted, f"{got} refused"
            assert got.admission.grant is not None
            self.authenticated.append(f"{got.mechanism}:{got.admission.grant.app_id}")
            timeout_ms = 0

    def expect(self, command: bytes) -> list[bytes]:
        """The next link message with `command` (heartbeat EVACKs and EVFETCHes of nothing
        new pass by)."""
        poller = zmq.Poller()
        poller.register(self.bus, zmq.POLLIN)
        poller.register(self.zap, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(TIMEOUT_MS))
            assert ready, f"persistence sent no {command!r}"
            self.authenticate()
            if self.bus not in ready:
                continue
            self.peer, *frames = self.bus.recv_multipart()
            if frames[0] == command:
                return frames
            if frames[0] == P.EVFETCH:
                self._resend(wire.EvFetch.decode(frames).first)

    def _resend(self, first: int) -> None:
        """EVDATA from `first` when retained (empty past the end), as the broker does."""
        last = max(self.retained, default=0)
        if first > last:
            self.reply(wire.EvData(R.batch_head(self.epoch, first), b"").frames())
        elif first in self.retained:
            records = [self.retained[seq] for seq in range(first, last + 1)]
            self.reply(wire.EvData(*_batch(self.epoch, first, records)).frames())

    def reply(self, frames: list[bytes]) -> None:
        self.bus.send_multipart([self.peer, *frames])

    def welcome(self) -> int:
        """Answer HELLO; returns the watermark of the EVSYNC that follows."""
        hello = wire.Hello.decode(self.expect(P.HELLO))
        assert hello.session == "store"
        self.reply(
            wire.Welcome(1, P.PERSISTENCE_ID, "store", False, (), 1000, 10_000, 0, 256).frames()
        )
        return wire.EvSync.decode(self.expect(P.EVSYNC)).wm

    def restore(self, next_seq: int) -> list[wire.EvRestore]:
        self.reply(wire.EvSyncOk(next_seq, self.epoch, restore=True).frames())
        pages = [wire.EvRestore.decode(self.expect(wire.EVRESTORE))]
        while not pages[-1].done:
            pages.append(wire.EvRestore.decode(self.expect(wire.EVRESTORE)))
        return pages

    def publish(self, first: int, records: list[R.EventRecord]) -> None:
        self.authenticate()
        for seq, record in enumerate(records, start=first):
            self.retained[seq] = record
        self.events.send_multipart([R.EV, *_batch(self.epoch, first, records)])

    def acked_up_to(self, watermark: int) -> None:
        while wire.EvAck.decode(self.expect(P.EVACK)).wm < watermark:
            pass


def _batch(epoch: int, first: int, records: list[R.EventRecord]) -> list[bytes]:
    blob = b"".join(
        R.encode_event(seq, TS + seq, record) for seq, record in enumerate(records, start=first)
    )
    return [R.batch_head(epoch, first), blob]


def _published(seq: int, durable_for: str = "", sensitive: bool = False) -> R.Published:
    msg_id = seq.to_bytes(16, "big")
    targets: list[R.Target] = [[durable_for, "s1", encode_sids((1,))]] if durable_for else []
    header = encode_pub_header(msg_id, "t.a")
    return R.Published("pub", "p", "t.a", msg_id, "", "", sensitive, header, b"m%d" % seq, targets)


@dataclass
class Running:
    paths: PlatformPaths
    broker: FakeBroker
    service: PersistenceService
    stop: threading.Event
    thread: threading.Thread
    context: zmq.Context[Any]
    crashed: bool = False

    def crash(self) -> None:
        """What kill -9 leaves: the loop gone, nothing applied, nothing closed cleanly."""
        self.stop.set()
        self.thread.join(10)
        service = self.service
        if service.journal is not None:
            service.journal.close(clean=False)
        service.messages.close()
        service.state.close()
        self.crashed = True


@contextlib.contextmanager
def _running(root: Path, monotonic: Callable[[], int] = time.monotonic_ns) -> Iterator[Running]:
    paths = PlatformPaths(root)
    paths.prepare()
    apps = root / "apps"
    apps.mkdir()
    write_manifest(apps, "reader", '[permissions]\nsubscribe = ["t.>"]\n')
    identities = Identities()
    broker = FakeBroker(paths, identities)
    context: zmq.Context[Any] = zmq.Context()
    token = broker.mint(P.PERSISTENCE_ID)
    channel = identities.service_channel("persistence")
    grants = GrantReceiver(os.dup(channel.channel_fd))  # in this process: its own copy
    identities.attach("persistence", channel)
    service = PersistenceService(
        PersistenceConfig(paths, apps),
        token,
        identities.store_keys,
        grants,
        context,
        monotonic=monotonic,
    )
    service.bind()
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop.is_set,), daemon=True)
    thread.start()
    running = Running(paths, broker, service, stop, thread, context)
    try:
        yield running
    finally:
        stop.set()
        thread.join(10)
        if not running.crashed:
            service.close()
        context.destroy(linger=0)
        broker.close()
        identities.close()


@pytest.fixture
def running(short_tmp: Path) -> Iterator[Running]:
    with _running(short_tmp) as running:
        yield running


@pytest.fixture
def frozen(short_tmp: Path) -> Iterator[Running]:
    """The service's monotonic clock stands still: journaled events go to LMDB only when
    something reads the store (or 128 wait), never because time passed."""
    with _running(short_tmp, monotonic=lambda: 0) as running:
        yield running


def _synced(broker: FakeBroker) -> None:
    broker.welcome()
    broker.restore(next_seq=1)
    while len(broker.authenticated) < 2:  # the link, then the SUB socket on the events
        broker.authenticate(TIMEOUT_MS)


def _history(paths: PlatformPaths, broker: FakeBroker, topic: str) -> list[int]:
    """Seqs HISTORY answers for `topic` (as app reader)."""
    context: zmq.Context[Any] = zmq.Context()
    query: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    query.linger = 0
    authenticate(query, broker.mint("reader"), store=True)
    query.connect(paths.store_endpoint())
    try:
        query.send_multipart(wire.History(topic, 10).frames())
        assert query.poll(TIMEOUT_MS)
        return [row[0] for row in wire.Result.decode(query.recv_multipart()).messages]
    finally:
        query.close()
        context.term()


def test_a_small_group_is_acknowledged_from_the_journal_and_read_from_lmdb(
    frozen: Running,
) -> None:
    _synced(frozen.broker)
    frozen.broker.publish(1, [_published(1), _published(2)])
    frozen.broker.acked_up_to(2)  # confirmed: stored and synced...
    service = frozen.service
    assert (service.journaled, service.writer.stored) == (2, 0)  # ...in the journal alone
    assert _history(frozen.paths, frozen.broker, "t.a") == [1, 2]  # a query sees what was confirmed
    assert service.writer.stored == 2


def test_groups_with_sealed_payloads_never_touch_the_journal(frozen: Running) -> None:
    _synced(frozen.broker)
    frozen.broker.publish(1, [_published(1)])
    frozen.broker.acked_up_to(1)
    frozen.broker.publish(2, [_published(2, sensitive=True)])
    frozen.broker.acked_up_to(2)
    service = frozen.service
    assert service.journaled == 1  # the plain one; the sensitive one went to LMDB sealed,
    assert (service.writer.stored, service.writer.sealed) == (2, 1)  # with the one before


def test_a_crash_before_the_apply_loses_nothing(short_tmp: Path) -> None:
    with _running(short_tmp, monotonic=lambda: 0) as run:
        _synced(run.broker)
        run.broker.publish(1, [R.Subscribed("reader", "s1", 1, "t.>", True, False)])
        run.broker.publish(2, [_published(2, durable_for="reader"), _published(3)])
        run.broker.acked_up_to(3)
        assert (run.service.journaled, run.service.writer.stored) == (3, 0)
        run.crash()  # kill -9: nothing applied, nothing closed
        again = PersistenceService(
            PersistenceConfig(run.paths), "token", ServerKeys.generate(), monotonic=lambda: 0
        )
        try:  # the journal's events are applied before the service serves anything
            assert again.watermark == again.writer.watermark == 3
            assert again.writer.stored == 2
            pages = list(RestoreReader(again.messages, again.state, again.keys).pages())
            assert pages[-1].watermark == 3
            assert sum(len(p.sessions) for p in pages) == 1  # the durable subscription
            assert sum(len(p.deliveries) for p in pages) == 1  # and its pending delivery
        finally:
            again.close()


def test_first_sync_an_empty_restore_then_events_stored_and_acked(running: Running) -> None:
    broker = running.broker
    assert broker.welcome() == 0
    (page,) = broker.restore(next_seq=1)
    while len(broker.authenticated) < 2:  # the link, then the SUB socket on the events
        broker.authenticate(TIMEOUT_MS)
    assert broker.authenticated == ["CURVE:$persistence", "CURVE:$persistence"]
    assert page == wire.EvRestore(0, done=True)  # an empty store: one page
    broker.publish(
        1,
        [
            R.Subscribed("reader", "s1", 1, "t.>", True, False),
            R.Routed(b"x" * 16, "pub", "t.a", [["reader", "s1"]]),  # not stored, counted
            _published(3, durable_for="reader"),
            _published(4, sensitive=True),
        ],
    )
    broker.acked_up_to(4)
    assert running.service.writer.stored == 2
    assert running.service.writer.sealed == 1

    # the query socket answers with the wire records, sealed payloads opened
    context: zmq.Context[Any] = zmq.Context()
    query: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    query.linger = 0
    authenticate(query, running.broker.mint("reader"), store=True)
    query.connect(running.paths.store_endpoint())
    try:
        query.send_multipart(wire.History("t.a", 10).frames())
        assert query.poll(TIMEOUT_MS)
        result = wire.Result.decode(query.recv_multipart())
        assert [(row[0], row[4]) for row in result.messages] == [(3, b"m3"), (4, b"m4")]
        query.send_multipart(wire.Replay("x.>", 0).frames())
        assert query.poll(TIMEOUT_MS)
        error = wire.Error.decode(query.recv_multipart())
        assert error.code == int(Code.SUBSCRIBE_DENIED)
    finally:
        query.close()
        context.term()


def test_a_gap_is_fetched_and_a_restarted_broker_gets_the_durable_state(
    running: Running,
) -> None:
    broker = running.broker
    broker.welcome()
    broker.restore(next_seq=1)
    while len(broker.authenticated) < 2:
        broker.authenticate(TIMEOUT_MS)
    broker.publish(1, [R.Subscribed("reader", "s1", 1, "t.>", True, False)])
    broker.publish(2, [_published(2, durable_for="reader")])
    broker.acked_up_to(2)

    broker.publish(5, [_published(5, durable_for="reader")])  # 3 and 4 were dropped
    fetch = wire.EvFetch.decode(broker.expect(P.EVFETCH))
    while fetch.first != 3:
        fetch = wire.EvFetch.decode(broker.expect(P.EVFETCH))
    records: list[R.EventRecord] = [_published(3, durable_for="reader"), _published(4)]
    records.append(_published(5, durable_for="reader"))
    broker.reply(wire.EvData(*_batch(broker.epoch, 3, records)).frames())
    broker.acked_up_to(5)

    # the broker restarts: it forgot the link, says so, and asks for a restore
    broker.reply(wire.Error.for_code(Code.NOT_WELCOMED, "send HELLO first").frames())
    broker.epoch = 2
    assert broker.welcome() == 5
    pages = broker.restore(next_seq=1)
    assert all(page.watermark == 5 for page in pages)
    permissions = {"reader": Permissions(subscribe=(">",))}
    router = Router(permissions.get)
    report = RecoveryReport()
    for page in pages:
        apply_restore(router, page, TS, report)
    assert report.done
    assert (report.sessions, report.deliveries, report.recent_ids) == (1, 3, 4)

    # the restarted broker numbers after the watermark; persistence takes it from there
    broker.publish(6, [_published(6)])
    broker.acked_up_to(6)
    assert running.service.restores == 2
    assert running.service.watermark == 6
    wait_for(lambda: running.service.writer.stored == 5)  # journaled, then applied to LMDB
