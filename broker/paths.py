"""Where one platform keeps its state: the home dir, its runtime dir and the bus endpoint.

The one place for file names that several processes share (the store's layout, the run
dir's sockets), so no service imports another's module to find a file.

Everything of one platform lives under its home (`--home`, else `$PLEXUS_HOME`, else the
per-user data dir), so two homes never meet. Sockets live in `HOME/run` (mode 0700); when
that path is too long for an ipc socket name (Linux allows 107 bytes), a short private
directory under the temp dir stands in, named after the user id and a hash of the home.

The temp dir is shared by every user, so anyone can create that name first: the stand-in
is used only when it is a real directory (never a symbolic link, checked with lstat, not
followed) that this user owns with mode 0700, in a temp dir others cannot rename entries
of (sticky or private). It is made with mkdir 0700 and checked again after, whoever made
it; anything else is refused with `UnsafeDirectory`, naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class UnsafeDirectory(PermissionError):
    """A directory of the platform that another user owns or could have made or changed."""


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to another user; choose another --home")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
    return path


def _shared_dir_problem(path: Path, create: bool) -> str | None:
    """Why `path`, a directory in a temp dir every user may write, is not one only this
    user can have made (None: it is, or it is absent and `create` is False). With
    `create`, make it (mkdir 0700, never through a symbolic link) and check it after."""
    try:
        parent = os.stat(path.parent)
    except FileNotFoundError:
        if not create:
            return None
        raise
    if parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        return f"its parent {path.parent} lets every user rename what is in it (no sticky bit)"
    if create:
        with contextlib.suppress(FileExistsError):  # then judged below, whoever made it
            os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "it vanished as it was made" if create else None
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.getuid():
        return f"it belongs to user id {info.st_uid}, not to you (user id {os.getuid()})"
    if mode & 0o077:
        return f"its mode is {mode:o}, not 700: other users may have changed what is in it"
    return None


def _refuse(path: Path, problem: str) -> UnsafeDirectory:
    return UnsafeDirectory(
        f"{path}: the platform's short runtime dir cannot be used: {problem}. Fix: remove it "
        f"if nothing of yours runs from it (rm -r {path}), or use a --home with a shorter "
        "path (its run dir is then HOME/run)"
    )


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
    def run_dir_is_shared(self) -> bool:
        """Whether the run dir is the stand-in under the temp dir every user may write."""
        return self.run_dir != self.home / "run"

    def check_run_dir(self) -> None:
        """UnsafeDirectory when the run dir is a stand-in under the temp dir that this user
        cannot be sure to have made (see the module's docstring); an absent one is fine."""
        if self.run_dir_is_shared:
            problem = _shared_dir_problem(self.run_dir, create=False)
            if problem is not None:
                raise _refuse(self.run_dir, problem)

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
        return f"ipc://{self.run_dir / name}"

    def events_endpoint(self) -> str:
        """The broker's PUB socket of its event stream, on ipc (broker.endpoints has TCP)."""
        return self._ipc("events")

    def store_endpoint(self) -> str:
        """The persistence service's query socket (history, replay), on ipc."""
        return self._ipc("store")

    def bus_endpoint(self) -> str:
        """The broker's ROUTER, an ipc socket in the run dir (broker.endpoints has TCP)."""
        return self._ipc("bus")

    def prepare(self) -> None:
        """Create home, run dir and log dir with private modes; UnsafeDirectory when one is
        another user's, or the run dir's stand-in in the temp dir is not surely ours."""
        _private_dir(self.home)
        if self.run_dir_is_shared:
            problem = _shared_dir_problem(self.run_dir, create=True)
            if problem is not None:
                raise _refuse(self.run_dir, problem)
        else:
            _private_dir(self.run_dir)
        _private_dir(self.log_dir)

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.state_file)

    def read_state(self) -> dict[str, Any] | None:
        """The running platform's state file (None: none, or unreadable); UnsafeDirectory
        when it lies in a stand-in run dir another user may have made."""
        self.check_run_dir()
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
