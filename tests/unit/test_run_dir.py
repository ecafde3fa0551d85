"""The short run dir under the temp dir (broker.paths): made 0700 and checked after, and
refused, never followed, when it is not surely this user's (issue 12, threat 10)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.paths import PlatformPaths, UnsafeDirectory


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in temp dir, sticky and world-writable like /tmp."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    temp.chmod(0o1777)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(temp))
    return temp


def long_paths(tmp_path: Path) -> PlatformPaths:
    paths = PlatformPaths.resolve(tmp_path / ("h" * 100))
    assert paths.run_dir_is_shared
    return paths


def test_the_stand_in_is_made_0700_and_used(tmp_path: Path, shared: Path) -> None:
    paths = long_paths(tmp_path)
    paths.prepare()
    info = paths.run_dir.lstat()
    assert paths.run_dir.parent == shared
    assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o700)
    paths.prepare()  # again: it is ours now
    assert paths.read_state() is None


def test_a_symlink_is_refused_and_not_followed(tmp_path: Path, shared: Path) -> None:
    paths = long_paths(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    paths.run_dir.symlink_to(target)
    for step in (paths.prepare, paths.read_state):
        with pytest.raises(UnsafeDirectory, match="symbolic link"):
            step()
    assert list(target.iterdir()) == []


def test_a_loose_one_is_refused_not_tightened(tmp_path: Path, shared: Path) -> None:
    paths = long_paths(tmp_path)
    paths.run_dir.mkdir()
    paths.run_dir.chmod(0o755)
    with pytest.raises(UnsafeDirectory, match="mode is 755") as refused:
        paths.prepare()
    assert str(paths.run_dir) in str(refused.value) and "rm -r" in str(refused.value)
    assert paths.run_dir.stat().st_mode & 0o777 == 0o755


def test_another_users_is_refused(
    tmp_path: Path, shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = long_paths(tmp_path)
    run_dir = paths.run_dir
    paths.prepare()
    mine = os.getuid()
    monkeypatch.setattr("os.getuid", lambda: mine + 1)
    # the name carries the uid: point the other user's name at the same directory
    monkeypatch.setattr(PlatformPaths, "run_dir", property(lambda self: run_dir))
    with pytest.raises(UnsafeDirectory, match=f"belongs to user id {mine}"):
        paths.check_run_dir()


def test_a_temp_dir_without_the_sticky_bit_is_refused(tmp_path: Path, shared: Path) -> None:
    shared.chmod(0o777)
    with pytest.raises(UnsafeDirectory, match="sticky"):
        long_paths(tmp_path).prepare()


def test_an_absent_stand_in_reads_as_no_platform(tmp_path: Path, shared: Path) -> None:
    assert long_paths(tmp_path).read_state() is None
