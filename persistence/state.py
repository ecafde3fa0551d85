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

The readers never trust a row: a key without the layout above or a value that does not
decode is skipped, logged (`state-row-malformed`) and counted in `skipped`; a session name
is read as all that lies between the app id's NUL and the fixed-width tail, so a NUL in it
(an older broker let one through, and splitting on it crash-looped every restart) cannot
shift the fields, and the broker, which owns the rule (broker.names), skips that session
at recovery. The writers refuse names that would make such keys. A session's pending rows
are found by prefix and then matched exactly, so a name that starts like another's (`a`
and `a NUL b`) never mixes their rows.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from broker.logs import event
from broker.names import session_name_problem

log = logging.getLogger("plexus.persistence")

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_WATERMARK = b"watermark"


def _session_prefix(app: str, session: str) -> bytes:
    return app.encode() + b"\0" + session.encode() + b"\0"


def _split_session(key: bytes, tail: int) -> tuple[str, str, bytes] | None:
    """(app, session, the last `tail` bytes) of `app NUL session NUL tail`, else None.

    The app id ends at the first NUL (no app id has one) and the tail has a fixed width, so
    the session name is all that lies between, a NUL in it included: it is never split
    into the wrong fields (the caller judges the name)."""
    app_end = key.find(b"\0")
    session_end = len(key) - tail - 1
    if app_end <= 0 or session_end <= app_end or key[session_end] != 0:
        return None
    try:
        return key[:app_end].decode(), key[app_end + 1 : session_end].decode(), key[-tail:]
    except UnicodeDecodeError:
        return None


def _key_names_problem(app: str, session: str) -> str | None:
    """Why (app, session) cannot be part of a key, or None."""
    if not app or "\0" in app:
        return f"app id {app!r} is empty or holds a NUL"
    problem = session_name_problem(session)
    return None if problem is None else f"session name {problem}"


def _sids(raw: bytes) -> list[int] | None:
    """A pending row's value: a msgpack list of ints, else None."""
    try:
        sids = msgpack.unpackb(raw)
    except ValueError:  # msgpack's ExtraData, FormatError and StackError are ValueErrors
        return None
    if isinstance(sids, list) and all(type(s) is int for s in sids):
        return sids
    return None


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One stored dead letter (payload as stored: sealed when `sealed`)."""

    entry_id: int
    fields: dict[str, Any]


class StateStore:
    """The durable-state environment; `readonly` for every process but persistence."""

    def __init__(self, path: Path, readonly: bool = True, map_size: int = 1 << 30) -> None:
        self.path = path
        self.skipped = 0
        """Malformed rows the readers skipped (each one logged)."""
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
        if self._refused(app, session, "subs"):
            return
        key = _session_prefix(app, session) + _U32.pack(sid)
        txn.put(key, pattern.encode(), db=self.subs)

    def drop_subscription(self, txn: lmdb.Transaction, app: str, session: str, sid: int) -> None:
        """Forget a durable subscription and its share of the session's pending deliveries."""
        prefix = _session_prefix(app, session)
        if not txn.delete(prefix + _U32.pack(sid), db=self.subs):
            return
        updates: list[tuple[bytes, list[int]]] = []
        for key, sids in self._session_pending(txn, app, session):
            if sid in sids:
                updates.append((key, [s for s in sids if s != sid]))
        for key, left in updates:
            if left:
                txn.put(key, msgpack.packb(left), db=self.pending)
            else:
                txn.delete(key, db=self.pending)

    def put_pending(
        self, txn: lmdb.Transaction, app: str, session: str, seq: int, sids: bytes
    ) -> None:
        if self._refused(app, session, "pending"):
            return
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
        if raw is None:
            return 0
        if len(raw) != _U64.size:
            self._skip("meta", _WATERMARK, "the watermark is not 8 bytes")
            return 0  # the segments' own seqs still bound the numbering (restore.py)
        return int(_U64.unpack(raw)[0])

    def subscriptions(self) -> dict[tuple[str, str], dict[int, str]]:
        """Durable subscriptions by (app, session); rows that do not parse skipped. The
        names are not judged here: the broker checks them (broker.recovery) and reports
        what it skips in its recovery report."""
        found: dict[tuple[str, str], dict[int, str]] = {}
        with self.env.begin(db=self.subs) as txn:
            for key, value in txn.cursor():
                parts = _split_session(bytes(key), _U32.size)
                if parts is None:
                    self._skip("subs", bytes(key), "not app NUL session NUL sid")
                    continue
                app, session, sid = parts
                try:
                    pattern = bytes(value).decode()
                except UnicodeDecodeError:
                    self._skip("subs", bytes(key), "the pattern is not UTF-8")
                    continue
                found.setdefault((app, session), {})[_U32.unpack(sid)[0]] = pattern
        return found

    def pending_of(self, app: str, session: str) -> list[tuple[int, list[int]]]:
        """(stored seq, sids) of a session's unacknowledged deliveries, oldest first;
        malformed rows skipped."""
        with self.env.begin(db=self.pending) as txn:
            return [
                (_U64.unpack(key[-_U64.size :])[0], sids)
                for key, sids in self._session_pending(txn, app, session)
            ]

    def _session_pending(
        self, txn: lmdb.Transaction, app: str, session: str
    ) -> list[tuple[bytes, list[int]]]:
        """(key, sids) of exactly this session's pending rows (not those of a session whose
        name only starts with this one's), in key order; malformed rows skipped."""
        prefix = _session_prefix(app, session)
        found: list[tuple[bytes, list[int]]] = []
        cursor = txn.cursor(self.pending)
        if not cursor.set_range(prefix):
            return found
        for raw_key, raw in cursor:
            key = bytes(raw_key)
            if not key.startswith(prefix):
                break
            parts = _split_session(key, _U64.size)
            if parts is not None and parts[:2] != (app, session):
                continue  # another session's row
            sids = _sids(bytes(raw)) if parts is not None else None
            if sids is None:
                self._skip("pending", key, "not app NUL session NUL seq -> a list of sids")
                continue
            found.append((key, sids))
        return found

    def pending_count(self) -> int:
        with self.env.begin(db=self.pending) as txn:
            return int(txn.stat(self.pending)["entries"])

    def dead_letters(self) -> Iterator[DeadLetterRecord]:
        """The stored dead letters; a row whose key is not 8 bytes or whose value is not a
        msgpack map is skipped (its fields are the reader's to check)."""
        with self.env.begin(db=self.dlq) as txn:
            rows = [(bytes(key), bytes(raw)) for key, raw in txn.cursor()]
        for key, raw in rows:
            try:
                fields = msgpack.unpackb(raw, raw=False) if len(key) == _U64.size else None
            except ValueError:  # UnicodeDecodeError too
                fields = None
            if not isinstance(fields, dict):
                self._skip("dlq", key, "not an 8-byte id -> a msgpack map")
                continue
            yield DeadLetterRecord(_U64.unpack(key)[0], fields)

    # -- malformed rows ---------------------------------------------------------------------

    def _skip(self, db: str, key: bytes, problem: str) -> None:
        self.skipped += 1
        event(
            log, "state-row-malformed", logging.ERROR, db=db, key=repr(key[:160]), problem=problem
        )

    def _refused(self, app: str, session: str, db: str) -> bool:
        """Whether (app, session) cannot be written as a key (logged; not counted)."""
        problem = _key_names_problem(app, session)
        if problem is not None:
            event(log, "state-write-refused", logging.ERROR, db=db, app=app, problem=problem)
        return problem is not None
