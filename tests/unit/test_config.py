"""The platform config: `plexus run --config FILE` (defaults, overrides, every kind of bad
value) and the one document the broker and the persistence service read it from."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path
from typing import Any

import msgpack
import pytest

import broker.config as broker_config_module
from broker import protocol as P
from broker.__main__ import broker_config
from broker.config import CONFIG_FD_VARIABLE, SCHEMA, config_from_environment, from_tables
from broker.delivery import DeliveryConfig
from broker.paths import PlatformPaths
from persistence.__main__ import persistence_config
from persistence.retention import RetentionPolicy
from persistence.store import SegmentPolicy
from security.credentials import ServerKeys
from security.handoff import handoff_pipe
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


# -- one config, handed to the broker and the persistence service ------------------------------


NON_DEFAULT = PlatformConfig(
    heartbeat_ms=700,
    peer_timeout_ms=4200,
    persistence=False,
    stop_grace_s=1.5,
    restart_budget=9,
    delivery=DeliveryConfig(retries=7, window=64, queue_max_bytes=1 << 21),
    max_age_s=3600.0,
    max_size_mb=64,
    segment_max_mb=3,
    segment_period_s=12.5,
    sensitive_topics=("orders.secret.>", "keys.*"),
    recovery_timeout_s=2.5,
    event_batch_ms=7.5,
)


def test_the_document_round_trips() -> None:
    for config in (PlatformConfig(), NON_DEFAULT):
        assert PlatformConfig.from_document(config.to_document()) == config


def test_the_documented_defaults_are_the_defaults() -> None:
    """The TOML block in broker.config's docstring, read as a config file, is PlatformConfig()."""
    doc = broker_config_module.__doc__ or ""
    block = doc[doc.index("    [broker]") : doc.index("The document is")]
    tables = tomllib.loads(textwrap.dedent(block))
    assert from_tables(tables, "docstring") == PlatformConfig()
    assert {s: set(keys) for s, keys in tables.items() if s != "delivery"} == {
        s: set(keys) for s, keys in SCHEMA.items() if s != "delivery"
    }


KEYS = ServerKeys.generate()


def test_the_broker_runs_with_the_config_it_was_given(tmp_path: Path) -> None:
    paths = PlatformPaths.resolve(tmp_path)
    defaults = broker_config(PlatformConfig(), paths, None, KEYS)
    assert defaults.router.heartbeat_ms == 2000 == P.DEFAULT_HEARTBEAT_MS
    assert defaults.router.peer_timeout_ms == 10_000
    assert defaults.router.delivery == DeliveryConfig()
    assert defaults.persistence is True
    assert defaults.router.store_endpoint == paths.store_endpoint()
    assert defaults.recovery_timeout_s == 10.0
    given = broker_config(NON_DEFAULT, paths, tmp_path, KEYS)
    assert (given.router.heartbeat_ms, given.router.peer_timeout_ms) == (700, 4200)
    assert given.router.delivery is NON_DEFAULT.delivery
    assert (given.persistence, given.router.store_endpoint) == (False, None)
    assert (given.recovery_timeout_s, given.apps_dir) == (2.5, tmp_path)


def test_persistence_runs_with_the_config_it_was_given(tmp_path: Path) -> None:
    paths = PlatformPaths.resolve(tmp_path)
    defaults = persistence_config(PlatformConfig(), paths, None)
    assert defaults.segments == SegmentPolicy(256 * 2**20, 3600 * 10**9)
    assert defaults.retention == RetentionPolicy(30 * 86_400 * 10**9, 0)
    assert tuple(defaults.sensitive_topics) == ()
    given = persistence_config(NON_DEFAULT, paths, None)
    assert given.segments == SegmentPolicy(3 * 2**20, int(12.5e9))  # under 64 MiB / 8
    assert given.retention == RetentionPolicy(3600 * 10**9, 64 * 2**20)
    assert tuple(given.sensitive_topics) == ("orders.secret.>", "keys.*")


def _document(**changes: Any) -> bytes:
    doc: dict[str, Any] = {"version": 1, **PlatformConfig().to_tables()}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if value is None:
            del doc[section][key]
        else:
            doc[section][key] = value
    return bytes(msgpack.packb(doc))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xc1", "not a msgpack document"),
        (msgpack.packb([1, 2]), "must be a map of sections"),
        (msgpack.packb({"version": 2}), "version 2, this build reads 1"),
        (_document(broker__heartbeat_ms=None), "lacks broker.heartbeat_ms"),
        (_document(broker__heartbeat_ms="fast"), "broker.heartbeat_ms must be int"),
        (_document(platform__persistence=1), "platform.persistence must be bool"),
        (_document(broker__heartbeat_ms=20_000), "must exceed"),
        (_document(persistence__segment_max_mb=0), "persistence.segment_max_mb must be in"),
        (_document(delivery__speed=3), "unknown key delivery.speed"),
        (_document(persistence__sensitive_topics=["a..b"]), "persistence.sensitive_topics"),
    ],
)
def test_a_bad_document_names_the_problem(data: bytes, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        PlatformConfig.from_document(data, "doc")
    assert str(error.value).startswith("doc: ")
    assert needle in str(error.value)


def test_the_config_travels_on_an_inherited_descriptor() -> None:
    fd = handoff_pipe(NON_DEFAULT.to_document())
    assert config_from_environment({CONFIG_FD_VARIABLE: str(fd)}) == NON_DEFAULT
    assert config_from_environment({}) == PlatformConfig()  # run by hand: the same defaults
    with pytest.raises(ConfigError, match="PLEXUS_CONFIG_FD='x' is not a descriptor number"):
        config_from_environment({CONFIG_FD_VARIABLE: "x"})
    bad = handoff_pipe(b"not msgpack \xc1")
    with pytest.raises(ConfigError, match="config document on PLEXUS_CONFIG_FD: not a msgpack"):
        config_from_environment({CONFIG_FD_VARIABLE: str(bad)})
