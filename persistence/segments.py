"""Messages on disk in time segments: one LMDB environment per period or size.

As Kafka rolls log segments, the store rolls to a new LMDB file when the current one is
older than `period_ns` or larger than `max_bytes`, so retention deletes whole files and the
disk space really returns (LMDB never shrinks a file). Inside a segment:

    msgs   seq (8 bytes, big endian) -> ts_ns (8 bytes) + msgpack
                                        [sender, topic, msg_id, header, payload, sealed]
    topic  topic + NUL + seq         -> b""   (topics never contain NUL)

The broker stamps timestamps monotonically, so seq order is time order and a timestamp
is found by binary search over seq; no time index is needed. One process writes
(persistence); the broker, the query service and the CLI open segments read-only.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack

_SEQ = struct.Struct(">Q")
WATERMARK_KEY = b"watermark"
_PREFIX = "seg-"
_SUFFIX = ".mdb"
_MAP_SLACK = 64 * 2**20
_PAGE = 512
"""Messages read per short read transaction of a scan."""


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


def topic_key(topic: str, seq: int) -> bytes:
    return topic.encode() + b"\0" + _SEQ.pack(seq)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as stored (payload possibly sealed; the store opens it)."""

    seq: int
    ts_ns: int
    sender: str
    topic: str
    msg_id: bytes
    header: bytes
    payload: bytes
    sealed: bool


def encode_record(ts_ns: int, fields: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return _SEQ.pack(ts_ns) + packed


def decode_record(seq: int, raw: bytes | memoryview) -> StoredMessage:
    ts = _SEQ.unpack_from(raw)[0]
    sender, topic, msg_id, header, payload, sealed = msgpack.unpackb(raw[8:], raw=False)
    return StoredMessage(seq, ts, sender, topic, msg_id, header, payload, bool(sealed))


class Segment:
    """One LMDB file of messages, first sequence number in its name."""

    def __init__(self, path: Path, first_seq: int, readonly: bool, map_size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.readonly = readonly
        self.env = lmdb.open(
            str(path),
            subdir=False,
            readonly=readonly,
            lock=True,
            max_dbs=4,
            map_size=map_size,
            create=not readonly,
            mode=0o600,
            readahead=False,
            metasync=True,
            sync=True,
        )
        self.msgs = self.env.open_db(b"msgs", create=not readonly)
        self.topics = self.env.open_db(b"topic", create=not readonly)
        try:
            self.meta: Any = self.env.open_db(b"meta", create=not readonly)
        except lmdb.NotFoundError:  # written before the key existed, opened read-only
            self.meta = None

    def watermark(self) -> int:
        """The stream watermark this segment's last group commit recorded (0: none):
        a group with no state changes moves the watermark here, in the same synced
        transaction as its messages, instead of in a second one in state.mdb."""
        if self.meta is None:
            return 0
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(WATERMARK_KEY)
        return _SEQ.unpack(raw)[0] if raw is not None else 0

    def close(self) -> None:
        self.env.close()

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def bounds(self) -> tuple[int, int, int, int] | None:
        """(first seq, last seq, first ts, last ts) of its messages, None when empty."""
        with self.env.begin(db=self.msgs) as txn:
            cursor = txn.cursor()
            if not cursor.first():
                return None
            first_seq = _SEQ.unpack(cursor.key())[0]
            first_ts = _SEQ.unpack_from(cursor.value())[0]
            cursor.last()
            last_seq = _SEQ.unpack(cursor.key())[0]
            last_ts = _SEQ.unpack_from(cursor.value())[0]
        return first_seq, last_seq, first_ts, last_ts

    def get(self, seq: int) -> StoredMessage | None:
        with self.env.begin(db=self.msgs) as txn:
            raw = txn.get(_SEQ.pack(seq))
        return decode_record(seq, raw) if raw is not None else None

    def first_seq_at(self, ts_ns: int) -> int | None:
        """A position whose next message is the first with ts >= ts_ns, None if none.

        Binary search over positions p: "the first message at or after p has ts >= ts_ns"
        is monotone in p (seqs of other events leave holes, so p need not be a key).
        """
        bounds = self.bounds()
        if bounds is None or bounds[3] < ts_ns:
            return None
        low, high = bounds[0], bounds[1]
        with self.env.begin(db=self.msgs) as txn:
            cursor = txn.cursor()
            while low < high:
                middle = (low + high) // 2
                cursor.set_range(_SEQ.pack(middle))
                if _SEQ.unpack_from(cursor.value())[0] >= ts_ns:
                    high = middle
                else:
                    low = middle + 1
        return low

    def scan(self, start_seq: int) -> Iterator[StoredMessage]:
        """Messages from `start_seq` on, in order."""

        def page(txn: lmdb.Transaction, start: int) -> list[StoredMessage]:
            cursor = txn.cursor(self.msgs)
            if not cursor.set_range(_SEQ.pack(start)):
                return []
            found: list[StoredMessage] = []
            for key, raw in cursor:
                found.append(decode_record(_SEQ.unpack(key)[0], raw))
                if len(found) >= _PAGE:
                    break
            return found

        return self._paged(start_seq, page)

    def scan_topic(self, topic: str, start_seq: int) -> Iterator[StoredMessage]:
        """Messages of one topic from `start_seq` on, in order, through the topic index."""
        prefix = topic.encode() + b"\0"

        def page(txn: lmdb.Transaction, start: int) -> list[StoredMessage]:
            index = txn.cursor(self.topics)
            if not index.set_range(prefix + _SEQ.pack(start)):
                return []
            found: list[StoredMessage] = []
            for key in index.iternext(keys=True, values=False):
                if key[: len(prefix)] != prefix:
                    break
                seq = _SEQ.unpack_from(key, len(prefix))[0]
                raw = txn.get(_SEQ.pack(seq), db=self.msgs)
                if raw is not None:
                    found.append(decode_record(seq, raw))
                if len(found) >= _PAGE:
                    break
            return found

        return self._paged(start_seq, page)

    def _paged(
        self, start_seq: int, page: Callable[[lmdb.Transaction, int], list[StoredMessage]]
    ) -> Iterator[StoredMessage]:
        """Pages of `page(txn, from_seq)`, each in its own short read transaction, so a
        slow consumer of a long scan never holds a reader open on old pages."""
        while True:
            with self.env.begin() as txn:
                found = page(txn, start_seq)
            yield from found
            if len(found) < _PAGE:
                return
            start_seq = found[-1].seq + 1

    def last_of_topic(self, topic: str, count: int) -> list[int]:
        """Seqs of the last `count` messages of `topic` here, newest first."""
        prefix = topic.encode() + b"\0"
        found: list[int] = []
        with self.env.begin(db=self.topics) as txn:
            cursor = txn.cursor()
            positioned = cursor.set_range(prefix + b"\xff" * 8)
            moved = cursor.prev() if positioned else cursor.last()
            while moved and len(found) < count:
                key = cursor.key()
                if not key.startswith(prefix) or len(key) != len(prefix) + 8:
                    break
                found.append(_SEQ.unpack_from(key, len(prefix))[0])
                moved = cursor.prev()
        return found


def segment_name(first_seq: int) -> str:
    return f"{_PREFIX}{first_seq:020d}{_SUFFIX}"


def list_segment_files(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of the segment files in `directory`, oldest first."""
    found: list[tuple[int, Path]] = []
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        name = path.name
        if name.startswith(_PREFIX) and name.endswith(_SUFFIX):
            digits = name[len(_PREFIX) : -len(_SUFFIX)]
            if digits.isdigit():
                found.append((int(digits), path))
    return sorted(found)


def remove_segment_files(path: Path) -> int:
    """Delete a segment and its lock file; returns the bytes freed."""
    freed = 0
    for victim in (path, path.with_name(path.name + "-lock")):
        try:
            freed += victim.stat().st_size
            os.unlink(victim)
        except FileNotFoundError:
            continue
    return freed


def segment_map_size(max_bytes: int) -> int:
    return max_bytes + max_bytes // 4 + _MAP_SLACK
