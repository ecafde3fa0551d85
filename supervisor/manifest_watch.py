"""Notice manifests added, changed or removed while the platform runs.

The supervisor polls this once a second: a manifest dropped into the apps directory shows
up in `plexus apps list` at once (and can be started), without a restart. Only a change
of the directory or of a manifest file's mtime re-reads it; an invalid directory keeps the
manifests read last and is reported once per change, never taking the supervisor down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from broker.logs import event
from broker.manifests import Manifest, ManifestError, load_manifests

log = logging.getLogger("plexus.supervisor")

Stamp = tuple[int, tuple[tuple[str, int], ...]]


@dataclass(frozen=True, slots=True)
class ManifestChanges:
    """What a re-read found, against the manifests the supervisor knew."""

    added: tuple[Manifest, ...] = ()
    changed: tuple[Manifest, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff_manifests(known: dict[str, Manifest], found: dict[str, Manifest]) -> ManifestChanges:
    """Pure: the manifests `found` on disk against the ones `known` (by app id)."""
    return ManifestChanges(
        added=tuple(m for app_id, m in sorted(found.items()) if app_id not in known),
        changed=tuple(
            m for app_id, m in sorted(found.items()) if app_id in known and known[app_id] != m
        ),
        removed=tuple(sorted(app_id for app_id in known if app_id not in found)),
    )


class ManifestWatch:
    """Re-reads the apps directory when it (or a manifest in it) changed since last time."""

    def __init__(self, apps_dir: Path) -> None:
        self.apps_dir = apps_dir
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> Stamp | None:
        try:
            directory = self.apps_dir.stat().st_mtime_ns
            files = tuple(
                sorted((p.name, p.stat().st_mtime_ns) for p in self.apps_dir.glob("*.toml"))
            )
        except OSError:
            return None
        return directory, files

    def poll(self, known: dict[str, Manifest]) -> ManifestChanges:
        """The changes since the last poll; nothing when the directory is unchanged or invalid."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return ManifestChanges()
        self._stamp = stamp
        try:
            found = load_manifests(self.apps_dir)
        except ManifestError as exc:
            event(log, "manifests-invalid", logging.ERROR, error=str(exc), kept=len(known))
            return ManifestChanges()
        return diff_manifests(known, found)
