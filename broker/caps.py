"""Per-app caps: how much of the broker one app may take, so it cannot starve or evict another.

`Caps` is the `[limits]` section of the platform config (broker.config): a default for
every per-app cap, and two platform-wide bounds. An app's manifest may change a per-app
cap for that app under its own `[limits]` (broker.manifests.Limits); `Caps.for_app`
merges the two. Platform identities (`$...`) are the platform's own services: they get
`UNCAPPED` (the platform-wide bounds still hold for them).

    [limits]                       # per app, unless said otherwise
    sessions = 64                  # sessions the broker keeps for the app (attached or in grace)
    durable_subscriptions = 1000   # durable subscriptions over all its sessions
    pending_requests = 10000       # its requests waiting for a reply
    pub_bytes = 8388608            # bytes of one PUB (every frame; 8 MiB)
    held_messages = 10000          # its messages held while the broker recovers ...
    held_bytes = 16777216          # ... and their bytes (16 MiB)
    dlq_entries = 2500             # its dead letters kept: beyond, its own oldest go ...
    dlq_bytes = 16777216           # ... or beyond these bytes (16 MiB)
    pub_bytes_max = 16777216       # platform: the broker stops reading one message here
    hold_max_bytes = 268435456     # platform: bytes of all held messages (256 MiB)

Each overflow is an ERROR with its own code (broker.errors, 410-417) and a `Denied`
event with action "limit" and the cap's name as target.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Final

_MIB: Final = 2**20


@dataclass(frozen=True, slots=True)
class Caps:
    """The per-app caps and the platform bounds (meaning: the module docstring)."""

    sessions: int = 64
    durable_subscriptions: int = 1_000
    pending_requests: int = 10_000
    pub_bytes: int = 8 * _MIB
    held_messages: int = 10_000
    held_bytes: int = 16 * _MIB
    dlq_entries: int = 2_500
    dlq_bytes: int = 16 * _MIB
    pub_bytes_max: int = 16 * _MIB
    hold_max_bytes: int = 256 * _MIB

    def for_app(self, overrides: Any) -> Caps:
        """These caps with the ones `overrides` (a manifest's Limits) sets; None: no
        overrides. `pub_bytes` never exceeds `pub_bytes_max` (the broker reads no more)."""
        if overrides is None:
            return self
        changed = {
            name: value
            for name in APP_CAPS
            if (value := getattr(overrides, name, None)) is not None
        }
        if not changed:
            return self
        caps = dataclasses.replace(self, **changed)
        if caps.pub_bytes > caps.pub_bytes_max:
            caps = dataclasses.replace(caps, pub_bytes=caps.pub_bytes_max)
        return caps


APP_CAPS: Final = (
    "sessions",
    "durable_subscriptions",
    "pending_requests",
    "pub_bytes",
    "held_messages",
    "held_bytes",
    "dlq_entries",
    "dlq_bytes",
)
"""The caps a manifest's `[limits]` may set for its app."""
CAP_FIELDS: Final = (*APP_CAPS, "pub_bytes_max", "hold_max_bytes")
"""Every key of the platform config's `[limits]`."""

UNCAPPED: Final = Caps(**dict.fromkeys(APP_CAPS, sys.maxsize))
"""The caps of platform identities: none of their own (the platform bounds still apply)."""
