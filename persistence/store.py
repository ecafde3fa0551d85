"""The message store: an ordered list of segments, one writer, any number of readers.

The writer (the persistence service) appends group-committed batches to the newest
segment and rolls to a new one by period or size, or when LMDB reports the map full.
Readers (queries, the broker's recovery, the CLI) find a message by seq with a bisect over
the segments' first seqs and re-list the directory when the writer has rolled.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from persistence.segments import (
    WATERMARK_KEY,
    Segment,
    StoredMessage,
    decode_record,
    encode_record,
    list_segment_files,
    remove_segment_files,
    segment_map_size,
    segment_name,
    seq_key,
    topic_key,
)

_OPEN_READERS = 32
_MIN_SLICE_BYTES = 64 * 1024
_ROW_OVERHEAD = 96
"""Bytes a stored row costs beyond its header and payload (record fields, both indexes)."""


@dataclass(frozen=True, slots=True)
class SegmentPolicy:
    """When the writer rolls to a new segment."""

    max_bytes: int = 1 << 30
    period_ns: int = 86_400 * 10**9


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    first_seq: int
    path: Path
    size_bytes: int
    last_seq: int
    first_ts_ns: int
    last_ts_ns: int


Bounds = tuple[int, int, int, int]
"""(first seq, last seq, first ts, last ts) of a segment's messages."""

Row = tuple[int, int, str, str, bytes, bytes, bytes, bool]
"""(seq, ts_ns, sender, topic, msg_id, header, stored payload, sealed) to append."""


class MessageStore:
    """Segments under `directory`; `readonly` for every process but persistence."""

    def __init__(
        self,
        directory: Path,
        readonly: bool = True,
        policy: SegmentPolicy | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.directory = directory
        self.readonly = readonly
        self.policy = policy or SegmentPolicy()
        self._clock = clock
        self._files: list[tuple[int, Path]] = []
        self._firsts: list[int] = []
        self._settled: dict[int, Bounds | None] = {}
        """Bounds of segments with a newer one after them: only the newest is written to,
        so these never change, and retention or a replay need not reopen them."""
        self._open: OrderedDict[int, Segment] = OrderedDict()
        self._active: Segment | None = None
        self._active_born_ns = 0
        if not readonly:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.refresh()
        if not readonly and self._files:
            first, _ = self._files[-1]
            self._active = self._segment(first)
            bounds = self._active.bounds()
            self._active_born_ns = bounds[2] if bounds else clock()

    # -- segments ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-list the segment files (another process may have rolled or deleted)."""
        self._files = list_segment_files(self.directory)
        self._firsts = [first for first, _ in self._files]
        present = set(self._firsts)
        for first in [first for first in self._open if first not in present]:
            self._open.pop(first).close()
        for first in [first for first in self._settled if first not in present]:
            del self._settled[first]

    def _bounds(self, first_seq: int) -> Bounds | None:
        """(first seq, last seq, first ts, last ts) of a segment, None when empty."""
        if first_seq in self._settled:
            return self._settled[first_seq]
        bounds = self._segment(first_seq).bounds()
        if first_seq != self._firsts[-1]:
            self._settled[first_seq] = bounds
        return bounds

    def _segment(self, first_seq: int) -> Segment:
        segment = self._open.get(first_seq)
        if segment is not None:
            self._open.move_to_end(first_seq)
            return segment
        path = self.directory / segment_name(first_seq)
        segment = Segment(path, first_seq, self.readonly, segment_map_size(self.policy.max_bytes))
        self._open[first_seq] = segment
        while len(self._open) > _OPEN_READERS:
            oldest, victim = next(iter(self._open.items()))
            if victim is self._active:
                self._open.move_to_end(oldest)
                continue
            self._open.pop(oldest).close()
        return segment

    def segments(self) -> list[SegmentInfo]:
        """Every segment with its bounds, oldest first (empty ones left out)."""
        infos: list[SegmentInfo] = []
        for first, path in self._files:
            try:
                bounds = self._bounds(first)
                size = path.stat().st_size
            except (lmdb.Error, FileNotFoundError):
                continue
            if bounds is not None:
                infos.append(SegmentInfo(first, path, size, bounds[1], *bounds[2:]))
        return infos

    def total_bytes(self) -> int:
        total = 0
        for _, path in self._files:
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def delete(self, first_seq: int) -> int:
        """Remove a closed segment; returns the bytes freed (never the active one)."""
        assert not self.readonly
        if self._active is not None and self._active.first_seq == first_seq:
            return 0
        segment = self._open.pop(first_seq, None)
        if segment is not None:
            segment.close()
        freed = remove_segment_files(self.directory / segment_name(first_seq))
        self.refresh()
        return freed

    @property
    def active_first_seq(self) -> int | None:
        return self._active.first_seq if self._active else None

    # -- writing ----------------------------------------------------------------------------

    def _roll(self, first_seq: int) -> Segment:
        self._active = self._segment(first_seq)
        self._active_born_ns = self._clock()
        self.refresh()
        return self._active

    def _needs_roll(self, now_ns: int) -> bool:
        active = self._active
        if active is None:
            return True
        if now_ns - self._active_born_ns >= self.policy.period_ns:
            return active.bounds() is not None
        return active.size_bytes >= self.policy.max_bytes

    def append(self, rows: list[Row], watermark: int | None = None) -> bool:
        """Write `rows` (ascending seq), rolling when due: in one synced transaction when
        they fit the active segment, else in slices of about a quarter segment each, so a
        big group commit cannot swell one segment far past the size retention works with.

        With `watermark`, the last transaction also records it (`Segment.watermark`), so a
        group without state changes costs one synced commit; returns whether it was
        recorded (not when there is no segment to hold it yet)."""
        if not rows:
            if watermark is None or self._active is None:
                return False
            self._append_rolling([], watermark)
            return True
        budget = max(self.policy.max_bytes // 4, _MIN_SLICE_BYTES)
        start, size = 0, 0
        for index, row in enumerate(rows):
            size += len(row[5]) + len(row[6]) + _ROW_OVERHEAD
            if size >= budget and index + 1 < len(rows):
                self._append_slice(rows[start : index + 1], None)
                start, size = index + 1, 0
        self._append_slice(rows[start:], watermark)
        return watermark is not None

    def _append_slice(self, rows: list[Row], watermark: int | None) -> None:
        if self._needs_roll(self._clock()):
            self._roll(rows[0][0])
        self._append_rolling(rows, watermark)

    def _append_rolling(self, rows: list[Row], watermark: int | None) -> None:
        """Write, rolling on a full map; a batch too big for an empty segment is split
        (the watermark goes with the last part)."""
        active = self._active
        assert active is not None
        try:
            self._write(active, rows, watermark)
        except lmdb.MapFullError:
            if rows and active.bounds() is not None:
                self._roll(rows[0][0])
                self._append_rolling(rows, watermark)
                return
            if len(rows) <= 1:
                raise
            half = len(rows) // 2
            self._append_rolling(rows[:half], None)
            self._append_rolling(rows[half:], watermark)

    @staticmethod
    def _write(segment: Segment, rows: list[Row], watermark: int | None) -> None:
        with segment.env.begin(write=True) as txn:
            msgs = txn.cursor(segment.msgs)
            topics = txn.cursor(segment.topics)
            for seq, ts, sender, topic, msg_id, header, payload, sealed in rows:
                record = encode_record(ts, [sender, topic, msg_id, header, payload, sealed])
                msgs.put(seq_key(seq), record, append=True)
                topics.put(topic_key(topic, seq), b"")
            if watermark is not None and segment.meta is not None:
                txn.put(WATERMARK_KEY, seq_key(watermark), db=segment.meta)

    def close(self) -> None:
        for segment in self._open.values():
            segment.close()
        self._open.clear()
        self._active = None

    # -- reading ----------------------------------------------------------------------------

    def _owner(self, seq: int) -> int | None:
        index = bisect.bisect_right(self._firsts, seq) - 1
        return self._firsts[index] if index >= 0 else None

    def get(self, seq: int) -> StoredMessage | None:
        for attempt in range(2):
            owner = self._owner(seq)
            if owner is not None:
                try:
                    found = self._segment(owner).get(seq)
                except lmdb.Error:  # deleted by retention since the last listing
                    found = None
                if found is not None:
                    return found
            if attempt == 0:
                self.refresh()
        return None

    def watermark(self) -> int:
        """The highest stream watermark a segment recorded (0: none): the newest record,
        as groups commit in order and a newer segment only holds later groups, so only
        the segments after the last one with a record are opened (not every file)."""
        for first in reversed(self._firsts):
            try:
                recorded = self._segment(first).watermark()
            except lmdb.Error:  # deleted by retention since the last listing
                continue
            if recorded:
                return recorded
        return 0

    def last_seq(self) -> int:
        """Highest stored message seq (0 when empty)."""
        for first in reversed(self._firsts):
            bounds = self._bounds(first)
            if bounds is not None:
                return bounds[1]
        return 0

    def history(self, topic: str, last: int) -> list[StoredMessage]:
        """The last `last` messages of `topic`, oldest first."""
        self.refresh()
        seqs: list[int] = []
        for first, _ in reversed(self._files):
            segment = self._segment(first)
            seqs.extend(segment.last_of_topic(topic, last - len(seqs)))
            if len(seqs) >= last:
                break
        found = [self.get(seq) for seq in reversed(seqs)]
        return [message for message in found if message is not None]

    def scan(
        self,
        since_ns: int,
        after_seq: int = 0,
        match: Callable[[str], bool] | None = None,
        topic: str | None = None,
    ) -> Iterator[StoredMessage]:
        """Messages with ts >= since_ns (and seq > after_seq), oldest first, lazily; of
        one `topic` through its index, else all (filtered by `match`)."""
        self.refresh()
        for first in list(self._firsts):
            bounds = self._bounds(first)
            if bounds is None or bounds[1] <= after_seq or bounds[3] < since_ns:
                continue
            segment = self._segment(first)
            start = after_seq + 1
            if bounds[2] < since_ns:
                position = segment.first_seq_at(since_ns)
                if position is None:
                    continue
                start = max(start, position)
            found = segment.scan_topic(topic, start) if topic else segment.scan(start)
            for message in found:
                if message.ts_ns >= since_ns and (match is None or match(message.topic)):
                    yield message

    def recent(self, count: int) -> list[StoredMessage]:
        """The last `count` stored messages, newest first (for the broker's dedupe)."""
        self.refresh()
        found: list[StoredMessage] = []
        for first, _ in reversed(self._files):
            segment = self._segment(first)
            with segment.env.begin(db=segment.msgs) as txn:
                cursor = txn.cursor()
                moved = cursor.last()
                while moved and len(found) < count:
                    key, raw = cursor.item()
                    found.append(decode_record(int.from_bytes(key, "big"), raw))
                    moved = cursor.prev()
            if len(found) >= count:
                break
        return found

    def describe(self) -> dict[str, Any]:
        infos = self.segments()
        return {
            "segments": len(infos),
            "bytes": self.total_bytes(),
            "first_seq": infos[0].first_seq if infos else 0,
            "last_seq": infos[-1].last_seq if infos else 0,
        }
