"""Supervisor benchmark: start-up time, idle app RSS, crash-to-reconnect time, idle CPU.

    python -m perf.bench_supervisor [--apps 10] [--idle-apps 500] [--repeat 3] [--json F]

Each figure is the median of `--repeat` runs of a real `plexus run` with real app
processes (idle Python apps using the client). Printed as JSON and a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from broker.paths import PlatformPaths
from perf.credentials import operator_bus

REPO = Path(__file__).resolve().parent.parent
IDLE_APP = 'command = ["python", "-m", "tests.e2e.apps.misbehave"]\n[env]\nMODE = "idle"\n'


def _wait(predicate: Callable[[], Any], timeout: float, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"not within {timeout}s")


class Platform:
    """`plexus run` with N idle apps in a temp home; stopped on exit."""

    def __init__(self, apps: int) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="px-bs-", dir="/tmp")
        root = Path(self._dir.name)
        self.apps_dir = root / "apps"
        self.apps_dir.mkdir()
        for i in range(apps):
            (self.apps_dir / f"a{i}.toml").write_text(f'id = "a{i}"\n{IDLE_APP}')
        self.paths = PlatformPaths.resolve(root / "home")
        self.n = apps
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Seconds from `plexus run` to every app connected (seen by the broker)."""
        started = time.monotonic()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "plexus",
                "run",
                "--home",
                str(self.paths.home),
                "--apps",
                str(self.apps_dir),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(self.paths.read_state, 60)
        # the operator: this process is the user's and no app's, so any fresh key pinning
        # the platform's keys (from the state file) is admitted as `$cli`
        self.operator = operator_bus(self.paths, session="bench", timeout=30)
        _wait(lambda: len(self.connected()) >= self.n, 120, 0.005)
        return time.monotonic() - started

    def connected(self) -> dict[str, Any]:
        apps: dict[str, Any] = self.operator.broker_stats()["apps"]
        return {a: v for a, v in apps.items() if not a.startswith("$") and v["sessions"]}

    def app_pids(self) -> dict[str, int]:
        state = self.paths.read_state() or {}
        return {a: v["pid"] for a, v in state.get("apps", {}).items() if v.get("pid")}

    def stop(self) -> None:
        if hasattr(self, "operator"):
            self.operator.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self._dir.cleanup()


def crash_to_reconnect(platform: Platform) -> float:
    """kill -9 one app; seconds until its replacement is connected again."""
    pids = platform.app_pids()
    app, pid = sorted(pids.items())[0]
    stats = platform.operator.broker_stats()
    before = stats["sessions_opened"] + stats["sessions_resumed"]  # the new process resumes
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def back() -> bool:
        new_pid = platform.app_pids().get(app)
        stats = platform.operator.broker_stats()
        hellos = stats["sessions_opened"] + stats["sessions_resumed"]
        return bool(new_pid and new_pid != pid and hellos > before)

    _wait(back, 60, 0.005)
    return time.monotonic() - killed


def idle_rss_mb(platform: Platform) -> float:
    rss = [psutil.Process(pid).memory_info().rss for pid in platform.app_pids().values()]
    return float(statistics.median(rss)) / 2**20


def idle_cpu(platform: Platform, seconds: float) -> dict[str, float]:
    """CPU % of the supervisor and the broker over `seconds` of rest."""
    assert platform.process is not None
    supervisor = psutil.Process(platform.process.pid)
    state = platform.paths.read_state() or {}
    broker = psutil.Process(state["broker"]["pid"])
    supervisor.cpu_percent(None)
    broker.cpu_percent(None)
    time.sleep(seconds)
    return {
        "supervisor_cpu_percent": supervisor.cpu_percent(None),
        "broker_cpu_percent": broker.cpu_percent(None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_supervisor")
    parser.add_argument("--apps", type=int, default=10)
    parser.add_argument("--idle-apps", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "perf" / "results" / "supervisor.json")
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {
        "startup_s": [],
        "idle_app_rss_mb": [],
        "crash_to_reconnect_s": [],
    }
    for rep in range(args.repeat):
        platform = Platform(args.apps)
        try:
            runs["startup_s"].append(platform.start())
            time.sleep(1.0)
            runs["idle_app_rss_mb"].append(idle_rss_mb(platform))
            runs["crash_to_reconnect_s"].append(crash_to_reconnect(platform))
        finally:
            platform.stop()
        print(
            f"[{rep + 1}/{args.repeat}] {args.apps} apps: "
            f"{ {k: round(v[-1], 3) for k, v in runs.items()} }",
            file=sys.stderr,
        )
    big = Platform(args.idle_apps)
    try:
        big_startup = big.start()
        time.sleep(3.0)
        rest = idle_cpu(big, 10.0)
    finally:
        big.stop()
    result = {
        "apps": args.apps,
        "repeat": args.repeat,
        "median": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "runs": runs,
        "idle_apps": args.idle_apps,
        "idle_startup_s": round(big_startup, 2),
        **rest,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    med = result["median"]
    print(f"""
figure                                  measured      requirement   aim
time to {args.apps} apps connected             {med["startup_s"]:>8.2f} s    < 3 s         < 1 s
idle RSS of a client app (median)       {med["idle_app_rss_mb"]:>8.1f} MiB  < 100 MB      < 40 MB
kill -9 of an app to reconnection       {med["crash_to_reconnect_s"]:>8.2f} s    < 60 s        < 1 s
{args.idle_apps} idle apps: started in             {big_startup:>8.1f} s
{args.idle_apps} idle apps: supervisor CPU at rest {rest["supervisor_cpu_percent"]:>8.1f} %
{args.idle_apps} idle apps: broker CPU at rest     {rest["broker_cpu_percent"]:>8.1f} %""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
