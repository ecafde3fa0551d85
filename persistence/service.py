"""The persistence service: the broker's event stream into LMDB, and queries out of it.

One thread, one poll loop (the broker's shape):

1. follow the event stream as `$persistence` (clients.stream: batches from the SUB
   socket and EVDATA re-sends, contiguous after the watermark, gaps fetched);
2. group-commit what arrived as soon as nothing more is readable (or a batch is big), one
   synced transaction per environment, then EVACK the new watermark so the broker sends
   the CONFIRMs that waited for it: under load batches grow, idle the latency is one fsync;
3. on WELCOME, commit what is pending, then EVSYNC; when the broker's EVSYNCOK asks for a
   restore (it restarted), send it the durable state as EVRESTORE pages
   (persistence.restore): the broker never opens the store nor the key ring;
4. answer HISTORY and REPLAY on the query socket (persistence.answers);
5. once a second: retention (persistence.retention) and a re-read of the key ring when
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

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.catalog import ManifestCatalog
from broker.logs import event
from broker.paths import PlatformPaths
from clients.stream import StreamConsumer
from persistence.answers import QueryAnswers
from persistence.restore import RestoreReader
from persistence.retention import RetentionPolicy, plan_retention
from persistence.state import StateStore
from persistence.store import MessageStore, SegmentPolicy
from persistence.writer import StoreWriter
from security.credentials import CredentialStore
from security.keyring import KeyRing
from security.zap import answer_zap, bind_zap

log = logging.getLogger("plexus.persistence")

_BIG_BATCH = 20_000
_HOUSEKEEPING_NS = 1_000_000_000
_RETRY_NS = 1_000_000_000
_IDLE_POLL_MS = 100
STORAGE_ALERT_TOPIC = "$sys.alerts.storage"


def group_complete(pending: int, drained: bool) -> bool:
    """Group commit that adapts, as databases do behind a running fsync: a loop pass reads
    everything waiting (the sockets until empty, or up to the read limit) and commits it
    as one group, so a lone event is committed at once (no window, no timer) and what
    arrives during a commit is the next group: groups grow with the load. A read cut
    short by its limit commits too once a big batch is pending."""
    return pending > 0 and (drained or pending >= _BIG_BATCH)


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
            paths.segments_dir, readonly=False, policy=config.segments, clock=clock
        )
        self.state = StateStore(paths.state_path, readonly=False)
        self.writer = StoreWriter(self.messages, self.state, self.keys, config.sensitive_topics)
        self.answers = QueryAnswers(self.messages, self.keys, ManifestCatalog(config.apps_dir))
        self._pending: list[R.Event] = []
        self._token = token
        self._credentials = CredentialStore(paths.creds_dir)
        self.stream: StreamConsumer | None = None
        self._query: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._next_housekeeping = 0
        self._warned = False
        self._retry_at = 0
        self.commits = 0
        self.restores = 0

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
        self.stream = StreamConsumer(
            self._context,
            paths.bus_endpoint(),
            paths.events_endpoint(),
            P.PERSISTENCE_ID,
            self._token,
            watermark=self.writer.watermark,
            session="store",
        )
        self.stream.start()
        event(
            log,
            "persistence-listening",
            store=paths.store_endpoint(),
            watermark=self.writer.watermark,
            segments=len(self.messages.segments()),
        )

    def close(self) -> None:
        """Take what the broker published before it stopped, commit it, close."""
        stream = self.stream
        if stream is not None:
            while stream.sub.poll(200):
                self._take(stream.read_stream())
        self._commit()
        for sock in (self._query, self._zap):
            if sock is not None:
                sock.close(linger=0)
        if stream is not None:
            stream.close()
        self.messages.close()
        self.state.close()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool]) -> None:
        stream, query, zap = self.stream, self._query, self._zap
        assert stream is not None and query is not None and zap is not None
        poller = zmq.Poller()
        for sock in (*stream.sockets(), query, zap):
            poller.register(sock, zmq.POLLIN)
        while not should_stop():
            busy = self._pending and not self._retry_at
            ready = dict(poller.poll(0 if busy else _IDLE_POLL_MS))
            if zap in ready:
                answer_zap(zap, self._credentials, P.ZAP_DOMAIN)
            fresh, controls = stream.read(ready)
            self._take(fresh)
            for control in controls:
                self._on_control(stream, control)
            if self._commit_due(stream.drained):
                self._commit()
            if query in ready:
                self.answers.serve(query)
            self._tick(stream)

    def _commit_due(self, drained: bool) -> bool:
        return group_complete(len(self._pending), drained)

    def _tick(self, stream: StreamConsumer) -> None:
        stream.tick(self.writer.watermark)
        now = time.monotonic_ns()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_NS
            self._housekeeping(stream)

    def _take(self, fresh: list[R.Event]) -> None:
        self._pending.extend(fresh)

    def _on_control(self, stream: StreamConsumer, control: wire.Welcome | wire.EvSyncOk) -> None:
        if isinstance(control, wire.Welcome):
            self._commit()  # what the broker may ask to restore must be in the store
            stream.sync(self.writer.watermark)
            return
        event(
            log,
            "persistence-synced",
            watermark=self.writer.watermark,
            next=control.next,
            epoch=control.epoch,
            restore=control.restore,
        )
        if control.restore:
            self._send_restore(stream)

    def _send_restore(self, stream: StreamConsumer) -> None:
        """The broker restarted and waits: send it the durable state, page by page."""
        self._commit()
        started = time.monotonic_ns()
        reader = RestoreReader(self.messages, self.state, self.keys)
        pages = 0
        watermark = 0
        for page in reader.pages():
            stream.link.send(page.frames())
            pages += 1
            watermark = page.watermark
        # the new broker numbers its events after the store's watermark: events between
        # ours and it died with the old broker unstored, and events still pending beyond
        # it (a commit that failed, e.g. disk full) came from the old broker: never stored,
        # never confirmed, their seqs about to be reused, so they go
        dropped = [e for e in self._pending if e.seq > watermark]
        if dropped:
            self._pending = [e for e in self._pending if e.seq <= watermark]
            event(log, "restore-dropped-pending", logging.WARNING, events=len(dropped))
        stream.feed.continue_after(watermark)
        self.restores += 1
        event(
            log,
            "restore-sent",
            pages=pages,
            rows=reader.rows,
            skipped=reader.skipped,
            watermark=watermark,
            ms=round((time.monotonic_ns() - started) / 1e6, 1),
        )

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
        if self.stream is not None:
            self.stream.ack(watermark)

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
        if self.stream is not None and self.stream.link.welcomed:
            self.stream.link.alert(STORAGE_ALERT_TOPIC, notice)
            self._housekeeping(self.stream)

    # -- retention --------------------------------------------------------------------------

    def _housekeeping(self, stream: StreamConsumer) -> None:
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
            if stream.link.welcomed:
                stream.link.alert(STORAGE_ALERT_TOPIC, notice)
        self._warned = plan.warn
