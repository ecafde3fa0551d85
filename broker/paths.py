"""Where one platform keeps its state: the home dir, its runtime dir and the bus endpoint.

The one place for file names that several processes share (the store's layout, the run
dir's sockets), so no service imports another's module to find a file.

Everything of one platform lives under its home (`--home`, else `$PLEXUS_HOME`, else the
per-user data dir), so two homes never meet. Sockets live in `HOME/run` (mode 0700); when
that path is too long for an ipc socket name (Linux allows 107 bytes), a short private
directory under the temp dir stands in, named after a hash of the home.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

_IPC_PATH_LIMIT = 100

STATE_FILE = "state.mdb"
"""The durable-state LMDB environment under `store_dir` (persistence.state)."""
SEGMENTS_DIR = "segments"
"""The message segments under `store_dir` (persistence.segments)."""


def default_home() -> Path:
    """`$PLEXUS_HOME`, else `$XDG_DATA_HOME/plexus`, else `~/.local/share/plexus`."""
    env = os.environ.get("PLEXUS_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "plexus"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; choose another --home")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


@dataclass(frozen=True, slots=True)
class PlatformPaths:
    """The files and endpoints of the platform rooted at `home`."""

    home: Path

    @classmethod
    def resolve(cls, home: str | Path | None) -> PlatformPaths:
        return cls(Path(home).expanduser().resolve() if home else default_home().resolve())

    @property
    def run_dir(self) -> Path:
        preferred = self.home / "run"
        if len(str(preferred / "events")) <= _IPC_PATH_LIMIT:
            return preferred
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"plexus-{os.getuid()}-{digest}"

    @property
    def state_file(self) -> Path:
        """Written by the running supervisor: pid, endpoint, apps dir (see `write_state`)."""
        return self.run_dir / "platform.json"

    @property
    def log_dir(self) -> Path:
        """Each supervised app's stdout and stderr, `APP.log` and its rotated files (0700)."""
        return self.home / "logs"

    def app_log(self, app_id: str) -> Path:
        """The current log file of app `app_id` (supervisor.log_files has the format)."""
        return self.log_dir / f"{app_id}.log"

    @property
    def store_dir(self) -> Path:
        """LMDB segments and the durable-state environment."""
        return self.home / "store"

    @property
    def segments_dir(self) -> Path:
        return self.store_dir / SEGMENTS_DIR

    @property
    def state_path(self) -> Path:
        return self.store_dir / STATE_FILE

    @property
    def keys_dir(self) -> Path:
        """The key ring that encrypts sensitive payloads at rest (0700)."""
        return self.home / "keys"

    def _ipc(self, name: str) -> str:
        if zmq.has("ipc"):
            return f"ipc://{self.run_dir / name}"
        return "tcp://127.0.0.1:*"

    def events_endpoint(self) -> str:
        """The broker's PUB socket of its event stream."""
        return self._ipc("events")

    def store_endpoint(self) -> str:
        """The persistence service's query socket (history, replay)."""
        return self._ipc("store")

    def bus_endpoint(self) -> str:
        """ipc socket in the run dir; tcp loopback where ipc does not exist (Windows)."""
        if zmq.has("ipc"):
            return f"ipc://{self.run_dir / 'bus'}"
        return "tcp://127.0.0.1:*"

    def prepare(self) -> None:
        """Create home, run dir and log dir with private modes."""
        _private_dir(self.home)
        _private_dir(self.run_dir)
        _private_dir(self.log_dir)

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
