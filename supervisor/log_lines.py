"""Bytes read from an app's pipe, cut into text lines: the pure part of the output pump.

A read returns whatever the pipe held, so a line can arrive in pieces, several lines in
one piece, or never end (a prompt, a progress bar, binary junk). `LineSplitter` keeps the
unfinished piece until its newline comes; a line longer than `max_bytes` is cut into
several (at a UTF-8 character boundary where there is one), so one app cannot make the
supervisor buffer without bound; what does not decode as UTF-8 becomes U+FFFD, so the log
file is always valid text. `close` hands out the unfinished piece when the pipe ends: an
app's last words (a traceback without its final newline) are never lost.
"""

from __future__ import annotations

MAX_LINE_BYTES = 16 * 1024
"""A longer line is cut into lines of at most this many bytes."""


def _cut(data: bytes, limit: int) -> int:
    """Where to cut `data` (longer than `limit`): at most `limit` bytes, not inside a UTF-8
    character when one of the last three bytes starts one."""
    for back in range(4):
        cut = limit - back
        if cut <= 0:
            break
        if data[cut] & 0xC0 != 0x80:  # data[cut] starts a character (or is ASCII)
            return cut
    return limit


def _pieces(data: bytes, limit: int) -> tuple[list[bytes], bytes]:
    """`data` cut into pieces of at most `limit` bytes: the full pieces and the last one."""
    pieces: list[bytes] = []
    while len(data) > limit:
        cut = _cut(data, limit)
        pieces.append(data[:cut])
        data = data[cut:]
    return pieces, data


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace")


class LineSplitter:
    """Cuts one pipe's byte stream into lines (text, without their newline)."""

    __slots__ = ("_pending", "max_bytes")

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        if max_bytes < 4:
            raise ValueError("max_bytes must be at least 4 (one UTF-8 character)")
        self.max_bytes = max_bytes
        self._pending = b""

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line held back (never more than `max_bytes`)."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[str]:
        """The lines `data` completes; the rest waits for its newline (or for `close`)."""
        buffer = self._pending + data if self._pending else data
        *lines, rest = buffer.split(b"\n")
        out: list[str] = []
        for line in lines:
            pieces, last = _pieces(line.removesuffix(b"\r"), self.max_bytes)
            out.extend(_text(piece) for piece in pieces)
            out.append(_text(last))
        pieces, self._pending = _pieces(rest, self.max_bytes)
        out.extend(_text(piece) for piece in pieces)
        return out

    def close(self) -> list[str]:
        """The unfinished line, if any: the pipe ended without a final newline."""
        rest, self._pending = self._pending, b""
        return [_text(rest)] if rest else []
