"""Apply a batch of broker events to the store in one group commit.

The messages commit first, then the durable state (subscriptions, pending deliveries,
dead letters) with the watermark. A group without state changes (the common case: no
durable subscriber involved) records its watermark in the messages' own transaction
instead, one synced commit rather than two; the store's watermark is the higher of the
two records, and a group is only committed after every earlier one was, so either
record covers everything before it. The watermark is what persistence reports, and the
broker confirms publishes up to it, so it must never name a message the segments lack.
After a crash between the two commits the segments hold messages beyond the watermark:
the broker still retains those events (they were never acknowledged) and sends them
again; their state changes are applied and their rows, already stored, are skipped.
Sensitive messages (flagged by the publisher or on a configured topic) are sealed with
AES-256-GCM before they reach either environment: payload and header together, and for a
dead letter its error text too (persistence.sealing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import lmdb

from broker import event_records as R
from broker.topics import TopicIndex
from persistence.sealing import Sealer, message_context, seal_dead_letter, seal_message
from persistence.state import StateStore
from persistence.store import MessageStore, Row

_DEAD_FIELDS = tuple(item.name for item in fields(R.DeadLettered))
_PLAIN_NACK_REASONS = frozenset(
    ("", "nacked", "nacked by the receiver", "rejected by the receiver")
)
"""NACK texts the client library and the broker put in when the receiver gave none: an
event with any other text may quote a sensitive payload, so it is never journaled."""


def _changes_state(record: object) -> bool:
    """Whether applying this event writes to state.mdb (`StoreWriter._apply`)."""
    match record:
        case R.Published(targets=targets):
            return bool(targets)
        case R.Subscribed(durable=durable) | R.Unsubscribed(durable=durable):
            return bool(durable)
        case R.Acked(stored_seqs=stored_seqs):
            return bool(stored_seqs)
        case R.DeadLettered() | R.DlqReplayed() | R.DlqPurged():
            return True
        case _:
            return False


class StoreWriter:
    """Turns events into rows and state changes; `commit` is one group commit.

    Of event stream v2 it stores `Published` (the message; its `targets` as pending
    deliveries), durable `Subscribed`/`Unsubscribed`, `Acked`, `DeadLettered`,
    `DlqReplayed` and `DlqPurged`; every other kind only moves the watermark.
    """

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
        self.watermark = max(state.watermark(), messages.watermark())
        self._stored_up_to = messages.last_seq()
        """Rows up to here are already in the segments (a crash between the commits)."""
        self.stored = 0
        self.sealed = 0

    def _sealer_for(self, sensitive: bool, topic: str) -> Sealer | None:
        """The key ring when a message must be encrypted, else None."""
        if not (sensitive or self._sensitive.has_interest(topic)):
            return None
        if self._sealer is None:
            raise RuntimeError("a sensitive message arrived but no key ring is open")
        self.sealed += 1
        return self._sealer

    def seals(self, events: Sequence[R.Event]) -> bool:
        """Whether storing `events` seals something (a message flagged sensitive by its
        publisher or on a configured topic, its dead letter), or holds a NACK text of the
        receiver's (the broker cannot tell whether its message was sensitive): such a
        group reaches the disk only as LMDB keeps it (sealed; a NACK not at all), and is
        never journaled (persistence.journal holds events as the broker sent them)."""
        interest = self._sensitive.has_interest
        for event in events:
            record = event.record
            if (type(record) is R.Published or type(record) is R.DeadLettered) and (
                record.sensitive or interest(record.topic)
            ):
                return True
            if type(record) is R.Nacked and record.reason not in _PLAIN_NACK_REASONS:
                return True
        return False

    def commit(self, events: Sequence[R.Event]) -> int:
        """Store `events` (contiguous, after the watermark) durably; returns the watermark."""
        fresh = [event for event in events if event.seq > self.watermark]
        if not fresh:
            return self.watermark
        published = R.Published
        rows = [
            self._row(event.seq, event.ts_ns, event.record)
            for event in fresh
            if type(event.record) is published and event.seq > self._stored_up_to
        ]
        stateless = not any(_changes_state(event.record) for event in fresh)
        try:
            recorded = self.messages.append(rows, fresh[-1].seq if stateless else None)
        except lmdb.Error:  # e.g. disk full: some slices may be in; never write them twice
            self._stored_up_to = max(self._stored_up_to, self.messages.last_seq())
            raise
        if recorded:  # one synced commit held the messages and the watermark
            self.stored += len(rows)
            self.watermark = fresh[-1].seq
            return self.watermark
        # sealed once, outside the retry: a grown map re-runs the transaction, not the sealing
        dead_letters = {
            e.seq: self._dead_record(e.ts_ns, e.record)
            for e in fresh
            if isinstance(e.record, R.DeadLettered)
        }
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

    def _row(self, seq: int, ts_ns: int, record: Any) -> Row:
        message: R.Published = record
        header, payload = message.header, message.payload
        sealer = self._sealer_for(message.sensitive, message.topic)
        if sealer is not None:
            context = message_context(seq, ts_ns, message.sender, message.topic, message.msg_id)
            header, payload = seal_message(sealer, context, header, payload)
        return (
            seq,
            ts_ns,
            message.sender,
            message.topic,
            message.msg_id,
            header,
            payload,
            sealer is not None,
        )

    def _dead_record(self, ts_ns: int, dead: R.DeadLettered) -> dict[str, Any]:
        """The stored form of a dead letter: header, payload and error sealed when
        sensitive."""
        record = {name: getattr(dead, name) for name in _DEAD_FIELDS}
        record["sealed"] = False
        sealer = self._sealer_for(dead.sensitive, dead.topic)
        if sealer is not None:
            seal_dead_letter(sealer, dead.entry_id, record)
        record["dead_ns"] = ts_ns
        return record

    def _apply(  # noqa: PLR0912 (one case per stored kind)
        self, txn: lmdb.Transaction, event: R.Event, dead_letters: dict[int, dict[str, Any]]
    ) -> None:
        state = self.state
        match event.record:
            case R.Published(targets=targets):
                for app, session, sids in targets:
                    state.put_pending(txn, app, session, event.seq, sids)
            case R.Subscribed(app=app, session=session, sid=sid, pattern=pattern, durable=True):
                state.put_subscription(txn, app, session, sid, pattern)
            case R.Unsubscribed(app=app, session=session, sid=sid, durable=True):
                state.drop_subscription(txn, app, session, sid)
            case R.Acked(app=app, session=session, stored_seqs=stored_seqs):
                for seq in stored_seqs:
                    state.drop_pending(txn, app, session, seq)
            case R.DeadLettered(entry_id=entry_id, app=app, session=session, stored_seq=seq):
                state.put_dead_letter(txn, entry_id, dead_letters[event.seq])
                if seq:
                    state.drop_pending(txn, app, session, seq)
            case R.DlqReplayed(
                entry_id=entry_id, app=app, session=session, stored_seq=seq, sids=sids
            ):
                state.drop_dead_letter(txn, entry_id)
                if seq and sids:
                    state.put_pending(txn, app, session, seq, sids)
            case R.DlqPurged(entry_ids=entry_ids):
                for entry_id in entry_ids:
                    state.drop_dead_letter(txn, entry_id)
            case _:  # routing, attempts, nacks, sessions, security, lifecycle: not stored
                pass
