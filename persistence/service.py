"""The persistence service: the broker's event stream into LMDB, and queries out of it.

One thread, one poll loop (the broker's shape):

1. take event batches from the SUB socket (and EVDATA re-sends on the link), contiguous
   after the watermark, fetching any gap from the broker;
2. group-commit what arrived as soon as nothing more is readable (or a batch is big), one
   synced transaction per environment, then EVACK the new watermark so the broker sends
   the CONFIRMs that waited for it: under load batches grow, idle the latency is one fsync;
3. answer HISTORY and REPLAY on the query socket (ZAP PLAIN; the app's subscribe
   permissions decide what it may read; sealed payloads are opened for it);
4. once a second: retention (persistence.retention) and a re-read of the key ring when
   `plexus keys rotate` changed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import zmq

from broker import events as E
from broker import protocol as P
from broker.codec import pack, required_int, required_text, unpack_map
from broker.errors import Code, ProtocolViolation, WireError, error_body
from broker.logs import event
from broker.paths import PlatformPaths
from broker.permissions import Authorizer, permissions_of
from broker.recovery import SEGMENTS_DIR, STATE_FILE
from broker.server import ManifestCatalog
from broker.topics import is_literal, pattern_matches, pattern_tokens, validate_topic
from persistence import queries as Q
from persistence.keyring import KeyRing
from persistence.link import BrokerLink, EventFeed
from persistence.retention import RetentionPolicy, plan_retention
from persistence.segments import StoredMessage
from persistence.state import StateStore
from persistence.store import MessageStore, SegmentPolicy
from persistence.writer import StoreWriter
from security.credentials import CredentialStore
from security.zap import answer_zap, bind_zap

log = logging.getLogger("plexus.persistence")

_BIG_BATCH = 20_000
_HOUSEKEEPING_NS = 1_000_000_000
_ACK_IDLE_NS = 1_000_000_000
_RETRY_NS = 1_000_000_000
_COMMIT_WINDOW_MS = 5
_COMMIT_WINDOW_NS = _COMMIT_WINDOW_MS * 1_000_000
_MIN_WAIT_NS = 1_000_000
STORAGE_ALERT_TOPIC = "$sys.alerts.storage"


@dataclass(frozen=True, slots=True)
class PersistenceConfig:
    paths: PlatformPaths
    apps_dir: Path | None = None
    segments: SegmentPolicy = field(default_factory=SegmentPolicy)
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    sensitive_topics: Sequence[str] = ()


class PersistenceService:
    """Binds on `bind()`, serves in `run()`; constructing opens the store."""

    def __init__(
        self,
        config: PersistenceConfig,
        token: str,
        context: zmq.Context[Any] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self._clock = clock
        self._context = context or zmq.Context.instance()
        paths = config.paths
        paths.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keys = KeyRing.open(paths.keys_dir, clock)
        self.messages = MessageStore(
            paths.store_dir / SEGMENTS_DIR, readonly=False, policy=config.segments, clock=clock
        )
        self.state = StateStore(paths.store_dir / STATE_FILE, readonly=False)
        self.writer = StoreWriter(self.messages, self.state, self.keys, config.sensitive_topics)
        self.feed = EventFeed(self.writer.watermark)
        self._pending: list[E.Event] = []
        self._token = token
        self._credentials = CredentialStore(paths.creds_dir)
        self._catalog = ManifestCatalog(config.apps_dir)
        self.link: BrokerLink | None = None
        self._sub: zmq.Socket[bytes] | None = None
        self._query: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._next_housekeeping = 0
        self._warned = False
        self._retry_at = 0
        self._pending_since = 0
        self.commits = 0

    def bind(self) -> None:
        paths = self.config.paths
        self._zap = bind_zap(self._context)
        query: zmq.Socket[bytes] = self._context.socket(zmq.ROUTER)
        query.linger = 0
        query.plain_server = True
        query.zap_domain = P.ZAP_DOMAIN.encode()
        query.maxmsgsize = 64 * 1024
        query.bind(paths.store_endpoint())
        self._query = query
        sub: zmq.Socket[bytes] = self._context.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 100_000
        sub.setsockopt(zmq.SUBSCRIBE, E.EV)
        sub.connect(paths.events_endpoint())
        self._sub = sub
        self.link = BrokerLink(self._context, paths.bus_endpoint(), self._token)
        self.link.hello()
        event(
            log,
            "persistence-listening",
            store=paths.store_endpoint(),
            watermark=self.writer.watermark,
            segments=len(self.messages.segments()),
        )

    def close(self) -> None:
        """Take what the broker published before it stopped, commit it, close."""
        if self._sub is not None:
            while self._sub.poll(200):
                self._from_stream(self._sub)
        self._commit()
        for sock in (self._sub, self._query, self._zap):
            if sock is not None:
                sock.close(linger=0)
        if self.link is not None:
            self.link.close()
        self.messages.close()
        self.state.close()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        sub, query, zap, link = self._sub, self._query, self._zap, self.link
        assert sub is not None and query is not None and zap is not None and link is not None
        poller = zmq.Poller()
        for sock in (sub, query, zap, link.socket):
            poller.register(sock, zmq.POLLIN)
        while not should_stop():
            busy = self._pending and not self._retry_at
            ready = dict(poller.poll(_COMMIT_WINDOW_MS if busy else 100))
            if zap in ready:
                answer_zap(zap, self._credentials, P.ZAP_DOMAIN)
            if link.socket in ready:
                self._from_broker(link)
            if sub in ready:
                self._from_stream(sub)
            if self._commit_due(bool(ready)):
                self._commit()
            if query in ready:
                self._answer_query(query)
            self._tick(link)

    def _commit_due(self, more_waiting: bool) -> bool:
        """Group commit: when a big batch is pending, or the stream paused, or the oldest
        pending event has waited the commit window (a few ms: one fsync pair then serves
        every event of the window instead of nearly one per event at moderate rates)."""
        if not self._pending:
            return False
        if len(self._pending) >= _BIG_BATCH:
            return True
        waited = time.monotonic_ns() - self._pending_since
        return waited >= _COMMIT_WINDOW_NS or (not more_waiting and waited >= _MIN_WAIT_NS)

    def _tick(self, link: BrokerLink) -> None:
        if not link.welcomed:
            link.hello()
        elif link.idle_for_ns() >= _ACK_IDLE_NS:
            link.ack(self.writer.watermark)  # doubles as the link's heartbeat
            if link.synced:  # and asks for anything newer (a lost last batch shows up here)
                link.fetch(self.feed.received + 1)
        feed = self.feed
        now = time.monotonic_ns()
        if feed.fetching_from and link.synced and now - feed.fetch_sent_ns > 500_000_000:
            feed.fetch_sent_ns = now
            link.fetch(feed.fetching_from)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_NS
            self._housekeeping(link)

    def _from_stream(self, sub: zmq.Socket[bytes]) -> None:
        for _ in range(256):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 3:
                self._ingest(frames[1], frames[2])

    def _ingest(self, head: bytes, blob: bytes) -> int:
        """Take one batch; returns how many new events it brought."""
        try:
            _epoch, first = E.decode_head(head)
            fresh, gap = self.feed.take(first, blob)
        except ProtocolViolation as exc:
            event(log, "event-batch-malformed", logging.ERROR, error=str(exc))
            return 0
        if fresh and not self._pending:
            self._pending_since = time.monotonic_ns()
        self._pending.extend(fresh)
        if gap is not None and not self.feed.fetching_from:
            self.feed.fetching_from = gap
            self.feed.fetch_sent_ns = 0  # ask at the next tick
            event(log, "event-gap", logging.WARNING, fetch_from=gap)
        return len(fresh)

    def _from_broker(self, link: BrokerLink) -> None:
        while (message := link.receive()) is not None:
            command, frames = message
            if command == P.WELCOME:
                link.welcomed = True
                self._commit()  # the broker rebuilds from the store: it must be complete
                link.sync(self.writer.watermark)
            elif command == P.EVSYNCOK:
                link.synced = True
                body = unpack_map(frames[1], "EVSYNCOK")
                event(log, "persistence-synced", watermark=self.writer.watermark, **body)
                if body.get("next", 0) > self.writer.watermark + 1:
                    self.feed.fetching_from = self.feed.received + 1
                    self.feed.fetch_sent_ns = 0
            elif command == P.EVDATA and len(frames) == 3:
                # a re-send is bounded: keep asking until the broker has nothing more
                if self._ingest(frames[1], frames[2]) > 0:
                    link.fetch(self.feed.received + 1)
                else:
                    self.feed.fetching_from = 0
            elif command == P.ERROR:
                link.on_error(frames, self.feed)

    def _commit(self) -> None:
        if not self._pending or time.monotonic_ns() < self._retry_at:
            return
        pending, self._pending = self._pending, []
        try:
            watermark = self.writer.commit(pending)
        except lmdb.Error as exc:  # disk full, I/O error: keep the events, retry, never crash
            self._pending = pending + self._pending
            self._write_failed(exc)
            return
        self._retry_at = 0
        self.commits += 1
        if self.link is not None and self.link.welcomed:
            self.link.ack(watermark)

    def _write_failed(self, exc: lmdb.Error) -> None:
        """The broker keeps the events (unacknowledged) and their publishers unconfirmed;
        free space by retention and try again in a second."""
        self._retry_at = time.monotonic_ns() + _RETRY_NS
        notice = {
            "what": "the store cannot write",
            "error": f"{type(exc).__name__}: {exc}",
            "pending_events": len(self._pending),
            "hint": "free disk space under HOME/store or lower [persistence] max_size_mb",
        }
        event(log, "store-write-failed", logging.ERROR, **notice)
        if self.link is not None and self.link.welcomed:
            self.link.alert(STORAGE_ALERT_TOPIC, notice)
            self._housekeeping(self.link)

    # -- retention --------------------------------------------------------------------------

    def _housekeeping(self, link: BrokerLink) -> None:
        self.keys.refresh()
        self.messages.refresh()
        plan = plan_retention(
            self.messages.segments(),
            self.messages.active_first_seq,
            self.messages.total_bytes(),
            self._clock(),
            self.config.retention,
        )
        freed = sum(self.messages.delete(first) for first in plan.delete)
        if plan.delete:
            event(
                log,
                "retention-deleted",
                segments=len(plan.delete),
                expired=plan.expired,
                for_size=plan.for_size,
                freed_bytes=freed,
            )
        if plan.warn and not self._warned:
            notice = {
                "what": "storage near its size limit",
                "bytes": plan.bytes_after,
                "limit": self.config.retention.max_bytes,
                "over_limit": plan.over_limit,
                "hint": "raise [persistence].max_size_mb or lower max_age_s",
            }
            event(log, "storage-near-limit", logging.WARNING, **notice)
            if link.welcomed:
                link.alert(STORAGE_ALERT_TOPIC, notice)
        self._warned = plan.warn

    # -- queries ----------------------------------------------------------------------------

    def _answer_query(self, query: zmq.Socket[bytes]) -> None:
        for _ in range(8):
            try:
                first = query.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer = first.bytes
            frames = query.recv_multipart(copy=False)
            user_id = frames[0].get("User-Id")
            app_id = user_id if isinstance(user_id, str) else ""
            try:
                body = self._query_body(app_id, [frame.bytes for frame in frames])
                reply = [Q.RESULT, pack(body)]
            except WireError as exc:
                reply = [Q.ERROR, pack(error_body(exc.code, exc.detail, exc.ref))]
            except Exception:  # a bug or a broken store costs one answer, never the service
                log.exception("query failed for %s", app_id)
                failed = error_body(Code.INTERNAL, "the persistence service failed on this query")
                reply = [Q.ERROR, pack(failed)]
            query.send_multipart([peer, *reply])

    def _query_body(self, app_id: str, frames: list[bytes]) -> dict[str, Any]:
        if len(frames) != 2 or frames[0] not in Q.COMMANDS:
            raise ProtocolViolation(Code.UNKNOWN_COMMAND, "send HISTORY or REPLAY with a body")
        body = unpack_map(frames[1])
        authorizer = Authorizer(app_id, permissions_of(app_id, self._catalog.permissions))
        if frames[0] == Q.HISTORY:
            topic = required_text(body, "topic")
            validate_topic(topic)
            authorizer.check_subscribe(topic)
            last = required_int(body, "last", 1, Q.MAX_HISTORY)
            found = self.messages.history(topic, last)
            return {"messages": [self._row(m) for m in found], "done": True}
        pattern = required_text(body, "pattern")
        pattern_tokens(pattern)
        authorizer.check_subscribe(pattern)
        since = required_int(body, "since", 0, 2**63)
        until = body.get("until")
        until = until if type(until) is int else None
        after = body.get("after", 0)
        after = after if type(after) is int and after >= 0 else 0
        match = _matcher(pattern)
        rows: list[list[Any]] = []
        size = 0
        last_seq = after
        literal = pattern if is_literal(pattern) else None
        for message in self.messages.scan(since, after, match, literal):
            if until is not None and message.ts_ns > until:
                return {"messages": rows, "after": last_seq, "done": True}
            rows.append(self._row(message))
            last_seq = message.seq
            size += len(message.payload) + len(message.header)
            if len(rows) >= Q.PAGE_MESSAGES or size >= Q.PAGE_BYTES:
                return {"messages": rows, "after": last_seq, "done": False}
        return {"messages": rows, "after": last_seq, "done": True}

    def _row(self, message: StoredMessage) -> list[Any]:
        payload = message.payload
        if message.sealed:
            payload = self.keys.open_sealed(message.msg_id, message.topic, payload)
        return [message.seq, message.ts_ns, message.sender, message.header, payload]


def _matcher(pattern: str) -> Callable[[str], bool]:
    if is_literal(pattern):
        return pattern.__eq__
    return lambda topic: pattern_matches(pattern, topic)
