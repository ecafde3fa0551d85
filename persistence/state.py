"""Durable broker state in one LMDB environment beside the segments.

    meta      b"watermark"              -> highest event seq applied (8 bytes)
    subs      app NUL session NUL sid    -> pattern           (durable subscriptions)
    pending   app NUL session NUL seq    -> packed sids       (unacknowledged deliveries
                                                               of durable subscriptions)
    dlq       entry id (8 bytes)         -> msgpack dead letter (payload sealed if sensitive)

Written by persistence from the event stream in the same group commit as the messages
(after them: the watermark never names a message the segments lack; see writer.py),
read by the broker when it restarts. Segments keep the messages;
`pending` only refers to them by seq, so a durable subscriber's backlog costs a few bytes
per message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_WATERMARK = b"watermark"


def _session_prefix(app: str, session: str) -> bytes:
    return app.encode() + b"\0" + session.encode() + b"\0"


def _split_session(key: bytes) -> tuple[str, str, bytes]:
    app, session, rest = key.split(b"\0", 2)
    return app.decode(), session.decode(), rest


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One stored dead letter (payload as stored: sealed when `sealed`)."""

    entry_id: int
    fields: dict[str, Any]


class StateStore:
    """The durable-state environment; `readonly` for every process but persistence."""

    def __init__(self, path: Path, readonly: bool = True, map_size: int = 1 << 30) -> None:
        self.path = path
        if not readonly:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path),
            subdir=False,
            readonly=readonly,
            max_dbs=8,
            map_size=map_size,
            create=not readonly,
            mode=0o600,
            sync=True,
        )
        self.meta = self.env.open_db(b"meta", create=not readonly)
        self.subs = self.env.open_db(b"subs", create=not readonly)
        self.pending = self.env.open_db(b"pending", create=not readonly)
        self.dlq = self.env.open_db(b"dlq", create=not readonly)

    def close(self) -> None:
        self.env.close()

    def grow(self) -> None:
        """Double the map after MapFullError (the writer retries its transaction)."""
        self.env.set_mapsize(self.env.info()["map_size"] * 2)

    # -- writing (inside the caller's transaction) ------------------------------------------

    def set_watermark(self, txn: lmdb.Transaction, seq: int) -> None:
        txn.put(_WATERMARK, _U64.pack(seq), db=self.meta)

    def put_subscription(
        self, txn: lmdb.Transaction, app: str, session: str, sid: int, pattern: str
    ) -> None:
        key = _session_prefix(app, session) + _U32.pack(sid)
        txn.put(key, pattern.encode(), db=self.subs)

    def drop_subscription(self, txn: lmdb.Transaction, app: str, session: str, sid: int) -> None:
        """Forget a durable subscription and its share of the session's pending deliveries."""
        prefix = _session_prefix(app, session)
        if not txn.delete(prefix + _U32.pack(sid), db=self.subs):
            return
        cursor = txn.cursor(self.pending)
        updates: list[tuple[bytes, list[int]]] = []
        if cursor.set_range(prefix):
            for key, raw in cursor:
                if not bytes(key).startswith(prefix):
                    break
                sids = msgpack.unpackb(raw)
                if sid in sids:
                    updates.append((bytes(key), [s for s in sids if s != sid]))
        for key, left in updates:
            if left:
                txn.put(key, msgpack.packb(left), db=self.pending)
            else:
                txn.delete(key, db=self.pending)

    def put_pending(
        self, txn: lmdb.Transaction, app: str, session: str, seq: int, sids: bytes
    ) -> None:
        txn.put(_session_prefix(app, session) + _U64.pack(seq), sids, db=self.pending)

    def drop_pending(self, txn: lmdb.Transaction, app: str, session: str, seq: int) -> None:
        txn.delete(_session_prefix(app, session) + _U64.pack(seq), db=self.pending)

    def put_dead_letter(self, txn: lmdb.Transaction, entry_id: int, fields: dict[str, Any]) -> None:
        txn.put(_U64.pack(entry_id), msgpack.packb(fields, use_bin_type=True), db=self.dlq)

    def drop_dead_letter(self, txn: lmdb.Transaction, entry_id: int) -> None:
        txn.delete(_U64.pack(entry_id), db=self.dlq)

    # -- reading ----------------------------------------------------------------------------

    def watermark(self) -> int:
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(_WATERMARK)
        return int(_U64.unpack(raw)[0]) if raw else 0

    def subscriptions(self) -> dict[tuple[str, str], dict[int, str]]:
        """Durable subscriptions by (app, session)."""
        found: dict[tuple[str, str], dict[int, str]] = {}
        with self.env.begin(db=self.subs) as txn:
            for key, value in txn.cursor():
                app, session, rest = _split_session(key)
                found.setdefault((app, session), {})[_U32.unpack(rest)[0]] = value.decode()
        return found

    def pending_of(self, app: str, session: str) -> list[tuple[int, list[int]]]:
        """(stored seq, sids) of a session's unacknowledged deliveries, oldest first."""
        prefix = _session_prefix(app, session)
        found: list[tuple[int, list[int]]] = []
        with self.env.begin(db=self.pending) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append((_U64.unpack(key[len(prefix) :])[0], msgpack.unpackb(raw)))
        return found

    def pending_count(self) -> int:
        with self.env.begin(db=self.pending) as txn:
            return int(txn.stat(self.pending)["entries"])

    def dead_letters(self) -> Iterator[DeadLetterRecord]:
        with self.env.begin(db=self.dlq) as txn:
            rows = [(key, raw) for key, raw in txn.cursor()]
        for key, raw in rows:
            yield DeadLetterRecord(_U64.unpack(key)[0], msgpack.unpackb(raw, raw=False))
