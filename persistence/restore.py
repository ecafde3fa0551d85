"""What a recovering broker needs from the store, read here and sent as EVRESTORE pages.

Persistence owns the store and the key ring, so the broker never opens either: when its
EVSYNCOK says `restore`, the service reads the durable state once, read-only, and sends it
over the link (docs/protocol.md §14.5; the broker applies it with broker.recovery):

1. every durable session's subscriptions, then its unacknowledged deliveries in publish
   order, each with its message (sealed payloads opened with the key ring);
2. the dead-letter queue, entry ids kept (sealed payloads opened);
3. the ids of the newest `RESTORE_RECENT_IDS` messages, oldest first;

on pages of at most `RESTORE_PAGE_ROWS` rows and about `RESTORE_PAGE_BYTES` (so a page
fits the broker's frame limit), every page carrying the watermark, the last one `done`;
an empty store is one empty page marked done. A delivery whose message retention already
deleted, or whose record does not open, a dead letter whose fields have not the types
EVRESTORE requires (the broker refuses a page with one such row), and a state row that does
not parse (persistence.state) are skipped, logged and counted in `skipped`: the rest still
recovers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from broker.codec import decode_sids
from broker.errors import ProtocolViolation
from broker.logs import event
from broker.wire import (
    RESTORE_PAGE_BYTES,
    RESTORE_PAGE_ROWS,
    RESTORE_RECENT_IDS,
    EvRestore,
    dead_letter_row,
)
from persistence.sealing import Opener, open_dead_letter, open_message
from persistence.segments import StoredMessage
from persistence.state import StateStore
from persistence.store import MessageStore
from security.keyring import SealedRecordError

log = logging.getLogger("plexus.persistence")

_ROW_OVERHEAD = 128
"""Bytes counted per row beyond its variable fields (msgpack markers, ints, flags)."""


class _Page:
    """Rows gathered for the next EVRESTORE, with their size."""

    def __init__(self) -> None:
        self.sessions: list[tuple[str, str, dict[int, str]]] = []
        self.deliveries: list[tuple[Any, ...]] = []
        self.dead_letters: list[tuple[Any, ...]] = []
        self.recent: list[tuple[str, bytes, int, int]] = []
        self.rows = 0
        self.size = 0

    def record(self, watermark: int, done: bool) -> EvRestore:
        return EvRestore(
            watermark,
            tuple(self.sessions),
            tuple(self.deliveries),
            tuple(self.dead_letters),
            tuple(self.recent),
            done,
        )


class RestoreReader:
    """Builds the EVRESTORE pages from one store; `skipped` counts what could not be read."""

    def __init__(
        self,
        messages: MessageStore,
        state: StateStore,
        keys: Opener,
        *,
        recent: int = RESTORE_RECENT_IDS,
        page_rows: int = RESTORE_PAGE_ROWS,
        page_bytes: int = RESTORE_PAGE_BYTES,
    ) -> None:
        self._messages = messages
        self._state = state
        self._keys = keys
        self._recent = recent
        self._page_rows = page_rows
        self._page_bytes = page_bytes
        self.skipped = 0
        self.rows = 0

    def watermark(self) -> int:
        """Events up to here are in the store. Messages may lie beyond the state's
        watermark (a crash between the two commits, writer.py): numbering continues after
        them, never reusing a stored message's seq."""
        return max(self._state.watermark(), self._messages.last_seq(), self._messages.watermark())

    def pages(self) -> Iterator[EvRestore]:
        """The pages, in order; the last is `done`."""
        state_skipped = self._state.skipped
        watermark = self.watermark()
        page = _Page()
        for kind, row, size in self._rows():
            if page.rows and (page.rows >= self._page_rows or page.size + size > self._page_bytes):
                yield page.record(watermark, done=False)
                page = _Page()
            getattr(page, kind).append(row)
            page.rows += 1
            page.size += size
            self.rows += 1
        self.skipped += self._state.skipped - state_skipped  # rows the state store skipped
        yield page.record(watermark, done=True)

    # -- the rows, as (page list, row, counted bytes) ---------------------------------------

    def _rows(self) -> Iterator[tuple[str, Any, int]]:
        for (app, session), subscriptions in self._state.subscriptions().items():
            size = _ROW_OVERHEAD + len(app) + len(session)
            size += sum(len(pattern) + 8 for pattern in subscriptions.values())
            yield "sessions", (app, session, subscriptions), size
            for seq, sids in self._state.pending_of(app, session):
                delivery = self._delivery(app, session, seq, sids)
                if delivery is not None:
                    yield "deliveries", delivery, _size(delivery)
        for record in self._state.dead_letters():
            dead = self._dead_letter(record.entry_id, record.fields)
            if dead is not None and self._sendable(record.entry_id, dead):
                yield "dead_letters", dead, _size(dead)
        for stored in reversed(self._messages.recent(self._recent)):
            row = (stored.sender, stored.msg_id, stored.seq, stored.ts_ns)
            yield "recent", row, _ROW_OVERHEAD + len(stored.sender) + len(stored.msg_id)

    def _delivery(
        self, app: str, session: str, seq: int, sids: list[int]
    ) -> tuple[Any, ...] | None:
        stored = self._messages.get(seq)
        if stored is None:
            self.skipped += 1
            event(log, "restore-message-gone", logging.WARNING, seq=seq, app=app)
            return None
        opened = self._open(stored)
        if opened is None:
            return None
        header, payload = opened
        return (
            app,
            session,
            seq,
            list(sids),
            stored.sender,
            stored.ts_ns,
            stored.topic,
            stored.msg_id,
            header,
            payload,
            stored.sealed,
        )

    def _open(self, stored: StoredMessage) -> tuple[bytes, bytes] | None:
        try:
            return open_message(self._keys, stored)
        except SealedRecordError as exc:
            self.skipped += 1
            event(log, "recovery-record-unreadable", logging.ERROR, seq=stored.seq, error=str(exc))
            return None

    def _dead_letter(self, entry_id: int, f: dict[str, Any]) -> tuple[Any, ...] | None:
        try:
            f = open_dead_letter(self._keys, entry_id, f)
            return (
                entry_id,
                f["reason"],
                f["app"],
                f["session"],
                f["dead_ns"],
                f["attempts"],
                f["error"],
                f["stored_seq"],
                f["sender"],
                f["published_ns"],
                f["topic"],
                f["msg_id"],
                f["header"],
                f["payload"],
                bool(f["sensitive"]),
                decode_sids(f["sids"]) if f["sids"] else [],
            )
        except SealedRecordError as exc:
            error = str(exc)
        except (KeyError, TypeError, ValueError, ProtocolViolation) as exc:
            error = f"malformed dead letter: {exc!r}"
        self.skipped += 1
        event(log, "recovery-record-unreadable", logging.ERROR, dlq=entry_id, error=error)
        return None

    def _sendable(self, entry_id: int, row: tuple[Any, ...]) -> bool:
        """Whether a dead letter has the types EVRESTORE requires (the broker refuses a
        page with one wrong row: a stored row of the wrong types would cost its page)."""
        try:
            dead_letter_row(row)
        except ProtocolViolation as exc:
            self.skipped += 1
            error = f"malformed dead letter: {exc.detail}"
            event(log, "recovery-record-unreadable", logging.ERROR, dlq=entry_id, error=error)
            return False
        return True


def _size(row: tuple[Any, ...]) -> int:
    return _ROW_OVERHEAD + sum(len(v) for v in row if isinstance(v, str | bytes))
