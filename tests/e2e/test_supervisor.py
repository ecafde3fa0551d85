"""The supervisor with real processes: crash loops, memory limits, process trees, a killed
supervisor and a hung app."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.paths import PlatformPaths
from clients.bus import Bus
from tests.conftest import (
    PROCESS_START_S,
    REPO,
    operator_on,
    plexus_cli,
    stop_process,
    wait_for,
    write_manifest,
)

CONFIG = """
[broker]
heartbeat_ms = 200
peer_timeout_ms = 1500
[platform]
stop_grace_s = 8.0
restart_backoff_s = 0.2
restart_backoff_cap_s = 2.0
restart_budget = 3
restart_window_s = 60
settle_s = 0.5
cpu_window_s = 2.0
"""


@dataclass
class Running:
    home: Path
    process: subprocess.Popen[str]
    log: Path

    def status(self) -> dict[str, Any]:
        result = plexus_cli("status", "--home", str(self.home), "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def app(self, name: str) -> dict[str, Any]:
        state = PlatformPaths.resolve(self.home).read_state()
        assert state is not None, (  # the platform ended: its log says why
            f"no state file (platform exit {self.process.poll()}):\n"
            + self.log.read_text(errors="replace")[-4000:]
        )
        app: dict[str, Any] = state["apps"][name]
        return app

    def operator(self) -> Bus:
        return operator_on(self.home)


def _misbehaving(
    apps: Path, app_id: str, mode: str, extra: str = "", restart: str = "on-failure"
) -> None:
    write_manifest(
        apps,
        app_id,
        f'command = ["python", "-m", "tests.e2e.apps.misbehave"]\nrestart = "{restart}"\n'
        f'{extra}[permissions]\npublish = ["count.>"]\n[env]\nMODE = "{mode}"\n',
    )


@pytest.fixture
def platform() -> Iterator[Running]:
    with tempfile.TemporaryDirectory(prefix="px-sup-", dir="/tmp") as name:
        root = Path(name)
        apps = root / "apps"
        apps.mkdir()
        _misbehaving(apps, "crasher", "crash")
        _misbehaving(apps, "counter", "count")
        _misbehaving(apps, "hog", "hog", "[limits]\nmemory_mb = 80\n")
        _misbehaving(apps, "forker", "fork")
        _misbehaving(apps, "sleepy", "idle")
        (root / "plexus.toml").write_text(CONFIG, encoding="utf-8")
        log = (root / "platform.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "plexus",
                "run",
                "--home",
                str(root / "home"),
                "--apps",
                str(apps),
                "--config",
                str(root / "plexus.toml"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        running = Running(root / "home", process, root / "platform.log")
        try:
            wait_for(
                lambda: plexus_cli("status", "--home", str(running.home)).returncode == 0,
                PROCESS_START_S,
            )
            yield running
        finally:
            stop_process(process, 15)
            log.close()


def test_crash_loop_goes_fatal_while_the_neighbour_is_untouched(platform: Running) -> None:
    watcher = platform.operator()
    ticks = watcher.subscribe("count.tick")
    counter_pid = wait_for(lambda: platform.app("counter")["pid"], 10)
    wait_for(lambda: platform.app("crasher")["state"] == "FATAL", 30)
    assert platform.app("crasher")["restarts"] == 3
    announced = [
        json.loads(line) for line in platform.log.read_text().splitlines() if '"app-fatal"' in line
    ]
    assert [(a["app"], a["restarts"]) for a in announced] == [("crasher", 3)]
    assert "exit 3" in platform.app("crasher")["exit_reason"]
    assert platform.app("counter")["pid"] == counter_pid
    seen: list[int] = []
    while len(seen) < 50:  # a count, not a rate: a slow machine just takes longer
        tick = ticks.get(timeout=5)
        assert tick is not None, f"the neighbour's stream stopped after {len(seen)} ticks"
        seen.append(tick.data)
    assert seen == list(range(seen[0], seen[0] + len(seen))), "the neighbour's stream has a gap"
    watcher.close()


def test_memory_hog_is_killed_alone_and_restarted(platform: Running) -> None:
    watcher = platform.operator()
    kills = watcher.subscribe("$sys.audit.apps.limit-kill")
    counter_pid = wait_for(lambda: platform.app("counter")["pid"], 10)
    first_pid = wait_for(lambda: platform.app("hog")["pid"], 10)
    notice = kills.get(timeout=20)
    assert notice is not None and notice.data["app"] == "hog"
    assert notice.data["limit_kind"] == "memory" and notice.data["limit"] == 80
    assert notice.data["measured"] > 80
    wait_for(lambda: platform.app("hog")["pid"] not in (None, first_pid), 10)
    assert platform.app("hog")["restarts"] >= 1
    assert platform.app("counter")["pid"] == counter_pid
    watcher.close()


def test_stopped_app_leaves_no_process_of_its_tree(platform: Running) -> None:
    app_pid = wait_for(lambda: platform.app("forker")["pid"], 10)

    def grandchildren() -> list[int]:
        kids = psutil.Process(app_pid).children(recursive=True)
        return [k.pid for k in kids] if len(kids) >= 2 else []

    tree = [app_pid, *wait_for(grandchildren, 10)]  # one of them in a session of its own
    # the supervisor kills what its monitoring samples saw: wait until one sampled the
    # whole tree. Each sample rewrites the state (a new uptime); the second new one after
    # the tree was complete comes from a sample that began after it.
    uptimes = {platform.app("forker")["uptime_s"]}

    def two_samples_later() -> bool:
        uptimes.add(platform.app("forker")["uptime_s"])
        return len(uptimes) >= 3

    wait_for(two_samples_later, 10)
    result = plexus_cli("apps", "stop", "--home", str(platform.home), "forker")
    assert result.returncode == 0, result.stderr

    def gone() -> bool:
        for pid in tree:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_for(gone, 10)

    def no_zombies() -> bool:  # the supervisor reaps adopted orphans on its next poll
        return not [
            p
            for p in psutil.Process(platform.process.pid).children(recursive=True)
            if p.status() == psutil.STATUS_ZOMBIE
        ]

    wait_for(no_zombies, 5)
    wait_for(lambda: platform.app("forker")["state"] == "STOPPED", 5)
    listed = plexus_cli("apps", "list", "--home", str(platform.home), "--json")
    [forker] = [app for app in json.loads(listed.stdout) if app["app"] == "forker"]
    assert forker["state"] == "STOPPED"
    started = plexus_cli("apps", "start", "--home", str(platform.home), "forker")
    assert started.returncode == 0
    wait_for(lambda: platform.app("forker")["pid"], 10)


def test_hung_app_is_detected_and_restarted(platform: Running) -> None:
    pid = wait_for(
        lambda: platform.app("sleepy")["state"] == "RUNNING" and platform.app("sleepy")["pid"], 10
    )
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:  # a stopped process gets SIGKILL at once: no 8 s SIGTERM grace spent on it
        wait_for(lambda: platform.app("sleepy")["pid"] not in (None, pid), 20)
        replaced_after = time.monotonic() - stopped_at
        # a SIGTERM it cannot handle would cost the whole grace after the peer timeout
        # (>= 9.5 s); the bound leaves 7 s for detection and restart on a loaded machine
        assert replaced_after < 1.5 + 8.0, f"replaced after {replaced_after:.2f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "unresponsive" in platform.app("sleepy")["exit_reason"]


def test_no_app_survives_a_killed_supervisor(platform: Running) -> None:
    pids = wait_for(
        lambda: [a["pid"] for a in (platform.app(n) for n in ("counter", "sleepy")) if a["pid"]], 10
    )
    assert len(pids) == 2
    platform.process.send_signal(signal.SIGKILL)
    platform.process.wait(5)

    def all_gone() -> bool:
        return not any(
            psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            for pid in pids
        )

    wait_for(all_gone, 10)


def test_killed_broker_is_restarted_and_apps_come_back(platform: Running) -> None:
    state = PlatformPaths.resolve(platform.home).read_state()
    assert state is not None
    old_broker = state["broker"]["pid"]
    counter_pid = wait_for(lambda: platform.app("counter")["pid"], 10)
    os.kill(old_broker, signal.SIGKILL)

    def new_broker() -> int | None:
        current = PlatformPaths.resolve(platform.home).read_state()
        pid = current["broker"]["pid"] if current else None
        return pid if pid not in (None, old_broker) else None

    wait_for(new_broker, 10)
    watcher = wait_for(platform.operator, 10)
    ticks = watcher.subscribe("count.tick")
    assert ticks.get(timeout=10) is not None  # the counter reconnected by itself
    assert platform.app("counter")["pid"] == counter_pid
    after = PlatformPaths.resolve(platform.home).read_state()
    assert after is not None and after["broker"]["restarts"] == 1
    watcher.close()
