"""The journal: a small group made durable with one write and one flush.

LMDB makes a commit durable with two flushes in a row (the data pages with fdatasync,
then the meta page through a second, O_DSYNC descriptor), so a lone confirmed publish
waited for two disk round trips, 0.25-0.55 ms here. The journal is one preallocated,
zero-filled file: a group is one record written in place and one fdatasync. Overwriting
blocks that are already allocated and written changes no metadata the flush must carry
(neither the size nor the extents), so that flush is the disk's cheapest (perf notes in
the service). The service journals small groups, acknowledges them, and applies them to
LMDB later, many groups in one synced commit (persistence.service).

    record   magic "PXJ1" | payload bytes u32 | first seq u64 | last seq u64 |
             crc32 u32 (of everything before it and the payload) | payload

The valid records are the run from offset 0 in which each record is whole (magic, bounds
and CRC check out) and its seqs lie above the previous record's. The writer rewinds to
offset 0 only once LMDB holds everything journaled, so whatever lies beyond the run (a
record torn by a crash, older records not yet overwritten) is unreadable, or its seqs are
at or below the store's watermark and go nowhere when replayed (the writer skips them),
never mistaken for news. A clean close zeroes the first header: a journal only holds
anything after a crash.

Not thread-safe; the persistence service's loop owns it. Needs os.pwrite (POSIX): where
it is missing (`AVAILABLE` false) the service commits every group to LMDB directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

if sys.platform == "darwin":
    import fcntl

JOURNAL_FILE = "journal"
"""Its name under HOME/store."""
_MAGIC = b"PXJ1"
_HEAD = struct.Struct(">4sIQQI")
HEAD_BYTES = _HEAD.size
_ZERO_CHUNK = 1 << 20
FREE_FACTOR = 4
AVAILABLE = hasattr(os, "pwrite") and hasattr(os, "pread")


@dataclass(frozen=True, slots=True)
class JournalRecord:
    first: int
    last: int
    payload: bytes


def _flush(fd: int) -> None:
    """Data to stable storage, as LMDB flushes: F_FULLFSYNC on macOS (its fsync stops at
    the drive's cache), fsync on Windows, fdatasync elsewhere."""
    if sys.platform == "darwin":
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    elif sys.platform == "win32":
        os.fsync(fd)
    else:
        os.fdatasync(fd)


def encode_record(first: int, last: int, payload: bytes) -> bytes:
    """One record's bytes (what `Journal.append` writes)."""
    head = _HEAD.pack(_MAGIC, len(payload), first, last, 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + crc.to_bytes(4, "big") + payload


def scan(data: bytes | memoryview) -> tuple[list[JournalRecord], int]:
    """The valid run of records at the start of `data`, and where it ends."""
    records: list[JournalRecord] = []
    offset, previous = 0, 0
    size = len(data)
    while offset + HEAD_BYTES <= size:
        magic, length, first, last, crc = _HEAD.unpack_from(data, offset)
        end = offset + HEAD_BYTES + length
        if magic != _MAGIC or end > size or not previous < first <= last:
            break
        payload = bytes(data[offset + HEAD_BYTES : end])
        head = bytes(data[offset : offset + HEAD_BYTES - 4])
        if zlib.crc32(payload, zlib.crc32(head)) != crc:
            break
        records.append(JournalRecord(first, last, payload))
        offset, previous = end, last
    return records, offset


class Journal:
    """One preallocated file of records; `append` returns once the record is on disk."""

    def __init__(self, path: Path, capacity: int) -> None:
        """Open `path`, creating and zero-filling it up to `capacity` bytes; OSError when
        that fails (nothing left behind then) or when the disk has less than
        `FREE_FACTOR` times the capacity free (the journal must never be what fills it)."""
        self.path = path
        existed = path.exists()
        if not existed:
            free = _free_bytes(path.parent)
            if free is not None and free < FREE_FACTOR * capacity:
                raise OSError(
                    errno.ENOSPC, f"{free} bytes free, the journal wants {capacity} of them"
                )
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        try:
            size = os.fstat(self._fd).st_size
            if size < capacity:
                self._zero_fill(size, capacity)
                if not existed:  # the file's name must survive a power cut too
                    _sync_directory(path.parent)
            self.capacity = max(size, capacity)
        except BaseException:
            os.close(self._fd)
            if not existed:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self.offset = 0
        """Where the next record goes."""
        self.last = 0
        """Highest seq journaled since the last rewind (0: none)."""

    def _zero_fill(self, start: int, end: int) -> None:
        chunk = bytes(_ZERO_CHUNK)
        position = start
        while position < end:
            position += os.pwrite(self._fd, chunk[: min(_ZERO_CHUNK, end - position)], position)
        os.fsync(self._fd)  # the size and the blocks: later flushes carry data only

    def records(self) -> list[JournalRecord]:
        """The valid run (what a crash left); the next append goes after it."""
        data = os.pread(self._fd, self.capacity, 0)
        records, self.offset = scan(data)
        self.last = records[-1].last if records else 0
        return records

    def fits(self, payload_bytes: int) -> bool:
        return self.offset + HEAD_BYTES + payload_bytes <= self.capacity

    def append(self, first: int, last: int, payload: bytes) -> None:
        """Write one record and flush it; OSError when the disk failed (nothing may be
        assumed about the record then: the caller stores the group another way)."""
        if not self.fits(len(payload)):
            raise ValueError("the record does not fit the journal: apply and rewind first")
        if first <= self.last:
            raise ValueError(f"journal seqs must grow: {first} after {self.last}")
        record = encode_record(first, last, payload)
        written = os.pwrite(self._fd, record, self.offset)
        if written != len(record):
            raise OSError(f"short journal write: {written} of {len(record)} bytes")
        _flush(self._fd)
        self.offset += len(record)
        self.last = last

    def rewind(self) -> None:
        """Start again at offset 0: only once LMDB holds everything journaled (synced)."""
        self.offset = 0

    def close(self, clean: bool) -> None:
        """Close; `clean` (everything journaled is in LMDB): zero the first header, so the
        next start finds nothing to replay."""
        try:
            if clean:
                with contextlib.suppress(OSError):
                    os.pwrite(self._fd, bytes(HEAD_BYTES), 0)
                    _flush(self._fd)
        finally:
            os.close(self._fd)


def _free_bytes(directory: Path) -> int | None:
    """Bytes free for this user on `directory`'s filesystem (None: the OS cannot tell)."""
    try:
        stat = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS opens directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
