"""App permissions by id, read from the manifests directory: no sockets, no process.

The broker (authorising every request) and the persistence service (authorising every
query) both ask "what may this app read?"; this is the one answer, beside the manifests
it reads, so a service needs only floor 2 for it and never the broker's server code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from broker.logs import event
from broker.manifests import Limits, Manifest, ManifestError, Permissions, load_manifests

log = logging.getLogger("plexus.manifests")

RESCAN_INTERVAL_NS: Final = 1_000_000_000
"""A miss re-reads an unchanged directory at most this often."""


class ManifestCatalog:
    """App permissions by id, re-reading the apps dir when an unknown app appears.

    A miss re-reads the directory when it changed (its mtime) or a second has passed, so
    a manifest added for an external app is seen at once, and unknown ids cannot make
    the reader re-read the directory more than once a second otherwise. An invalid
    directory keeps the manifests read last (and logs `manifests-invalid`).
    """

    def __init__(self, apps_dir: Path | None, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._apps_dir = apps_dir
        self._clock = clock
        self._manifests: dict[str, Manifest] = {}
        self._last_scan = -RESCAN_INTERVAL_NS
        self._scanned_stamp = 0
        self.rescan()

    def _dir_stamp(self) -> int:
        try:
            return self._apps_dir.stat().st_mtime_ns if self._apps_dir else 0
        except OSError:
            return 0

    def rescan(self) -> None:
        self._last_scan = self._clock()
        self._scanned_stamp = self._dir_stamp()
        if self._apps_dir is None:
            return
        try:
            self._manifests = load_manifests(self._apps_dir)
        except ManifestError as exc:
            event(log, "manifests-invalid", logging.ERROR, error=str(exc))

    def manifest(self, app_id: str) -> Manifest | None:
        """The app's manifest; None when no manifest names it."""
        manifest = self._manifests.get(app_id)
        if manifest is None and (
            self._dir_stamp() != self._scanned_stamp
            or self._clock() - self._last_scan >= RESCAN_INTERVAL_NS
        ):
            self.rescan()
            manifest = self._manifests.get(app_id)
        return manifest

    def permissions(self, app_id: str) -> Permissions | None:
        """The app's permissions; None when no manifest names it."""
        manifest = self.manifest(app_id)
        return manifest.permissions if manifest else None

    def limits(self, app_id: str) -> Limits | None:
        """The app's `[limits]` (its caps over the platform's defaults: broker.caps)."""
        manifest = self.manifest(app_id)
        return manifest.limits if manifest else None
