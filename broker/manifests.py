"""App manifests (`DIR/NAME.toml`): parsed and validated with errors naming file, field and fix.

The manifest is the contract between an app and the platform: how to launch it (for the
supervisor) and what it may do on the bus (for the broker). It lives on the broker's floor
because the broker enforces its permissions; the supervisor, a floor above, reads it too.

Everything that reaches the OS is checked here, so a manifest fails at load, never at
launch: `command` argv and `[env]` names and values the OS can take (no NUL; no '=' in a
name), limits in range, and the apps directory and its manifests writable by their owner
only, who is the platform's user or root.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import protocol as P
from broker.caps import APP_CAPS
from broker.errors import WireError
from broker.topics import pattern_tokens

APP_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
RESTART_POLICIES = ("always", "on-failure", "never")
_KNOWN_KEYS = {"id", "command", "restart", "limits", "permissions", "after", "env", "description"}
_LIMIT_KEYS = {"memory_mb", "cpu_percent", *APP_CAPS}
_MAY_BE_ZERO = {"durable_subscriptions"}
_BYTE_CAPS = {"pub_bytes", "held_bytes", "dlq_bytes"}
"""At least one frame (P.MAX_FRAME_BYTES): a client's largest packed PUB must fit."""
_PERMISSION_KEYS = {"publish", "subscribe", "request", "ask"}


class ManifestError(Exception):
    """A manifest that cannot be used; the message names the file, the field and the fix."""

    def __init__(self, path: Path | str, field_name: str | None, problem: str, fix: str) -> None:
        where = f"{path}: field '{field_name}'" if field_name is not None else str(path)
        super().__init__(f"{where}: {problem}. Fix: {fix}")
        self.path = str(path)
        self.field = field_name
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True, slots=True)
class Permissions:
    """Patterns an app may publish to, subscribe to and send requests to; `ask` needs consent."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    request: tuple[str, ...] = ()
    ask: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits: the supervisor enforces memory and CPU (None: unlimited); the
    broker the per-app caps (broker.caps; None: the platform's `[limits]` default)."""

    memory_mb: int | None = None
    cpu_percent: int | None = None
    sessions: int | None = None
    durable_subscriptions: int | None = None
    pending_requests: int | None = None
    pub_bytes: int | None = None
    held_messages: int | None = None
    held_bytes: int | None = None
    dlq_entries: int | None = None
    dlq_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """One validated app manifest."""

    app_id: str
    command: tuple[str, ...] | None
    restart: str = "on-failure"
    limits: Limits = field(default_factory=Limits)
    permissions: Permissions = field(default_factory=Permissions)
    after: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    path: str = ""

    @property
    def external(self) -> bool:
        """An app with no command connects on its own, with a credential from `plexus env`."""
        return self.command is None


def _string_list(path: Path, name: str, value: Any, *, patterns: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ManifestError(path, name, "must be a list of non-empty strings", f'{name} = ["..."]')
    if patterns:
        for pattern in value:
            try:
                pattern_tokens(pattern)
            except WireError as exc:
                raise ManifestError(
                    path,
                    name,
                    f"{pattern!r} is not a valid topic pattern ({exc.detail})",
                    "use dot-separated tokens, '*' for one token, a final '>' for the rest",
                ) from None
    return tuple(value)


_LIMIT_MAX = {"limits.memory_mb": 1_048_576, "limits.cpu_percent": 25_600}
"""The most a limit may say: beyond, it is a typo (1 TiB of memory, 256 cores at 100 %)."""


def _positive_int(path: Path, name: str, value: Any, *, least: int = 1) -> int | None:
    if value is None:
        return None
    high = _LIMIT_MAX.get(name)
    if type(value) is not int or value < least or (high is not None and value > high):
        if high is not None:
            kind = f"an integer from {least} to {high}"
        else:
            kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        fix = f"{name} = {max(least, 100)}"
        raise ManifestError(path, name, f"must be {kind}, got {value!r}", fix)
    return value


def _least(key: str) -> int:
    """The smallest value limit `key` may take in a manifest."""
    if key in _MAY_BE_ZERO:
        return 0
    return P.MAX_FRAME_BYTES if key in _BYTE_CAPS else 1


def _command(path: Path, value: Any) -> tuple[str, ...] | None:
    """The argv to launch: a non-empty list of non-empty strings without NUL (None: external)."""
    if value is None:
        return None
    command = _string_list(path, "command", value)
    if not command:
        raise ManifestError(path, "command", "is empty", 'command = ["python", "-m", "my.app"]')
    for index, arg in enumerate(command):
        if "\0" in arg:
            raise ManifestError(
                path,
                f"command[{index}]",
                f"{arg!r} contains a NUL character, which no argument can hold",
                "remove the \\u0000 escape from that argument",
            )
    return command


def _env(path: Path, raw: Any) -> tuple[tuple[str, str], ...]:
    """[env]: names without '=' or NUL (the OS refuses them), string values without NUL."""
    if not isinstance(raw, dict):
        raise ManifestError(path, "env", "must be a table of strings", '[env]\nNAME = "value"')
    for name, value in raw.items():
        field_name = f"env.{name}" if name.isprintable() else f"env.{name!r}"
        if not name or "=" in name or "\0" in name:
            raise ManifestError(
                path,
                field_name if name else "env",
                f"{name!r} is not an environment variable name (it is empty or holds '=' or NUL)",
                "use a name of letters, digits and '_', e.g. MY_SETTING",
            )
        if not isinstance(value, str):
            raise ManifestError(
                path,
                field_name,
                f"must be a string, got {type(value).__name__} {repr(value)[:60]}",
                'quote the value: NAME = "..."',
            )
        if "\0" in value:
            raise ManifestError(
                path,
                field_name,
                "contains a NUL character, which no environment value can hold",
                "remove the \\u0000 escape from the value",
            )
    return tuple(sorted(raw.items()))


def _permissions(path: Path, raw: Any) -> Permissions:
    if not isinstance(raw, dict):
        raise ManifestError(path, "permissions", "must be a table", "add a [permissions] table")
    unknown = set(raw) - _PERMISSION_KEYS
    if unknown:
        raise ManifestError(
            path,
            f"permissions.{sorted(unknown)[0]}",
            "unknown permission kind",
            f"use only {', '.join(sorted(_PERMISSION_KEYS))}",
        )
    return Permissions(
        publish=_string_list(path, "permissions.publish", raw.get("publish", []), patterns=True),
        subscribe=_string_list(
            path, "permissions.subscribe", raw.get("subscribe", []), patterns=True
        ),
        request=_string_list(path, "permissions.request", raw.get("request", []), patterns=True),
        ask=_string_list(path, "permissions.ask", raw.get("ask", [])),
    )


def parse_manifest(path: Path, data: dict[str, Any]) -> Manifest:
    """Validate the decoded TOML of one manifest."""
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        name = sorted(unknown)[0]
        raise ManifestError(
            path, name, "unknown field", f"remove it; known: {', '.join(sorted(_KNOWN_KEYS))}"
        )
    app_id = data.get("id")
    if not isinstance(app_id, str) or not APP_ID.fullmatch(app_id):
        raise ManifestError(
            path,
            "id",
            f"{app_id!r} is not a valid app id",
            "use 1-64 lowercase letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    command = _command(path, data.get("command"))
    restart = data.get("restart", "on-failure")
    if restart not in RESTART_POLICIES:
        raise ManifestError(
            path,
            "restart",
            f"{restart!r} is not a policy",
            f"use one of {', '.join(RESTART_POLICIES)}",
        )
    limits_raw = data.get("limits", {})
    if not isinstance(limits_raw, dict):
        raise ManifestError(path, "limits", "must be a table", "add a [limits] table")
    for key in limits_raw:
        if key not in _LIMIT_KEYS:
            raise ManifestError(
                path, f"limits.{key}", "unknown limit", f"use only {', '.join(sorted(_LIMIT_KEYS))}"
            )
    limits = Limits(
        **{
            key: _positive_int(path, f"limits.{key}", limits_raw.get(key), least=_least(key))
            for key in sorted(_LIMIT_KEYS)
        }
    )
    env = _env(path, data.get("env", {}))
    return Manifest(
        app_id=app_id,
        command=command,
        restart=restart,
        limits=limits,
        permissions=_permissions(path, data.get("permissions", {})),
        after=_string_list(path, "after", data.get("after", [])),
        env=env,
        path=str(path),
    )


def load_manifest(path: Path) -> Manifest:
    """Read and validate one manifest file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(
            path, None, f"cannot be read ({exc.strerror})", "check the path and its permissions"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(
            path, None, f"is not valid TOML ({exc})", "fix the TOML syntax at that line"
        ) from None
    return parse_manifest(path, data)


def _refuse_if_others_can_write(path: Path, what: str) -> None:
    """ManifestError when another user owns `path` (root may) or its group or everyone may
    write it: a manifest says what runs as you and what it may do on the bus, so only you
    may change it. POSIX only (Windows has no such mode bits)."""
    if not hasattr(os, "getuid"):
        return
    try:
        info = path.stat()
    except OSError:
        return  # reading it reports the problem
    uid = os.getuid()
    if info.st_uid not in (uid, 0):
        raise ManifestError(
            path,
            None,
            f"{what} belongs to user id {info.st_uid}, not to you (user id {uid}) or root",
            "keep the manifests in a directory of your own (chown it, or pass --apps DIR)",
        )
    loose = stat.S_IMODE(info.st_mode) & 0o022
    if loose:
        who = {0o020: "its group", 0o002: "every user", 0o022: "its group and every user"}
        raise ManifestError(
            path,
            None,
            f"{what} may be written by {who[loose]} (mode {stat.S_IMODE(info.st_mode):o})",
            f"chmod go-w {path}",
        )


def load_manifests(directory: Path) -> dict[str, Manifest]:
    """Every `*.toml` manifest in `directory`, by app id; duplicate ids are an error, and so
    is a directory or manifest that another user could have written."""
    if not directory.exists():
        raise ManifestError(
            directory,
            None,
            "the apps directory does not exist",
            "create it with one APP.toml manifest per app, or pass --apps DIR",
        )
    if not directory.is_dir():
        raise ManifestError(
            directory, None, "is a file, not a directory", "pass --apps DIR with the manifests"
        )
    _refuse_if_others_can_write(directory, "the apps directory")
    manifests: dict[str, Manifest] = {}
    for path in sorted(directory.glob("*.toml")):
        _refuse_if_others_can_write(path, "the manifest")
        manifest = load_manifest(path)
        if manifest.app_id in manifests:
            raise ManifestError(
                path,
                "id",
                f"{manifest.app_id!r} is already used by {manifests[manifest.app_id].path}",
                "give every app its own id",
            )
        manifests[manifest.app_id] = manifest
    for manifest in manifests.values():
        for dependency in manifest.after:
            if dependency not in manifests:
                raise ManifestError(
                    manifest.path,
                    "after",
                    f"names unknown app {dependency!r}",
                    "list only app ids of this directory",
                )
    return manifests
