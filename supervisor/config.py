"""`plexus run --config FILE`: platform settings from TOML, validated, with documented defaults.

[broker]
heartbeat_ms = 2000        # how often clients and broker prove they are alive
peer_timeout_ms = 10000    # silence after which a session ends
[platform]
persistence = true         # false: no message data is written to disk
stop_grace_s = 5.0         # SIGTERM -> SIGKILL delay when stopping an app
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import protocol as P


class ConfigError(Exception):
    """The config file cannot be used; the message names the file, key and fix."""


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    """Settings of one platform run."""

    heartbeat_ms: int = P.DEFAULT_HEARTBEAT_MS
    peer_timeout_ms: int = P.DEFAULT_PEER_TIMEOUT_MS
    persistence: bool = True
    stop_grace_s: float = 5.0


_SCHEMA: dict[str, dict[str, tuple[str, type, Any]]] = {
    "broker": {
        "heartbeat_ms": ("heartbeat_ms", int, (50, 600_000)),
        "peer_timeout_ms": ("peer_timeout_ms", int, (100, 3_600_000)),
    },
    "platform": {
        "persistence": ("persistence", bool, None),
        "stop_grace_s": ("stop_grace_s", float, (0.1, 600.0)),
    },
}


def load_config(path: Path | None, persistence: bool | None = None) -> PlatformConfig:
    """Read `path` (None: defaults); `persistence=False` from the CLI overrides the file."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
        for section, table in data.items():
            schema = _SCHEMA.get(section)
            if schema is None or not isinstance(table, dict):
                raise ConfigError(f"{path}: unknown section [{section}]; use {sorted(_SCHEMA)}")
            for key, raw in table.items():
                if key not in schema:
                    raise ConfigError(f"{path}: unknown key {section}.{key}; use {sorted(schema)}")
                field, kind, bounds = schema[key]
                value = float(raw) if kind is float and type(raw) is int else raw
                if type(value) is not kind:
                    raise ConfigError(f"{path}: {section}.{key} must be {kind.__name__}")
                if bounds is not None and not bounds[0] <= value <= bounds[1]:
                    raise ConfigError(f"{path}: {section}.{key} must be in {bounds}")
                values[field] = value
    if persistence is False:
        values["persistence"] = False
    config = PlatformConfig(**values)
    if config.peer_timeout_ms <= config.heartbeat_ms:
        raise ConfigError("broker.peer_timeout_ms must exceed broker.heartbeat_ms")
    return config
