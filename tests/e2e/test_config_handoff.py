"""`plexus run --config FILE`: a value set in the file reaches the broker and the persistence
service (over PLEXUS_CONFIG_FD) and shows in what they do, not only in what they log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from broker.paths import SEGMENTS_DIR, PlatformPaths
from persistence.segments import list_segment_files
from tests.conftest import PROCESS_START_S, REPO, operator_on, plexus_cli, stop_process, wait_for

CONFIG = """
[broker]
heartbeat_ms = 750
peer_timeout_ms = 6000
[persistence]
segment_max_mb = 3
segment_period_s = 0.5
sensitive_topics = ["orders.secret.>"]
"""


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of event `name` (every process of the platform logs to stderr)."""
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if f'"event": "{name}"' in line]


def test_a_config_value_reaches_the_broker_and_persistence(short_tmp: Path) -> None:
    home, apps, log = short_tmp / "home", short_tmp / "apps", short_tmp / "run.log"
    apps.mkdir()
    config = short_tmp / "plexus.toml"
    config.write_text(CONFIG, encoding="utf-8")
    argv = ["run", "--home", str(home), "--apps", str(apps), "--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", *argv],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        wait_for(lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S)
        with operator_on(home) as bus:
            welcome = bus._io.session.welcome  # what the broker tells every client
            assert welcome is not None
            assert (welcome.heartbeat_ms, welcome.timeout_ms) == (750, 6000)
            bus.publish("demo.one", {"n": 1}, confirm=True)
            time.sleep(0.7)  # past segment_period_s: the next write rolls a new segment
            bus.publish("demo.two", {"n": 2}, confirm=True)
        segments = PlatformPaths.resolve(home).store_dir / SEGMENTS_DIR
        wait_for(lambda: len(list_segment_files(segments)) >= 2, 10)
        (broker,) = _events(log, "broker-config")
        assert (broker["heartbeat_ms"], broker["peer_timeout_ms"]) == (750, 6000)
        assert broker["persistence"] is True
        (stored,) = _events(log, "persistence-config")
        assert stored["segment_max_bytes"] == 3 * 2**20
        assert stored["segment_period_s"] == 0.5
        assert stored["sensitive_topics"] == ["orders.secret.>"]
    finally:
        stop_process(process, 15)
