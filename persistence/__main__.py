"""`python -m persistence`: the persistence service of one platform, until SIGTERM or SIGINT.

Launched by the supervisor with a `$persistence` credential on PLEXUS_CREDENTIAL_FD; the
flags carry the [persistence] section of the platform config.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from broker.logs import configure, event
from broker.paths import PlatformPaths
from clients.bus import credential_from_environment
from persistence.keyring import KeyFileError
from persistence.retention import RetentionPolicy
from persistence.service import PersistenceConfig, PersistenceService
from persistence.store import SegmentPolicy

_MIB = 2**20


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m persistence", description=__doc__)
    parse.add_argument("--home", help="platform home directory")
    parse.add_argument("--apps", type=Path, help="directory of app manifests (query permissions)")
    parse.add_argument("--max-age-s", type=float, default=30 * 86_400.0)
    parse.add_argument("--max-size-mb", type=int, default=0, help="0: no size limit")
    parse.add_argument("--segment-max-mb", type=int, default=256)
    parse.add_argument("--segment-period-s", type=float, default=3600.0)
    parse.add_argument(
        "--sensitive-topic", action="append", default=[], help="pattern stored encrypted"
    )
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log = configure("persistence")
    paths = PlatformPaths.resolve(args.home)
    paths.prepare()
    segment_bytes = args.segment_max_mb * _MIB
    if args.max_size_mb:  # retention deletes whole segments: keep them a fraction of the limit
        segment_bytes = max(64 * 1024, min(segment_bytes, args.max_size_mb * _MIB // 8))
    config = PersistenceConfig(
        paths=paths,
        apps_dir=args.apps,
        segments=SegmentPolicy(segment_bytes, int(args.segment_period_s * 1e9)),
        retention=RetentionPolicy(int(args.max_age_s * 1e9), args.max_size_mb * _MIB),
        sensitive_topics=tuple(args.sensitive_topic),
    )
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = PersistenceService(config, credential_from_environment())
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
