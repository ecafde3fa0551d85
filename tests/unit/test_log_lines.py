"""Cutting an app's pipe bytes into lines: pieces in any chunking, long lines, bad bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from supervisor.log_lines import LineSplitter


def _all(splitter: LineSplitter, chunks: list[bytes]) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out + splitter.close()


def test_lines_in_pieces_wait_for_their_newline() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"hel") == []
    assert splitter.pending == 3
    assert splitter.feed(b"lo\nwor") == ["hello"]
    assert splitter.feed(b"ld\n\nnext\n") == ["world", "", "next"]
    assert splitter.pending == 0
    assert splitter.close() == []


def test_close_flushes_the_unfinished_line() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"Traceback (most recent call last):\nValueError: boom") == [
        "Traceback (most recent call last):"
    ]
    assert splitter.close() == ["ValueError: boom"]
    assert splitter.close() == []


def test_crlf_ends_a_line_like_lf() -> None:
    assert _all(LineSplitter(), [b"a\r", b"\nb\r\n"]) == ["a", "b"]


def test_undecodable_bytes_are_replaced() -> None:
    assert _all(LineSplitter(), [b"ok \xff\xfe end\n"]) == ["ok \ufffd\ufffd end"]


def test_a_character_split_between_reads_is_kept_whole() -> None:
    data = "prix 12 €\n".encode()
    cut = data.index(b"\xe2") + 1  # inside the euro sign
    assert _all(LineSplitter(), [data[:cut], data[cut:]]) == ["prix 12 €"]


def test_a_long_line_is_cut_and_the_buffer_stays_bounded() -> None:
    splitter = LineSplitter(max_bytes=10)
    out = splitter.feed(b"x" * 25)
    assert out == ["x" * 10, "x" * 10]
    assert splitter.pending == 5
    assert splitter.feed(b"yy\n") == ["xxxxxyy"]


def test_a_long_line_is_cut_between_characters() -> None:
    line = "é" * 8  # 16 bytes, 2 each
    pieces = _all(LineSplitter(max_bytes=5), [line.encode() + b"\n"])
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= 5 for p in pieces)
    assert "\ufffd" not in "".join(pieces)


@given(
    st.lists(st.text(st.characters(codec="utf-8", blacklist_characters="\r\n"), max_size=40)),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_chunking_gives_the_same_lines(lines: list[str], cuts: list[int]) -> None:
    data = "".join(f"{line}\n" for line in lines).encode()
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert _all(LineSplitter(), chunks) == lines


@given(st.binary(max_size=300), st.integers(min_value=4, max_value=40))
def test_every_byte_lands_in_some_line_within_the_limit(data: bytes, limit: int) -> None:
    out = _all(LineSplitter(max_bytes=limit), [data[i : i + 7] for i in range(0, len(data), 7)])
    assert all(len(line.encode()) <= limit * 3 for line in out)  # U+FFFD is 3 bytes
    if b"\r" not in data and all(b < 0x80 for b in data):
        assert "".join(out) == data.decode().replace("\n", "")
        assert all(len(line) <= limit for line in out)
