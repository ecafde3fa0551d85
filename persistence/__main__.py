"""`python -m persistence`: the persistence service of one platform, until SIGTERM or SIGINT.

Launched by the supervisor with a `$persistence` credential on PLEXUS_CREDENTIAL_FD, the
store's CurveZMQ key on PLEXUS_SERVER_KEY_FD, its grant channel on PLEXUS_GRANTS_FD, the
platform config on PLEXUS_CONFIG_FD (`broker.config`) and, for a passphrase key ring, the
passphrase on PLEXUS_KEY_PASSPHRASE_FD (never from the environment); run by hand without
the config, it uses the platform's defaults. Only where it lives (`--home`, `--apps`) is
a flag.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from broker.config import ConfigError, PlatformConfig, config_from_environment
from broker.endpoints import (
    EndpointError,
    Endpoints,
    listen_fds_from_environment,
    require_curve,
)
from broker.logs import configure, event
from broker.paths import PlatformPaths
from persistence.retention import RetentionPolicy
from persistence.service import PersistenceConfig, PersistenceService
from persistence.store import SegmentPolicy
from security.credentials import server_keys_from_environment
from security.grant_channel import GrantChannelError, GrantReceiver
from security.handoff import HandoffError, credential_from_environment
from security.keyring import KeyFileError, passphrase_from_descriptor

_MIB = 2**20
_MIN_SEGMENT_BYTES = 64 * 1024


def persistence_config(
    platform: PlatformConfig,
    paths: PlatformPaths,
    apps_dir: Path | None,
    passphrase: str | None = None,
    endpoints: Endpoints | None = None,
    listen_fds: Mapping[str, int] | None = None,
) -> PersistenceConfig:
    """The service's settings, all taken from the [persistence] section."""
    segment_bytes = platform.segment_max_mb * _MIB
    if platform.max_size_mb:  # retention deletes whole segments: keep them a fraction of it
        segment_bytes = max(
            _MIN_SEGMENT_BYTES, min(segment_bytes, platform.max_size_mb * _MIB // 8)
        )
    return PersistenceConfig(
        paths=paths,
        apps_dir=apps_dir,
        segments=SegmentPolicy(segment_bytes, int(platform.segment_period_s * 1e9)),
        retention=RetentionPolicy(int(platform.max_age_s * 1e9), platform.max_size_mb * _MIB),
        sensitive_topics=platform.sensitive_topics,
        passphrase=passphrase,
        endpoints=endpoints,
        listen_fds=dict(listen_fds or {}),
    )


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m persistence", description=__doc__)
    parse.add_argument("--home", help="platform home directory")
    parse.add_argument("--apps", type=Path, help="directory of app manifests (query permissions)")
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log = configure("persistence")
    try:
        platform = config_from_environment()
        token = credential_from_environment()
        keys = server_keys_from_environment()
        grants = GrantReceiver.from_environment()
        if grants is None:
            raise GrantChannelError("no grant channel: PLEXUS_GRANTS_FD is not set")
        passphrase = passphrase_from_descriptor()
        require_curve()
        paths = PlatformPaths.resolve(args.home)
        endpoints = Endpoints.from_environment(paths)
        listen_fds = listen_fds_from_environment()
    except (ConfigError, HandoffError, GrantChannelError, EndpointError) as exc:
        event(log, "persistence-config-refused", error=str(exc))
        return 2
    except KeyFileError as exc:
        event(log, "keys-refused", error=str(exc))
        return 2
    paths.prepare()
    config = persistence_config(platform, paths, args.apps, passphrase, endpoints, listen_fds)
    event(
        log,
        "persistence-config",
        segment_max_bytes=config.segments.max_bytes,
        segment_period_s=platform.segment_period_s,
        max_age_s=platform.max_age_s,
        max_size_mb=platform.max_size_mb,
        sensitive_topics=list(config.sensitive_topics),
    )
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = PersistenceService(config, token, keys, grants)
        service.bind()
    except KeyFileError as exc:
        event(log, "keys-refused", error=str(exc))
        return 2
    except Exception as exc:
        event(log, "persistence-start-failed", error=f"{type(exc).__name__}: {exc}")
        return 3
    try:
        service.run(lambda: bool(stop))
    finally:
        service.close()
    event(log, "persistence-stopped", signal=stop[0] if stop else None, commits=service.commits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
