"""Reading an app's log files for `plexus logs`: the last lines, then new ones as they come.

Works on the files alone (`supervisor.log_files` writes them), so it needs no running
platform. `LogFollower` holds the file open and remembers where it stopped; each `poll`
returns the complete lines written since, and follows the file across rotation: when
`APP.log` is replaced by a new file it reads the old one to its end first, then the new
one from its start; when the file shrank (truncated in place) it starts again from the top.
It never sleeps: the caller decides how often to poll, so tests need no clock at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from supervisor.log_files import rotated

BLOCK = 64 * 1024
READ_MAX = 1024 * 1024
"""At most this much is read per `poll`, so a huge backlog prints as it is read."""
ROTATED_SEARCHED = 100
"""How many rotated files `backlog` looks through at most (more than any config keeps)."""


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def last_lines(file: BinaryIO, end: int, count: int) -> list[bytes]:
    """The last `count` lines of `file` before offset `end`, reading backwards a block at a
    time: a 50 MiB log costs a few blocks, not 50 MiB."""
    if count <= 0:
        return []
    position, data = end, b""
    while position > 0 and data.count(b"\n") <= count:
        step = min(BLOCK, position)
        position -= step
        file.seek(position)
        data = file.read(step) + data
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # `end` ends a line: nothing follows its newline
    if position > 0:
        lines.pop(0)  # the end of a line that began before what was read
    return lines[-count:]


class LogFollower:
    """`path` (APP.log), from its current end on; the file may not exist yet."""

    def __init__(self, path: Path, files: int = ROTATED_SEARCHED) -> None:
        self.path = path
        self.files = files
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self._partial = b""
        """Bytes after the last newline read: a line the writer has not finished."""
        self._start_at_end()

    def backlog(self, count: int) -> list[bytes]:
        """The last `count` complete lines before where following starts, older rotated
        files included when the current one holds fewer."""
        found: list[bytes] = []
        if self._file is not None:
            end = self._file.tell() - len(self._partial)
            found = last_lines(self._file, end, count)
            self._file.seek(end + len(self._partial))
        for older in rotated(self.path, self.files)[1:]:
            if len(found) >= count:
                break
            try:
                with older.open("rb") as file:
                    size = file.seek(0, os.SEEK_END)
                    found = last_lines(file, size, count - len(found)) + found
            except FileNotFoundError:
                break
        return found[-count:] if count > 0 else []

    def poll(self) -> list[bytes]:
        """Complete lines written since the last call (the writer's unfinished one waits)."""
        if self._file is None and not self._open_new():
            return []
        lines = self._read()
        try:
            info = os.stat(self.path)
        except FileNotFoundError:  # between a rotation's rename and the new file
            return lines
        assert self._file is not None
        if _identity(info) != self._identity:  # rotated: the old file is read to its end
            lines += self._finish()
            lines += self._skipped()
            self._file.close()
            self._file = None
            if self._open_new():
                lines += self._read()
        elif info.st_size < self._file.tell():  # truncated in place
            self._file.seek(0)
            self._partial = b""
            lines += self._read()
        return lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _skipped(self) -> list[bytes]:
        """The lines of files rotated in after ours and out again before we looked (several
        rotations between two polls): APP.log.{k-1} ... APP.log.1 when ours is APP.log.k."""
        newer: list[Path] = []
        for older in rotated(self.path, self.files)[1:]:
            try:
                if _identity(os.stat(older)) == self._identity:
                    break
            except FileNotFoundError:
                break  # ours fell off the end: every rotated file is newer than it
            newer.append(older)
        lines: list[bytes] = []
        for path in reversed(newer):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            lines += data.removesuffix(b"\n").split(b"\n") if data else []
        return lines

    def _start_at_end(self) -> None:
        if not self._open_new():
            return
        assert self._file is not None
        size = self._file.seek(0, os.SEEK_END)
        start = max(0, size - BLOCK)
        self._file.seek(start)
        tail = self._file.read(size - start)
        newline = tail.rfind(b"\n")
        if newline >= 0 or start == 0:
            self._partial = tail[newline + 1 :]
        # else: one line longer than BLOCK is being written; it is followed from here

    def _open_new(self) -> bool:
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            return False
        self._file = file
        self._identity = _identity(os.fstat(file.fileno()))
        self._partial = b""
        return True

    def _read(self) -> list[bytes]:
        """The complete lines of one read (at most READ_MAX bytes)."""
        return self._read_once()[0]

    def _read_once(self) -> tuple[list[bytes], bool]:
        assert self._file is not None
        data = self._file.read(READ_MAX)
        if not data:
            return [], False
        *lines, self._partial = (self._partial + data).split(b"\n")
        return lines, True

    def _finish(self) -> list[bytes]:
        """The rest of a file that will not grow any more, its last line even unfinished."""
        lines: list[bytes] = []
        while True:
            chunk, more = self._read_once()
            lines += chunk
            if not more:
                break
        rest, self._partial = self._partial, b""
        return [*lines, rest] if rest else lines
