"""The platform config: one frozen dataclass, one set of defaults, one schema.

`plexus run --config FILE` reads TOML into `PlatformConfig` (`supervisor.config`); the
supervisor hands the result to the broker and the persistence service as one msgpack
document on an inherited pipe (`PLEXUS_CONFIG_FD`), and each child derives its own
settings from it. Nothing else carries a setting, so the three processes cannot disagree.
It sits on the broker's floor because both the broker and the services read it.

    [broker]
    heartbeat_ms = 2000        # how often clients and broker prove they are alive
    peer_timeout_ms = 10000    # silence after which a session ends
    recovery_timeout_s = 10.0  # longest wait for the persistence service at broker start
    event_batch_ms = 2.0       # longest wait of an event nobody's confirm waits for
    transport = "ipc"          # "tcp": CurveZMQ on loopback ports (always where no ipc)
    [platform]
    persistence = true         # false: no message data is written to disk
    stop_grace_s = 5.0         # SIGTERM -> SIGKILL delay when stopping an app
    restart_backoff_s = 0.5    # first restart delay, doubled per restart ...
    restart_backoff_cap_s = 30.0   # ... up to this
    restart_budget = 5         # restarts within restart_window_s, then FATAL
    restart_window_s = 60.0
    settle_s = 1.0             # alive this long: an app counts as running
    cpu_window_s = 5.0         # over its CPU limit this long: an app is killed
    log_max_mb = 10            # an app's HOME/logs/APP.log rotates at this size ...
    log_files = 5              # ... and this many files are kept, the current one included
    [delivery]                 # broker.delivery.DeliveryConfig
    [limits]                   # broker.caps.Caps: per app (a manifest's [limits] changes its own)
    sessions = 64              # sessions kept for one app (attached or in their grace period)
    durable_subscriptions = 1000   # durable subscriptions of one app, over all its sessions
    pending_requests = 10000   # requests of one app waiting for a reply
    pub_bytes = 8388608        # bytes of one PUB of the app (8 MiB)
    held_messages = 10000      # messages of one app held while the broker recovers ...
    held_bytes = 16777216      # ... and their bytes (16 MiB)
    dlq_entries = 2500         # dead letters kept for one app: beyond, its own oldest go ...
    dlq_bytes = 16777216       # ... or beyond these bytes (16 MiB)
    pub_bytes_max = 16777216   # platform: the broker stops reading one message here (16 MiB)
    hold_max_bytes = 268435456 # platform: bytes of all held messages (256 MiB)
    [persistence]
    max_age_s = 2592000        # retention: 30 days
    max_size_mb = 0            # retention: store size budget (0 = none); cleanup from 90%
    segment_max_mb = 256       # roll to a new LMDB segment at this size ...
    segment_period_s = 3600    # ... or this age
    sensitive_topics = []      # patterns whose payloads are stored encrypted (AES-256-GCM)
    [security]
    external_ttl_s = 28800     # a credential from `plexus env` expires after this (8 hours)

The document is the same sections as a msgpack map, plus `"version": 1`; it must
name every key, so a child never fills a gap with a default of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker import protocol as P
from broker.caps import Caps
from broker.delivery import DeliveryConfig
from broker.errors import WireError
from broker.topics import pattern_tokens
from security.handoff import HandoffError, read_fd_variable

CONFIG_FD_VARIABLE = "PLEXUS_CONFIG_FD"
"""Names the inherited descriptor holding the config document of a platform service."""
DOCUMENT_VERSION = 1


class ConfigError(Exception):
    """The config cannot be used; the message names the source, key and fix."""


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    """Settings of one platform run (sections and meaning: the module docstring)."""

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
    log_max_mb: int = 10
    log_files: int = 5
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: Caps = field(default_factory=Caps)
    max_age_s: float = 30 * 86_400.0
    max_size_mb: int = 0
    segment_max_mb: int = 256
    segment_period_s: float = 3600.0
    sensitive_topics: tuple[str, ...] = ()
    recovery_timeout_s: float = 10.0
    event_batch_ms: float = 2.0
    external_ttl_s: float = 8 * 3600.0
    transport: str = "ipc"

    def to_tables(self) -> dict[str, dict[str, Any]]:
        """The config as its sections (the shape of the TOML file and of the document)."""
        tables: dict[str, dict[str, Any]] = {}
        for section, keys in SCHEMA.items():
            owner: Any = {"delivery": self.delivery, "limits": self.limits}.get(section, self)
            tables[section] = {key: getattr(owner, key) for key in keys}
        tables["persistence"]["sensitive_topics"] = list(self.sensitive_topics)
        return tables

    def to_document(self) -> bytes:
        """The msgpack document a platform service reads from `PLEXUS_CONFIG_FD`."""
        data: bytes = msgpack.packb({"version": DOCUMENT_VERSION, **self.to_tables()})
        return data

    @classmethod
    def from_document(cls, data: bytes, source: str = "config document") -> PlatformConfig:
        """The config `to_document` wrote; ConfigError saying what is wrong with anything else."""
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ConfigError(f"{source}: not a msgpack document ({exc})") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: must be a map of sections, not {type(doc).__name__}")
        version = doc.pop("version", None)
        if version != DOCUMENT_VERSION:
            raise ConfigError(
                f"{source}: version {version!r}, this build reads {DOCUMENT_VERSION}; "
                "run the supervisor and the services of one installation"
            )
        return from_tables(doc, source, complete=True)


_Rule = tuple[type, tuple[float, float] | None]

SCHEMA: dict[str, dict[str, _Rule]] = {
    "broker": {
        "heartbeat_ms": (int, (50, 600_000)),
        "peer_timeout_ms": (int, (100, 3_600_000)),
        "recovery_timeout_s": (float, (0.1, 3600.0)),
        "event_batch_ms": (float, (0.1, 1000.0)),
        "transport": (str, None),
    },
    "platform": {
        "persistence": (bool, None),
        "stop_grace_s": (float, (0.1, 600.0)),
        "restart_backoff_s": (float, (0.01, 600.0)),
        "restart_backoff_cap_s": (float, (0.01, 3600.0)),
        "restart_budget": (int, (0, 1000)),
        "restart_window_s": (float, (1.0, 86400.0)),
        "settle_s": (float, (0.0, 600.0)),
        "cpu_window_s": (float, (0.5, 3600.0)),
        "log_max_mb": (int, (1, 1 << 20)),
        "log_files": (int, (1, 100)),
    },
    "persistence": {
        "max_age_s": (float, (1.0, 10 * 365 * 86_400.0)),
        "max_size_mb": (int, (0, 2**30)),
        "segment_max_mb": (int, (1, 1 << 20)),
        "segment_period_s": (float, (0.1, 365 * 86_400.0)),
        "sensitive_topics": (tuple, None),
    },
    "security": {
        "external_ttl_s": (float, (1.0, 366 * 86_400.0)),
    },
    "delivery": {
        "grace_ms": (int, (0, 7 * 86_400_000)),
        "retries": (int, (0, 100)),
        "backoff_base_ms": (int, (1, 3_600_000)),
        "backoff_cap_ms": (int, (1, 86_400_000)),
        "ack_timeout_ms": (int, (10, 86_400_000)),
        "window": (int, (1, 100_000)),
        "queue_max": (int, (1, 10_000_000)),
        "queue_max_bytes": (int, (1024, 2**40)),
        "credit": (int, (0, 1_000_000)),
        "flow_high": (int, (1, 10_000_000)),
        "flow_low": (int, (0, 10_000_000)),
    },
    "limits": {
        "sessions": (int, (1, 1_000_000)),
        "durable_subscriptions": (int, (0, 10_000_000)),
        "pending_requests": (int, (1, 10_000_000)),
        "pub_bytes": (int, (P.MAX_FRAME_BYTES, 2**40)),
        "held_messages": (int, (1, 10_000_000)),
        "held_bytes": (int, (P.MAX_FRAME_BYTES, 2**40)),
        "dlq_entries": (int, (1, 10_000_000)),
        "dlq_bytes": (int, (P.MAX_FRAME_BYTES, 2**40)),
        "pub_bytes_max": (int, (P.MAX_FRAME_BYTES, 2**40)),
        "hold_max_bytes": (int, (P.MAX_FRAME_BYTES, 2**40)),
    },
}
"""Every key of every section: (type, inclusive bounds or None)."""

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {("broker", "transport"): ("ipc", "tcp")}
"""The allowed values of each string key."""


def _number(value: Any) -> float:
    """`value`, known to be an int or a float, as a number mypy can compare."""
    return float(value)


def _checked(source: str, section: str, key: str, raw: Any) -> Any:
    """The value of one config key, or ConfigError naming it and the fix."""
    schema = SCHEMA[section]
    if key not in schema:
        raise ConfigError(f"{source}: unknown key {section}.{key}; use {sorted(schema)}")
    kind, bounds = schema[key]
    if kind is tuple:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{source}: {section}.{key} must be a list of strings")
        for pattern in raw:
            try:
                pattern_tokens(pattern)
            except WireError as exc:
                raise ConfigError(f"{source}: {section}.{key}: {exc.detail}") from None
        return tuple(raw)
    value: Any = float(raw) if kind is float and type(raw) is int else raw
    if type(value) is not kind:
        raise ConfigError(f"{source}: {section}.{key} must be {kind.__name__}")
    choices = CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: {section}.{key} must be one of {', '.join(choices)}")
    if bounds is not None and not bounds[0] <= _number(value) <= bounds[1]:
        raise ConfigError(f"{source}: {section}.{key} must be in {bounds}")
    return value


def from_tables(tables: Mapping[str, Any], source: str, complete: bool = False) -> PlatformConfig:
    """A checked config from its sections; `complete`: every key must be given."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    for section, table in tables.items():
        if section not in SCHEMA or not isinstance(table, dict):
            raise ConfigError(f"{source}: unknown section [{section}]; use {sorted(SCHEMA)}")
        for key, raw in table.items():
            values[section][key] = _checked(source, section, key, raw)
    if complete:
        missing = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if k not in values[s]]
        if missing:
            raise ConfigError(f"{source}: lacks {', '.join(missing)}; write it with to_document()")
    config = PlatformConfig(
        **values["broker"],
        **values["platform"],
        **values["persistence"],
        **values["security"],
        delivery=DeliveryConfig(**values["delivery"]),
        limits=Caps(**values["limits"]),
    )
    if config.limits.pub_bytes > config.limits.pub_bytes_max:
        raise ConfigError(f"{source}: limits.pub_bytes must not exceed limits.pub_bytes_max")
    if config.delivery.flow_low >= config.delivery.flow_high:
        raise ConfigError(f"{source}: delivery.flow_low must be below delivery.flow_high")
    if config.peer_timeout_ms <= config.heartbeat_ms:
        raise ConfigError(f"{source}: broker.peer_timeout_ms must exceed broker.heartbeat_ms")
    return config


def config_from_environment(environ: Mapping[str, str] | None = None) -> PlatformConfig:
    """The config the supervisor handed over on `PLEXUS_CONFIG_FD`; the defaults without it."""
    try:
        data = read_fd_variable(CONFIG_FD_VARIABLE, environ)
    except HandoffError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return PlatformConfig()
    return PlatformConfig.from_document(data, f"config document on {CONFIG_FD_VARIABLE}")
