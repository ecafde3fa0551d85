"""`python -m broker`: read the platform config, bind, serve until SIGTERM or SIGINT.

The settings come as one document on the descriptor `PLEXUS_CONFIG_FD` names (the
supervisor writes it, `broker.config`); run by hand without it, the broker uses the
platform's defaults. Its CurveZMQ key comes on `PLEXUS_SERVER_KEY_FD` and its grants on
the channel `PLEXUS_GRANTS_FD` names (`security.grant_channel`): without them nobody could
be authenticated, so the broker refuses to start. Only where it lives (`--home`,
`--apps`) is a flag.
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
from broker.router import RouterConfig
from broker.server import BrokerConfig, BrokerServer
from security.credentials import ServerKeys, server_keys_from_environment
from security.grant_channel import GrantChannelError, GrantReceiver
from security.handoff import HandoffError


def broker_config(
    platform: PlatformConfig,
    paths: PlatformPaths,
    apps_dir: Path | None,
    keys: ServerKeys,
    endpoints: Endpoints | None = None,
    listen_fds: Mapping[str, int] | None = None,
) -> BrokerConfig:
    """The broker's settings, all taken from the platform config and the endpoints."""
    endpoints = endpoints or Endpoints.ipc(paths)
    return BrokerConfig(
        paths=paths,
        apps_dir=apps_dir,
        router=RouterConfig(
            heartbeat_ms=platform.heartbeat_ms,
            peer_timeout_ms=platform.peer_timeout_ms,
            delivery=platform.delivery,
            caps=platform.limits,
            store_endpoint=endpoints.store if platform.persistence else None,
        ),
        persistence=platform.persistence,
        recovery_timeout_s=platform.recovery_timeout_s,
        event_batch_ms=platform.event_batch_ms,
        keys=keys,
        endpoints=endpoints,
        listen_fds=dict(listen_fds or {}),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    parser.add_argument("--home", help="platform home directory")
    parser.add_argument("--apps", type=Path, help="directory of app manifests")
    args = parser.parse_args(argv)
    log = configure("broker")
    try:
        platform = config_from_environment()
        keys = server_keys_from_environment()
        grants = GrantReceiver.from_environment()
        if grants is None:
            raise GrantChannelError("no grant channel: PLEXUS_GRANTS_FD is not set")
        require_curve()
        paths = PlatformPaths.resolve(args.home)
        endpoints = Endpoints.from_environment(paths)
        listen_fds = listen_fds_from_environment()
    except (ConfigError, HandoffError, GrantChannelError, EndpointError) as exc:
        hint = "the broker is started by the supervisor: run `plexus run`"
        event(log, "broker-config-refused", error=str(exc), hint=hint)
        return 2
    paths.prepare()
    config = broker_config(platform, paths, args.apps, keys, endpoints, listen_fds)
    event(log, "broker-config", **platform.to_tables()["broker"], persistence=config.persistence)
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)  # the loop acts on it; nothing else happens in a handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = BrokerServer(config, grants=grants)
    try:
        server.bind()
    except Exception as exc:
        event(log, "broker-bind-failed", error=str(exc))
        return 3
    try:
        server.run(lambda: bool(stop))
    finally:
        server.close()
    event(log, "broker-stopped", signal=stop[0] if stop else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
