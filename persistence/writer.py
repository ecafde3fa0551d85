"""Apply a batch of broker events to the store in one group commit.

The messages commit first, then the durable state (subscriptions, pending deliveries,
dead letters) with the watermark. The watermark is what persistence reports, and the
broker confirms publishes up to it, so it must never name a message the segments lack.
After a crash between the two commits the segments hold messages beyond the watermark:
the broker still retains those events (they were never acknowledged) and sends them
again; their state changes are applied and their rows, already stored, are skipped.
Payloads of sensitive messages (flagged by the publisher or on a configured topic) are
sealed with AES-256-GCM before they reach either environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import lmdb

from broker import events as E
from broker.topics import TopicIndex
from persistence.state import StateStore
from persistence.store import MessageStore, Row


class Sealer(Protocol):
    def seal(self, msg_id: bytes, topic: str, plaintext: bytes) -> bytes: ...


class StoreWriter:
    """Turns events into rows and state changes; `commit` is one group commit."""

    def __init__(
        self,
        messages: MessageStore,
        state: StateStore,
        sealer: Sealer | None,
        sensitive_topics: Sequence[str] = (),
    ) -> None:
        self.messages = messages
        self.state = state
        self._sealer = sealer
        self._sensitive: TopicIndex[bool] = TopicIndex(1024)
        for pattern in sensitive_topics:
            self._sensitive.insert(pattern, True)
        self.watermark = state.watermark()
        self._stored_up_to = messages.last_seq()
        """Rows up to here are already in the segments (a crash between the commits)."""
        self.stored = 0
        self.sealed = 0

    def _protect(self, sensitive: bool, msg_id: bytes, topic: str, payload: bytes) -> bytes | None:
        """The sealed payload when the message must be encrypted, else None."""
        if not (sensitive or self._sensitive.has_interest(topic)):
            return None
        if self._sealer is None:
            raise RuntimeError("a sensitive message arrived but no key ring is open")
        self.sealed += 1
        return self._sealer.seal(msg_id, topic, payload)

    def commit(self, events: Sequence[E.Event]) -> int:
        """Store `events` (contiguous, after the watermark) durably; returns the watermark."""
        fresh = [event for event in events if event.seq > self.watermark]
        if not fresh:
            return self.watermark
        rows = [
            self._row(event)
            for event in fresh
            if event.kind == E.MSG and event.seq > self._stored_up_to
        ]
        try:
            self.messages.append(rows)
        except lmdb.Error:  # e.g. disk full: some slices may be in; never write them twice
            self._stored_up_to = max(self._stored_up_to, self.messages.last_seq())
            raise
        # sealed once, outside the retry: a grown map re-runs the transaction, not the sealing
        dead_letters = {e.seq: self._dead_record(e) for e in fresh if e.kind == E.DEAD}
        while True:
            try:
                with self.state.env.begin(write=True) as txn:
                    for event in fresh:
                        self._apply(txn, event, dead_letters)
                    self.state.set_watermark(txn, fresh[-1].seq)
                break
            except lmdb.MapFullError:
                self.state.grow()
        self.stored += len(rows)
        self.watermark = fresh[-1].seq
        return self.watermark

    def _row(self, event: E.Event) -> Row:
        sender, topic, msg_id, sensitive, header, payload, _targets = event.fields
        sealed = self._protect(sensitive, msg_id, topic, payload)
        stored = sealed if sealed is not None else payload
        return (event.seq, event.ts_ns, sender, topic, msg_id, header, stored, sealed is not None)

    def _dead_record(self, event: E.Event) -> dict[str, Any]:
        """The stored form of a dead letter: its payload sealed when sensitive."""
        record = dict(zip(E.FIELDS[E.DEAD], event.fields, strict=True))
        sealed = self._protect(
            record["sensitive"], record["msg_id"], record["topic"], record["payload"]
        )
        record["sealed"] = sealed is not None
        if sealed is not None:
            record["payload"] = sealed
        record["dead_ns"] = event.ts_ns
        return record

    def _apply(  # noqa: PLR0912
        self, txn: lmdb.Transaction, event: E.Event, dead_letters: dict[int, dict[str, Any]]
    ) -> None:
        state = self.state
        kind, f = event.kind, event.fields
        if kind == E.MSG:
            for app, session, sids in f[6]:
                state.put_pending(txn, app, session, event.seq, sids)
        elif kind == E.SUB:
            app, session, sid, pattern, durable = f
            if durable:
                state.put_subscription(txn, app, session, sid, pattern)
        elif kind == E.UNSUB:
            state.drop_subscription(txn, *f)
        elif kind == E.ACK:
            app, session, stored_seqs = f
            for seq in stored_seqs:
                state.drop_pending(txn, app, session, seq)
        elif kind == E.DEAD:
            record = dead_letters[event.seq]
            state.put_dead_letter(txn, record["entry_id"], record)
            if record["stored_seq"]:
                state.drop_pending(txn, record["app"], record["session"], record["stored_seq"])
        elif kind == E.DLQ_REPLAY:
            entry_id, app, session, stored_seq, sids = f
            state.drop_dead_letter(txn, entry_id)
            if stored_seq and sids:
                state.put_pending(txn, app, session, stored_seq, sids)
        elif kind == E.DLQ_PURGE:
            for entry_id in f[0]:
                state.drop_dead_letter(txn, entry_id)
