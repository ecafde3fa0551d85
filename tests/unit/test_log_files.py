"""The per-app log files: the line format, rotation by size, the bounded set of open files,
and reading them back for `plexus logs` (last lines, following across rotation), all on a
temp dir with no process, thread or sleep."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plexus.log_tail import LogFollower, last_lines
from supervisor.log_files import LogDirectory, RotatingLog, parse, rotated, stamp


def _lines(*texts: str) -> list[bytes]:
    return [f"{t}\n".encode() for t in texts]


def test_a_stamp_is_utc_to_the_millisecond_and_parses_back() -> None:
    assert stamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert stamp(1_790_000_000.1234) == "2026-09-21T14:13:20.123Z"
    line = f"{stamp(1_790_000_000.5)} Traceback (most recent call last):".encode()
    assert parse(line) == (1_790_000_000.5, "Traceback (most recent call last):")
    assert parse(b"no stamp here") == (None, "no stamp here")
    assert parse(b"2026-09-21T14:13:20.123Z") == (None, "2026-09-21T14:13:20.123Z")


def test_rotation_keeps_n_files_and_never_splits_a_line(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    log = RotatingLog(path, max_bytes=20, files=3)
    for i in range(12):
        log.write(_lines(f"line {i:02d}"))  # 8 bytes a line: two fit in a file
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["app.log", "app.log.1", "app.log.2"]
    assert path.read_bytes() == b"line 10\nline 11\n"
    assert (tmp_path / "app.log.1").read_bytes() == b"line 08\nline 09\n"
    assert (tmp_path / "app.log.2").read_bytes() == b"line 06\nline 07\n"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_batch_rotates_where_it_no_longer_fits(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    log = RotatingLog(path, max_bytes=10, files=2)
    log.write(_lines("aaaa", "bbbb", "cccc"))  # 5 bytes each
    assert (tmp_path / "app.log.1").read_bytes() == b"aaaa\nbbbb\n"
    assert path.read_bytes() == b"cccc\n"
    log.write(_lines("x" * 30))  # longer than a file: alone in one, never cut
    assert path.read_bytes() == b"x" * 30 + b"\n"
    assert (tmp_path / "app.log.1").read_bytes() == b"cccc\n"


def test_one_file_kept_means_starting_it_afresh(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    log = RotatingLog(path, max_bytes=10, files=1)
    log.write(_lines("aaaa", "bbbb", "cccc"))
    assert path.read_bytes() == b"cccc\n"
    assert [p.name for p in tmp_path.iterdir()] == ["app.log"]


def test_a_new_run_appends_to_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"old\n")
    log = RotatingLog(path, max_bytes=100, files=2)
    log.write(_lines("new"))
    assert path.read_bytes() == b"old\nnew\n"


def test_a_directory_keeps_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    logs = LogDirectory(tmp_path, max_bytes=1000, files=2, max_open=3)
    for round_ in range(3):
        for app in ("a", "b", "c", "d", "e"):
            logs.write(app, _lines(f"{app}{round_}"))
            assert logs.open_files <= 3
    logs.close()
    assert logs.open_files == 0
    assert (tmp_path / "a.log").read_bytes() == b"a0\na1\na2\n"
    assert (tmp_path / "e.log").read_bytes() == b"e0\ne1\ne2\n"


def test_last_lines_reads_backwards_across_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(50_000)))
    with path.open("rb") as file:
        size = path.stat().st_size
        assert last_lines(file, size, 3) == [b"line 49997", b"line 49998", b"line 49999"]
        assert last_lines(file, size, 0) == []
        assert len(last_lines(file, size, 20_000)) == 20_000
        assert last_lines(file, size, 60_000)[0] == b"line 0"


def _write(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def test_backlog_then_new_lines_and_an_unfinished_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"one\ntwo\nthree\nfour\nhalf")
    follower = LogFollower(path)
    assert follower.backlog(3) == [b"two", b"three", b"four"]
    assert follower.poll() == []
    _write(path, b" done\nfive\n")
    assert follower.poll() == [b"half done", b"five"]
    assert follower.poll() == []
    follower.close()


def test_backlog_reaches_into_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    (tmp_path / "app.log.2").write_bytes(b"a\nb\n")
    (tmp_path / "app.log.1").write_bytes(b"c\nd\n")
    path.write_bytes(b"e\n")
    follower = LogFollower(path)
    assert follower.backlog(4) == [b"b", b"c", b"d", b"e"]
    assert follower.backlog(10) == [b"a", b"b", b"c", b"d", b"e"]
    assert follower.backlog(0) == []
    follower.close()


def test_following_crosses_rotations_even_several_between_two_polls(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    log = RotatingLog(path, max_bytes=12, files=3)
    log.write(_lines("first"))
    follower = LogFollower(path)
    assert follower.backlog(5) == [b"first"]
    log.write(_lines("second"))  # does not fit beside "first": rotates
    assert follower.poll() == [b"second"]
    log.write(_lines("third", "fourth", "fifth", "sixth"))  # three rotations
    assert follower.poll() == [b"third", b"fourth", b"fifth", b"sixth"]
    log.write(_lines("seventh"))
    assert follower.poll() == [b"seventh"]
    follower.close()
    log.close()


def test_following_reads_the_old_file_to_its_end_before_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"start\n")
    follower = LogFollower(path)
    _write(path, b"last of old\nunfinished")
    os.replace(path, tmp_path / "app.log.1")
    assert follower.poll() == [b"last of old"]  # no new file yet: the old one may grow
    path.write_bytes(b"new one\n")
    assert follower.poll() == [b"unfinished", b"new one"]
    follower.close()


def test_following_restarts_at_the_top_of_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"a long first line\nanother one\n")
    follower = LogFollower(path)
    with path.open("wb") as file:  # truncated in place (files = 1)
        file.write(b"fresh\n")
    assert follower.poll() == [b"fresh"]
    follower.close()


def test_following_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    follower = LogFollower(path)
    assert follower.backlog(20) == []
    assert follower.poll() == []
    path.write_bytes(b"hello\n")
    assert follower.poll() == [b"hello"]  # a file that appears is read from its start
    follower.close()


def test_rotated_names_newest_first(tmp_path: Path) -> None:
    assert [p.name for p in rotated(tmp_path / "x.log", 3)] == ["x.log", "x.log.1", "x.log.2"]
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", 0, 1)
