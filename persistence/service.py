"""The persistence service: the broker's event stream into LMDB, and queries out of it.

One thread, one poll loop (the broker's shape):

1. follow the event stream as `$persistence` (clients.stream: batches from the SUB
   socket and EVDATA re-sends, contiguous after the watermark, gaps fetched);
2. group-commit what arrived as soon as nothing more is readable (or a batch is big), then
   EVACK the new watermark so the broker sends the CONFIRMs that waited for it: under
   load groups grow, idle the latency is one flush. A small group (`JournalPolicy`) is
   made durable in the journal (persistence.journal: one write, one fdatasync) and
   applied to LMDB later, with the groups after it, in one synced transaction per
   environment: when `apply_events` wait, when the oldest has waited `apply_ns`, and
   before anything reads the store (a query, a restore, the close). A big group, or one
   with a sealed payload, is committed to LMDB at once, with whatever waits to be applied;
3. on WELCOME, commit and apply what is pending, then EVSYNC; when the broker's EVSYNCOK
   asks for a restore (it restarted), send it the durable state as EVRESTORE pages
   (persistence.restore): the broker never opens the store nor the key ring;
4. answer HISTORY and REPLAY on the query socket (persistence.answers);
5. once a second: retention (persistence.retention) and a re-read of the key ring when
   `plexus keys rotate` changed it.

At start, what the journal holds beyond the store's watermark (a crash came before it
was applied) is applied first: those events were acknowledged, so they are the store's.

Why a journal: LMDB makes a commit durable with two flushes in a row (data pages, then
the meta page), 0.25 ms on this box's disk alone, and a lone confirmed publish waited for
both, four with a durable subscriber (state.mdb too); a record in the preallocated journal
takes one flush of blocks already allocated (0.10-0.13 ms alone). Measured per confirmed
publish inside the platform (schedstat of this process's thread): 6.1 sleeps and 410-470
us of CPU before, 3.4 and 285 us with the journal; with a durable subscriber 11 and
550-630 us before.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import zmq

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.catalog import ManifestCatalog
from broker.endpoints import Endpoints
from broker.endpoints import bind as bind_endpoint
from broker.errors import ProtocolViolation
from broker.logs import event
from broker.paths import PlatformPaths
from clients.stream import StreamConsumer
from persistence import journal as J
from persistence.answers import QueryAnswers
from persistence.restore import RestoreReader
from persistence.retention import RetentionPolicy, plan_retention
from persistence.state import StateStore
from persistence.store import MessageStore, SegmentPolicy
from persistence.writer import StoreWriter
from security.credentials import ServerKeys
from security.grant_channel import GrantReceiver
from security.grants import GrantRegistry
from security.keyring import KeyRing
from security.peers import LiveProcessTree
from security.zap import answer, bind_zap

log = logging.getLogger("plexus.persistence")

_BIG_BATCH = 20_000
_HOUSEKEEPING_NS = 1_000_000_000
_RETRY_NS = 1_000_000_000
_IDLE_POLL_MS = 100
STORAGE_ALERT_TOPIC = "$sys.alerts.storage"


@dataclass(frozen=True, slots=True)
class JournalPolicy:
    """Which groups the journal takes, and when journaled events go to LMDB."""

    capacity: int = 8 * 2**20
    """Bytes of the preallocated journal file; 0: no journal, every group to LMDB."""
    max_group: int = 64
    """Groups of at most this many events are journaled; bigger ones amortise LMDB's two
    flushes already, and journaling them would only cost CPU (encode now, apply later)."""
    apply_events: int = 128
    apply_ns: int = 50_000_000
    """Journaled events are applied once this many wait or the oldest waited this long.
    An apply holds the loop for its rows' work plus two flushes, and what arrives meanwhile
    waits: 128 rows keep that near a millisecond (at 10,000 confirmed msg/s, 1,024 rows per
    apply tripled the p99 of publish -> synced), while one flush pair still serves many
    groups (a lone confirmer's ~50 per apply)."""


def journal_takes(policy: JournalPolicy, events: int) -> bool:
    """Whether a group of `events` new events is small enough for the journal."""
    return 0 < events <= policy.max_group and policy.capacity > 0


def apply_due(policy: JournalPolicy, waiting: int, oldest_ns: int, now_ns: int) -> bool:
    """Whether journaled events (`waiting`, the oldest journaled at `oldest_ns`) should go
    to LMDB now: few and fresh ones wait, so one synced LMDB commit serves many groups."""
    return waiting > 0 and (waiting >= policy.apply_events or now_ns - oldest_ns >= policy.apply_ns)


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
    journal: JournalPolicy = field(default_factory=JournalPolicy)
    passphrase: str | None = field(default=None, repr=False)
    """The key ring's passphrase, handed over on a descriptor; never read from the
    environment (`security.keyring.PASSPHRASE_FD_VARIABLE`)."""
    endpoints: Endpoints | None = None
    """The broker's and the store's endpoints (None: the ipc paths of `paths`)."""
    listen_fds: Mapping[str, int] = field(default_factory=dict)
    """The inherited listening descriptor of the store socket (broker.endpoints)."""


class PersistenceService:
    """Binds on `bind()`, serves in `run()`; constructing opens the store."""

    def __init__(
        self,
        config: PersistenceConfig,
        token: str,
        keys: ServerKeys,
        grants: GrantReceiver | None = None,
        context: zmq.Context[Any] | None = None,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.config = config
        self._clock = clock
        self._monotonic = monotonic
        self._context = context or zmq.Context.instance()
        paths = config.paths
        paths.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keys = KeyRing.open(
            paths.keys_dir, clock, passphrase=config.passphrase, from_environment=False
        )
        self.messages = MessageStore(
            paths.segments_dir, readonly=False, policy=config.segments, clock=clock
        )
        self.state = StateStore(paths.state_path, readonly=False)
        self.writer = StoreWriter(self.messages, self.state, self.keys, config.sensitive_topics)
        self.registry = GrantRegistry(os.getuid(), LiveProcessTree())
        self._server_keys = keys
        self._grants = grants
        self.answers = QueryAnswers(
            self.messages, self.keys, ManifestCatalog(config.apps_dir), self.registry.identity
        )
        self._pending: list[R.Event] = []
        self._token = token
        self.stream: StreamConsumer | None = None
        self._query: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._next_housekeeping = 0
        self._warned = False
        self._retry_at = 0
        self.commits = 0
        self.restores = 0
        self._unapplied: list[R.Event] = []
        """Journaled (durable, acknowledged) events not yet in LMDB, in seq order."""
        self._unapplied_since = 0
        self._journaled = 0
        """Highest seq made durable in the journal."""
        self._apply_failed = False
        self._restore_owed = False
        self.journaled = 0
        """Events made durable through the journal (statistics)."""
        self.journal: J.Journal | None = None
        if config.journal.capacity > 0 and J.AVAILABLE:
            self._open_journal(paths.store_dir / J.JOURNAL_FILE)

    @property
    def watermark(self) -> int:
        """Everything up to here is stored and synced: in LMDB, or journaled and waiting to
        be applied. What the service reports to the broker."""
        return max(self._journaled, self.writer.watermark)

    def _open_journal(self, path: Path) -> None:
        """Open the journal and apply what a crash left in it beyond the store's
        watermark; without a usable journal the service commits every group to LMDB."""
        try:
            journal = J.Journal(path, self.config.journal.capacity)
            records = journal.records()
        except OSError as exc:
            event(log, "journal-unavailable", logging.WARNING, error=f"{exc}")
            return
        self.journal = journal
        floor = self.writer.watermark
        events: list[R.Event] = []
        for record in records:
            try:
                events += [e for e in R.decode_events(record.payload) if e.seq > floor]
            except ProtocolViolation as exc:  # whole by its CRC: only a bug writes this
                event(log, "journal-record-unreadable", logging.ERROR, error=str(exc))
                break
        if not events:
            journal.rewind()
            return
        self._unapplied = events
        self._unapplied_since = self._monotonic()
        self._journaled = events[-1].seq
        event(
            log,
            "journal-replayed",
            events=len(events),
            first=events[0].seq,
            last=events[-1].seq,
            watermark=floor,
        )
        self._apply()  # failing (disk full): kept, retried like a failed commit

    def bind(self) -> None:
        paths = self.config.paths
        self._read_grants()
        self._zap = bind_zap(self._context)
        query: zmq.Socket[bytes] = self._context.socket(zmq.ROUTER)
        query.linger = 0
        self._server_keys.serve(query)
        query.zap_domain = P.ZAP_DOMAIN.encode()
        query.maxmsgsize = 64 * 1024
        endpoints = self.config.endpoints or Endpoints.ipc(paths)
        store = bind_endpoint(query, "store", endpoints.store, self.config.listen_fds)
        self._query = query
        self.stream = StreamConsumer(
            self._context,
            endpoints.bus,
            endpoints.events,
            P.PERSISTENCE_ID,
            self._token,
            watermark=self.watermark,
            session="store",
        )
        self.stream.start()
        event(
            log,
            "persistence-listening",
            store=store,
            watermark=self.watermark,
            segments=len(self.messages.segments()),
        )

    def close(self) -> None:
        """Take what the broker published before it stopped, commit it, close."""
        stream = self.stream
        if stream is not None:
            while stream.sub.poll(200):
                self._take(stream.read_stream())
        self._commit()
        self._apply()
        if self.journal is not None:
            self.journal.close(clean=not self._unapplied)
            self.journal = None
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
        grants = self._grants
        if grants is not None:
            poller.register(grants.fileno(), zmq.POLLIN)
        policy = {P.ZAP_DOMAIN: None}
        while not should_stop():
            ready = dict(poller.poll(self._poll_ms()))
            if grants is not None and not grants.closed and grants.fileno() in ready:
                self._read_grants()
                if grants.closed:
                    poller.unregister(grants.fileno())
            if zap in ready:
                got = answer(zap, self.registry, policy, self._read_grants)
                if got is not None and not got.accepted:
                    event(
                        log,
                        "auth-denied",
                        logging.WARNING,
                        claimed=got.admission.claimed,
                        pid=got.peer.pid or 0,
                        code=str(got.admission.refusal),
                        address=got.peer.address,
                        reason=got.reason,
                    )
            fresh, controls = stream.read(ready)
            self._take(fresh)
            for control in controls:
                self._on_control(stream, control)
            if self._commit_due(stream.drained):
                self._commit()
            if self._apply_due():
                self._apply()
            if query in ready:
                if self._monotonic() >= self._retry_at:
                    self._apply()  # a confirmed message must be in what the query reads
                self.answers.serve(query)
            self._tick(stream)

    def _read_grants(self) -> None:
        """What the supervisor granted or revoked (a revoked grant's queries are refused:
        its User-Id no longer names an identity)."""
        if self._grants is not None:
            self._grants.apply(self.registry)

    def _poll_ms(self) -> int:
        """0 while a group waits for its commit; until the journaled events are due for
        LMDB while some wait; else the idle poll."""
        if self._pending and not self._retry_at:
            return 0
        if self._unapplied and not self._retry_at:
            due = self._unapplied_since + self.config.journal.apply_ns - self._monotonic()
            return min(_IDLE_POLL_MS, max(0, -(-due // 1_000_000)))
        return _IDLE_POLL_MS

    def _commit_due(self, drained: bool) -> bool:
        return group_complete(len(self._pending), drained)

    def _apply_due(self) -> bool:
        now = self._monotonic()
        return now >= self._retry_at and apply_due(
            self.config.journal, len(self._unapplied), self._unapplied_since, now
        )

    def _tick(self, stream: StreamConsumer) -> None:
        stream.tick(self.watermark)
        now = self._monotonic()
        if self._restore_owed and now >= self._retry_at:
            self._send_restore(stream)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + _HOUSEKEEPING_NS
            self._housekeeping(stream)

    def _take(self, fresh: list[R.Event]) -> None:
        self._pending.extend(fresh)

    def _on_control(self, stream: StreamConsumer, control: wire.Welcome | wire.EvSyncOk) -> None:
        if isinstance(control, wire.Welcome):
            self._restore_owed = False  # a new handshake: its EVSYNCOK says what it needs
            self._commit()  # what the broker may ask to restore must be in the store
            self._apply()
            stream.sync(self.watermark)
            return
        event(
            log,
            "persistence-synced",
            watermark=self.watermark,
            next=control.next,
            epoch=control.epoch,
            restore=control.restore,
        )
        if control.restore:
            self._send_restore(stream)

    def _send_restore(self, stream: StreamConsumer) -> None:
        """The broker restarted and waits: send it the durable state, page by page. What
        was journaled must be in LMDB first (it was acknowledged, so it is part of that
        state): if it cannot be applied (disk full), the restore waits for the retry."""
        self._commit()
        if not self._apply():
            self._restore_owed = True
            event(log, "restore-deferred", logging.WARNING, unapplied=len(self._unapplied))
            return
        self._restore_owed = False
        started = self._monotonic()
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
            ms=round((self._monotonic() - started) / 1e6, 1),
        )

    def _commit(self) -> None:
        """Make the pending group durable (journal or LMDB), then EVACK."""
        if not self._pending or self._monotonic() < self._retry_at:
            return
        pending, self._pending = self._pending, []
        watermark = self.watermark
        fresh = [e for e in pending if e.seq > watermark]
        if not self._journal_group(fresh):
            try:  # with what waits to be applied: one synced transaction for both
                self.writer.commit(self._unapplied + fresh)
            except lmdb.Error as exc:  # disk full, I/O error: keep the events, retry, never crash
                self._pending = fresh + self._pending
                self._apply_failed = True  # nothing is journaled while LMDB fails
                self._write_failed(exc)
                return
            self._applied()
        self._retry_at = 0
        self.commits += 1
        if self.stream is not None:
            self.stream.ack(self.watermark)

    def _journal_group(self, fresh: list[R.Event]) -> bool:
        """Journal a small group (durable when this returns True); False: it goes to
        LMDB (too big, a sealed payload, no room, a failed apply, no journal)."""
        journal = self.journal
        if (
            journal is None
            or self._apply_failed
            or not journal_takes(self.config.journal, len(fresh))
            or self.writer.seals(fresh)
        ):
            return False
        encode = R.encode_event
        payload = b"".join([encode(e.seq, e.ts_ns, e.record) for e in fresh])
        if not journal.fits(len(payload)):
            return False  # LMDB takes it with everything journaled; the journal rewinds
        try:
            journal.append(fresh[0].seq, fresh[-1].seq, payload)
        except OSError as exc:  # what reached the disk is unknown: LMDB takes it from here
            event(log, "journal-write-failed", logging.ERROR, error=f"{exc}")
            journal.close(clean=False)  # what it holds stays for a restart to apply
            self.journal = None
            return False
        if not self._unapplied:
            self._unapplied_since = self._monotonic()
        self._unapplied += fresh
        self._journaled = fresh[-1].seq
        self.journaled += len(fresh)
        return True

    def _apply(self) -> bool:
        """Journaled events into LMDB, synced; True when none wait any more."""
        if not self._unapplied:
            return True
        try:
            self.writer.commit(self._unapplied)
        except lmdb.Error as exc:
            self._apply_failed = True  # groups go to LMDB (and wait) until this succeeds
            self._write_failed(exc)
            return False
        self._applied()
        self._retry_at = 0
        return True

    def _applied(self) -> None:
        """LMDB holds everything journaled: the journal starts again at its beginning."""
        self._unapplied = []
        self._apply_failed = False
        if self.journal is not None and self.writer.watermark >= self.journal.last:
            self.journal.rewind()

    def _write_failed(self, exc: lmdb.Error) -> None:
        """The broker keeps the events (unacknowledged) and their publishers unconfirmed;
        free space by retention and try again in a second."""
        self._retry_at = self._monotonic() + _RETRY_NS
        notice = {
            "what": "the store cannot write",
            "error": f"{type(exc).__name__}: {exc}",
            "pending_events": len(self._pending) + len(self._unapplied),
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
