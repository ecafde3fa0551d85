"""A restarted broker rebuilds what must survive it from the store.

Read-only, once, before the broker serves apps (with persistence on, it waits until the
persistence service reports that everything it received is committed, so the store is
complete up to that watermark):

- durable subscriptions, each in a detached session that waits for its app;
- their unacknowledged deliveries, queued again in publish order (payloads of sensitive
  messages opened with the key ring);
- the dead-letter queue, entry ids kept;
- the ids of recent messages, so a publisher resending what was stored before the crash
  is confirmed without the message being routed twice;
- the event sequence, continued after the watermark.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from broker.codec import encode_sids
from broker.delivery import Delivery
from broker.dlq import DeadLetter
from broker.logs import event
from broker.paths import PlatformPaths
from broker.router import Router
from persistence.keyring import KeyRing, StorageDataError
from persistence.state import StateStore
from persistence.store import MessageStore

log = logging.getLogger("plexus.broker")

STATE_FILE = "state.mdb"
SEGMENTS_DIR = "segments"
RECENT_IDS = 131_072


@dataclass(slots=True)
class RecoveryReport:
    watermark: int = 0
    sessions: int = 0
    subscriptions: int = 0
    deliveries: int = 0
    dead_letters: int = 0
    recent_ids: int = 0
    skipped: int = 0


class _LazyKeys:
    """Opens the key ring only when a sealed payload is met (most stores have none)."""

    def __init__(self, paths: PlatformPaths) -> None:
        self._paths = paths
        self._ring: KeyRing | None = None

    def open(self, msg_id: bytes, topic: str, sealed: bytes) -> bytes:
        if self._ring is None:
            self._ring = KeyRing.open(self._paths.keys_dir)
        return self._ring.open_sealed(msg_id, topic, sealed)


def recover(router: Router, paths: PlatformPaths, now_ns: int) -> RecoveryReport:
    """Restore `router` from the store under `paths` (nothing there: a first start)."""
    report = RecoveryReport()
    state_path = paths.store_dir / STATE_FILE
    if not state_path.exists():
        return report
    state = StateStore(state_path, readonly=True)
    messages = MessageStore(paths.store_dir / SEGMENTS_DIR, readonly=True)
    keys = _LazyKeys(paths)
    try:
        report.watermark = max(state.watermark(), messages.last_seq())
        router.stream.start_after(report.watermark)
        for key, subscriptions in state.subscriptions().items():
            deliveries = []
            for seq, sids in state.pending_of(*key):
                stored = messages.get(seq)
                if stored is None:
                    report.skipped += 1
                    continue
                try:
                    payload = (
                        keys.open(stored.msg_id, stored.topic, stored.payload)
                        if stored.sealed
                        else stored.payload
                    )
                except StorageDataError as exc:
                    report.skipped += 1
                    event(log, "recovery-record-unreadable", logging.ERROR, seq=seq, error=str(exc))
                    continue
                delivery = Delivery(
                    0,
                    encode_sids(tuple(sids)),
                    stored.sender,
                    stored.ts_ns,
                    stored.topic,
                    stored.msg_id,
                    stored.header,
                    payload,
                    stored_seq=seq,
                    durable_sids=encode_sids(tuple(sids)),
                    sensitive=stored.sealed,
                )
                deliveries.append(delivery)
            if router.restore_session(key, subscriptions, deliveries, now_ns):
                report.sessions += 1
                report.subscriptions += len(subscriptions)
                report.deliveries += len(deliveries)
            else:
                event(log, "recovery-app-gone", logging.WARNING, app=key[0], session=key[1])
        for record in state.dead_letters():
            entry = _dead_letter(record.entry_id, record.fields, keys)
            if entry is None:
                report.skipped += 1
                continue
            router.dlq.restore(entry)
            report.dead_letters += 1
        for stored in reversed(messages.recent(RECENT_IDS)):
            router.remember_published(stored.sender, stored.msg_id, stored.seq, stored.ts_ns)
            report.recent_ids += 1
    finally:
        messages.close()
        state.close()
    return report


def _dead_letter(entry_id: int, f: dict[str, Any], keys: _LazyKeys) -> DeadLetter | None:
    payload = f["payload"]
    if f.get("sealed"):
        try:
            payload = keys.open(f["msg_id"], f["topic"], payload)
        except StorageDataError as exc:
            event(log, "recovery-record-unreadable", logging.ERROR, dlq=entry_id, error=str(exc))
            return None
    delivery = Delivery(
        0,
        f["sids"],
        f["sender"],
        f["published_ns"],
        f["topic"],
        f["msg_id"],
        f["header"],
        payload,
        attempt=f["attempts"],
        last_error=f["error"],
        stored_seq=f["stored_seq"],
        sensitive=bool(f["sensitive"]),
    )
    return DeadLetter(entry_id, f["reason"], f["app"], f["session"], f["dead_ns"], delivery)
