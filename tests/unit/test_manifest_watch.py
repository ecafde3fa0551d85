"""Manifests added, changed and removed while the platform runs."""

from __future__ import annotations

import os
from pathlib import Path

from broker.manifests import load_manifests
from supervisor.manifest_watch import ManifestWatch, diff_manifests


def _write(apps: Path, app_id: str, body: str = "") -> Path:
    path = apps / f"{app_id}.toml"
    path.write_text(f'id = "{app_id}"\n{body}', encoding="utf-8")
    return path


def _touch_later(path: Path) -> None:
    """Move the mtime forward, so the test does not depend on the file system's clock
    granularity (two writes within one tick would look unchanged)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_diff_names_what_was_added_changed_and_removed(tmp_path: Path) -> None:
    _write(tmp_path, "a")
    _write(tmp_path, "b")
    before = load_manifests(tmp_path)
    (tmp_path / "a.toml").unlink()
    _write(tmp_path, "b", '[permissions]\npublish = ["x.>"]\n')
    _write(tmp_path, "c")
    changes = diff_manifests(before, load_manifests(tmp_path))
    assert [m.app_id for m in changes.added] == ["c"]
    assert [m.app_id for m in changes.changed] == ["b"]
    assert changes.removed == ("a",)
    assert not diff_manifests(before, before)


def test_watch_rereads_only_after_a_change(tmp_path: Path) -> None:
    _write(tmp_path, "a")
    watch = ManifestWatch(tmp_path)
    known = load_manifests(tmp_path)
    assert not watch.poll(known)
    path = _write(tmp_path, "late")
    _touch_later(tmp_path)
    changes = watch.poll(known)
    assert [m.app_id for m in changes.added] == ["late"]
    known = load_manifests(tmp_path)
    assert not watch.poll(known)
    path.write_text('id = "late"\ncommand = ["true"]\n', encoding="utf-8")
    _touch_later(path)  # an edit in place changes the file's mtime, not the directory's
    assert [m.app_id for m in watch.poll(known).changed] == ["late"]


def test_an_invalid_directory_keeps_what_was_known(tmp_path: Path) -> None:
    _write(tmp_path, "a")
    watch = ManifestWatch(tmp_path)
    known = load_manifests(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text('id = "b', encoding="utf-8")
    _touch_later(tmp_path)
    assert not watch.poll(known)  # reported in the log, nothing removed
    broken.unlink()
    _touch_later(tmp_path)
    assert not watch.poll(known)
