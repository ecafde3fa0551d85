"""`python -m broker`: read settings, bind, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from broker import protocol as P
from broker.delivery import DELIVERY_FIELDS, DeliveryConfig
from broker.logs import configure, event
from broker.paths import PlatformPaths
from broker.router import RouterConfig
from broker.server import BrokerConfig, BrokerServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    parser.add_argument("--home", help="platform home directory")
    parser.add_argument("--apps", type=Path, help="directory of app manifests")
    parser.add_argument("--heartbeat-ms", type=int, default=P.DEFAULT_HEARTBEAT_MS)
    parser.add_argument("--peer-timeout-ms", type=int, default=P.DEFAULT_PEER_TIMEOUT_MS)
    parser.add_argument(
        "--persistence",
        choices=("on", "off"),
        default="off",
        help="on: wait for the persistence service, recover from the store, confirm once stored",
    )
    parser.add_argument("--recovery-timeout-s", type=float, default=10.0)
    defaults = DeliveryConfig()
    for name in DELIVERY_FIELDS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    log = configure("broker")
    paths = PlatformPaths.resolve(args.home)
    paths.prepare()
    config = BrokerConfig(
        paths=paths,
        apps_dir=args.apps,
        router=RouterConfig(
            heartbeat_ms=args.heartbeat_ms,
            peer_timeout_ms=args.peer_timeout_ms,
            delivery=DeliveryConfig(**{name: getattr(args, name) for name in DELIVERY_FIELDS}),
            store_endpoint=paths.store_endpoint() if args.persistence == "on" else None,
        ),
        persistence=args.persistence == "on",
        recovery_timeout_s=args.recovery_timeout_s,
    )
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)  # the loop acts on it; nothing else happens in a handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = BrokerServer(config)
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
