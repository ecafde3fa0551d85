"""`plexus run --config FILE`: the platform config read from TOML.

The dataclass, its defaults and the checks of every key live in `broker.config`, beside
the document the supervisor hands to the broker and the persistence service; this module
only reads the file and applies the command line's override.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from broker.config import ConfigError, PlatformConfig, from_tables

__all__ = ["ConfigError", "PlatformConfig", "load_config"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from None


def load_config(path: Path | None, persistence: bool | None = None) -> PlatformConfig:
    """Read `path` (None: defaults); `persistence=False` from the CLI overrides the file."""
    config = from_tables(_read(path), str(path)) if path is not None else PlatformConfig()
    if persistence is False:
        config = dataclasses.replace(config, persistence=False)
    return config
