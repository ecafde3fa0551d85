"""Per-launch app credentials: minted by the supervisor or `plexus env`, checked by the broker.

A credential is a random token bound to one app id. Only a hash of (app id, token) is kept,
as the name of a 0600 file in a 0700 directory under the platform's runtime dir, so any
process of the same user can mint (the supervisor, the CLI) and the broker can verify
without a shared in-memory table, and a stolen directory listing reveals no token.
Revoking is deleting the file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path


class CredentialError(Exception):
    """The credential store cannot be used (permissions too loose, unreadable)."""


def _digest(app_id: str, token: str) -> str:
    return hashlib.sha256(f"{app_id}\0{token}".encode()).hexdigest()


class CredentialStore:
    """Mint, verify and revoke app credentials kept as hashed files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def ensure(self) -> None:
        """Create the directory 0700; refuse one that others can read."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.directory.stat().st_mode)
        if mode & 0o077:
            raise CredentialError(
                f"{self.directory} has mode {mode:o}; run `chmod 700 {self.directory}`"
            )

    def mint(self, app_id: str) -> str:
        """A new token for `app_id`, valid until revoked."""
        self.ensure()
        token = secrets.token_urlsafe(32)
        path = self.directory / _digest(app_id, token)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(app_id)
        return token

    def verify(self, app_id: str, token: str) -> bool:
        """Whether `token` is a live credential of `app_id`."""
        if not app_id or not token or len(token) > 256 or len(app_id) > 256:
            return False
        try:
            stored = (self.directory / _digest(app_id, token)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(stored.encode(), app_id.encode())

    def revoke(self, app_id: str, token: str) -> None:
        """Invalidate one credential (no error if it is already gone)."""
        (self.directory / _digest(app_id, token)).unlink(missing_ok=True)

    def revoke_all(self) -> None:
        """Invalidate every credential (platform start and stop)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)
