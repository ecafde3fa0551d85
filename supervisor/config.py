"""`plexus run --config FILE`: platform settings from TOML, validated, with documented defaults.

[broker]
heartbeat_ms = 2000        # how often clients and broker prove they are alive
peer_timeout_ms = 10000    # silence after which a session ends
[platform]
persistence = true         # false: no message data is written to disk
stop_grace_s = 5.0         # SIGTERM -> SIGKILL delay when stopping an app
[persistence]
max_age_s = 2592000        # retention: 30 days
max_size_mb = 0            # retention: store size budget (0 = none); cleanup from 90%
segment_max_mb = 256       # roll to a new LMDB segment at this size ...
segment_period_s = 3600    # ... or this age
sensitive_topics = []      # patterns whose payloads are stored encrypted (AES-256-GCM)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import protocol as P
from broker.delivery import DELIVERY_FIELDS, DeliveryConfig
from broker.errors import WireError
from broker.topics import pattern_tokens


class ConfigError(Exception):
    """The config file cannot be used; the message names the file, key and fix."""


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    """Settings of one platform run."""

    heartbeat_ms: int = P.DEFAULT_HEARTBEAT_MS
    peer_timeout_ms: int = P.DEFAULT_PEER_TIMEOUT_MS
    persistence: bool = True
    stop_grace_s: float = 5.0
    restart_backoff_s: float = 0.5
    restart_backoff_cap_s: float = 30.0
    restart_budget: int = 5
    restart_window_s: float = 60.0
    settle_s: float = 1.0
    cpu_window_s: float = 5.0
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    max_age_s: float = 30 * 86_400.0
    max_size_mb: int = 0
    segment_max_mb: int = 256
    segment_period_s: float = 3600.0
    sensitive_topics: tuple[str, ...] = ()


_SCHEMA: dict[str, dict[str, tuple[str, type, Any]]] = {
    "broker": {
        "heartbeat_ms": ("heartbeat_ms", int, (50, 600_000)),
        "peer_timeout_ms": ("peer_timeout_ms", int, (100, 3_600_000)),
    },
    "platform": {
        "persistence": ("persistence", bool, None),
        "stop_grace_s": ("stop_grace_s", float, (0.1, 600.0)),
        "restart_backoff_s": ("restart_backoff_s", float, (0.01, 600.0)),
        "restart_backoff_cap_s": ("restart_backoff_cap_s", float, (0.01, 3600.0)),
        "restart_budget": ("restart_budget", int, (0, 1000)),
        "restart_window_s": ("restart_window_s", float, (1.0, 86400.0)),
        "settle_s": ("settle_s", float, (0.0, 600.0)),
        "cpu_window_s": ("cpu_window_s", float, (0.5, 3600.0)),
    },
    "persistence": {
        "max_age_s": ("max_age_s", float, (1.0, 10 * 365 * 86_400.0)),
        "max_size_mb": ("max_size_mb", int, (0, 2**30)),
        "segment_max_mb": ("segment_max_mb", int, (1, 1 << 20)),
        "segment_period_s": ("segment_period_s", float, (0.1, 365 * 86_400.0)),
        "sensitive_topics": ("sensitive_topics", tuple, None),
    },
    "delivery": {
        "grace_ms": ("grace_ms", int, (0, 7 * 86_400_000)),
        "retries": ("retries", int, (0, 100)),
        "backoff_base_ms": ("backoff_base_ms", int, (1, 3_600_000)),
        "backoff_cap_ms": ("backoff_cap_ms", int, (1, 86_400_000)),
        "ack_timeout_ms": ("ack_timeout_ms", int, (10, 86_400_000)),
        "window": ("window", int, (1, 100_000)),
        "queue_max": ("queue_max", int, (1, 10_000_000)),
        "queue_max_bytes": ("queue_max_bytes", int, (1024, 2**40)),
    },
}


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None


def _checked(path: Path, section: str, key: str, raw: Any) -> tuple[str, Any]:
    """(field name, value) of one config key, or ConfigError naming it and the fix."""
    schema = _SCHEMA[section]
    if key not in schema:
        raise ConfigError(f"{path}: unknown key {section}.{key}; use {sorted(schema)}")
    name, kind, bounds = schema[key]
    value = float(raw) if kind is float and type(raw) is int else raw
    if kind is tuple:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{path}: {section}.{key} must be a list of strings")
        for pattern in raw:
            try:
                pattern_tokens(pattern)
            except WireError as exc:
                raise ConfigError(f"{path}: {section}.{key}: {exc.detail}") from None
        return name, tuple(raw)
    if type(value) is not kind:
        raise ConfigError(f"{path}: {section}.{key} must be {kind.__name__}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{path}: {section}.{key} must be in {bounds}")
    return name, value


def load_config(path: Path | None, persistence: bool | None = None) -> PlatformConfig:
    """Read `path` (None: defaults); `persistence=False` from the CLI overrides the file."""
    values: dict[str, dict[str, Any]] = {section: {} for section in _SCHEMA}
    for section, table in (_read(path) if path is not None else {}).items():
        if section not in _SCHEMA or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]; use {sorted(_SCHEMA)}")
        for key, raw in table.items():
            name, value = _checked(path, section, key, raw)  # type: ignore[arg-type]
            values[section][name] = value
    if persistence is False:
        values["platform"]["persistence"] = False
    config = PlatformConfig(
        **values["broker"],
        **values["platform"],
        **values["persistence"],
        delivery=DeliveryConfig(**values["delivery"]),
    )
    if config.peer_timeout_ms <= config.heartbeat_ms:
        raise ConfigError("broker.peer_timeout_ms must exceed broker.heartbeat_ms")
    return config


def broker_arguments(config: PlatformConfig) -> list[str]:
    """The `python -m broker` flags carrying `config`."""
    args = [
        "--heartbeat-ms",
        str(config.heartbeat_ms),
        "--peer-timeout-ms",
        str(config.peer_timeout_ms),
    ]
    for name in DELIVERY_FIELDS:
        args += ["--" + name.replace("_", "-"), str(getattr(config.delivery, name))]
    args += ["--persistence", "on" if config.persistence else "off"]
    return args


def persistence_arguments(config: PlatformConfig) -> list[str]:
    """The `python -m persistence` flags carrying `config`."""
    args = [
        "--max-age-s",
        str(config.max_age_s),
        "--max-size-mb",
        str(config.max_size_mb),
        "--segment-max-mb",
        str(config.segment_max_mb),
        "--segment-period-s",
        str(config.segment_period_s),
    ]
    for pattern in config.sensitive_topics:
        args += ["--sensitive-topic", pattern]
    return args
