"""The per-app log files: their format, their names, and writing them with rotation by size.

Each line of `HOME/logs/APP.log` is one line the app wrote to stdout or stderr, behind the
UTC time the supervisor read it, to the millisecond, and one space:

    2026-11-27T09:00:00.123Z Traceback (most recent call last):

When a write would take `APP.log` past `max_bytes`, the files shift by one (`APP.log.1`
becomes `APP.log.2`, ..., `APP.log` becomes `APP.log.1`; the oldest falls off) and a new
`APP.log` begins, so `files` files (the current one included) are kept, at most about
`files * max_bytes` bytes per app. A line is never split across two files.

`LogDirectory` keeps a bounded number of files open (least recently written closed
first), so 500 apps do not need 500 descriptors beside their 500 pipes.

Writing and reading sit in this one module's format: `plexus logs` (`plexus.log_tail`)
reads what `stamp` and `RotatingLog` wrote, with `parse` and `rotated`.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_FILES = 5
DEFAULT_MAX_OPEN = 64

_STAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_STAMP_LEN = 24


def stamp(moment: float) -> str:
    """`moment` (epoch seconds) as the time stamp of a log line: UTC, milliseconds, `Z`."""
    whole = int(moment)
    millis = int((moment - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def parse(line: bytes) -> tuple[float | None, str]:
    """A line of a log file (without its newline) as (epoch seconds, the app's text); a
    line without a stamp (not written by the supervisor) is (None, the whole line)."""
    head = line[:_STAMP_LEN]
    if len(line) > _STAMP_LEN and line[_STAMP_LEN] == 0x20 and _STAMP.fullmatch(head):
        moment = datetime.strptime(head.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return round(moment.timestamp(), 3), line[_STAMP_LEN + 1 :].decode("utf-8", "replace")
    return None, line.decode("utf-8", "replace")


def rotated(path: Path, files: int) -> list[Path]:
    """`path` and its rotated files, newest first: APP.log, APP.log.1, ... APP.log.{files-1}."""
    return [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, files)]


class RotatingLog:
    """One app's log file, appended to and rotated by size (see the module docstring).

    Opened on the first write and reopened after `close`; every write goes to the disk at
    once (one `write` a batch, no buffer), so a reader sees a line as soon as it is written.
    """

    def __init__(self, path: Path, max_bytes: int, files: int) -> None:
        if max_bytes < 1 or files < 1:
            raise ValueError("max_bytes and files must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.files = files
        self._fd: int | None = None
        self._size = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def write(self, lines: Sequence[bytes]) -> None:
        """Append `lines` (each with its newline), rotating first where one would not fit."""
        batch: list[bytes] = []
        if self._fd is None:
            self._open(truncate=False)
        for line in lines:
            if self._size and self._size + len(line) > self.max_bytes:
                self._write(batch)
                batch = []
                self._rotate()
            batch.append(line)
            self._size += len(line)
        self._write(batch)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # the directory is gone (or never was): make it again
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _write(self, batch: list[bytes]) -> None:
        if batch and self._fd is not None:
            data = memoryview(b"".join(batch))
            while data:
                data = data[os.write(self._fd, data) :]

    def _rotate(self) -> None:
        self.close()
        names = rotated(self.path, self.files)
        for older, newer in zip(reversed(names[1:]), reversed(names[:-1]), strict=True):
            if newer.exists():
                os.replace(newer, older)
        self._open(truncate=True)  # with files = 1 nothing moved: start the one file afresh


class LogDirectory:
    """The log files of every app under one directory, at most `max_open` of them open."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        files: int = DEFAULT_FILES,
        max_open: int = DEFAULT_MAX_OPEN,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.files = files
        self.max_open = max_open
        self._logs: dict[str, RotatingLog] = {}
        self._open: OrderedDict[str, RotatingLog] = OrderedDict()

    def path(self, app: str) -> Path:
        return self.directory / f"{app}.log"

    def write(self, app: str, lines: Sequence[bytes]) -> None:
        """Append `lines` to `app`'s log; raises OSError when the disk refuses."""
        log = self._logs.get(app)
        if log is None:
            log = self._logs[app] = RotatingLog(self.path(app), self.max_bytes, self.files)
        self._open.pop(app, None)
        try:
            log.write(lines)
        finally:
            if log.is_open:
                self._open[app] = log
            while len(self._open) > self.max_open:
                _, oldest = self._open.popitem(last=False)
                oldest.close()

    @property
    def open_files(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for log in self._open.values():
            log.close()
        self._open.clear()
