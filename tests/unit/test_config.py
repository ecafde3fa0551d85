"""`plexus run --config FILE`: defaults, overrides and every kind of bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import ConfigError, PlatformConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plexus.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    assert load_config(None) == PlatformConfig()
    assert load_config(None, persistence=False).persistence is False


def test_values_from_the_file(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "[broker]\nheartbeat_ms = 500\npeer_timeout_ms = 3000\n"
            "[platform]\npersistence = false\nstop_grace_s = 2\n",
        )
    )
    assert config == PlatformConfig(500, 3000, False, 2.0)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[broker]\nheartbeat = 5\n", "unknown key broker.heartbeat"),
        ("[brokers]\nheartbeat_ms = 5\n", "unknown section [brokers]"),
        ('[broker]\nheartbeat_ms = "fast"\n', "broker.heartbeat_ms must be int"),
        ("[broker]\nheartbeat_ms = 1\n", "broker.heartbeat_ms must be in"),
        ("[broker]\nheartbeat_ms = 5000\npeer_timeout_ms = 4000\n", "must exceed"),
        ("[platform]\npersistence = 1\n", "platform.persistence must be bool"),
        ("[broker\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert needle in str(error.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "missing.toml")
