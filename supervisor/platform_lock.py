"""One platform per home: an exclusive lock on `HOME/run/platform.lock` for its whole run.

The state file says a platform runs only once it has started; two `plexus run` on one
home started together would both pass that check, and the second would bind the bus,
events and store paths over the first's (libzmq lets a second bind take an ipc path).
The kernel's lock has no such window and goes with the process, however it ends.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the state-file check alone (docs/security.md)
    fcntl = None  # type: ignore[assignment]


class PlatformLocked(Exception):
    """Another platform holds the lock of this home."""


class PlatformLock:
    """Held from `acquire` until `release` (or the process's end)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> PlatformLock:
        if fcntl is None:
            return cls(None)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PlatformLocked(str(path)) from None
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
