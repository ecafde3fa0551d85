"""The `plexus` command's contract: exit codes, stale state, signals and pipes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.paths import PlatformPaths
from supervisor.config import load_config
from supervisor.platform_state import platform_alive
from supervisor.supervisor import Supervisor
from tests.conftest import plexus_cli


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_stale_state(home: Path) -> PlatformPaths:
    paths = PlatformPaths.resolve(home)
    paths.prepare()
    paths.write_state(
        {
            "pid": _dead_pid(),
            "home": str(paths.home),
            "endpoint": paths.bus_endpoint(),
            "apps_dir": str(home / "apps"),
            "started_at": time.time() - 60,
        }
    )
    return paths


def test_stale_state_after_kill_answers_at_once() -> None:
    with tempfile.TemporaryDirectory(prefix="px-stale-", dir="/tmp") as home:
        paths = _write_stale_state(Path(home))
        started = time.monotonic()
        result = plexus_cli("status", "--home", home)
        elapsed = time.monotonic() - started
        assert result.returncode == 3, result
        assert "not running; the last run ended without cleaning up" in result.stderr
        assert elapsed < 3.0
        as_json = plexus_cli("status", "--home", home, "--json")
        assert as_json.returncode == 3
        assert json.loads(as_json.stdout) == {
            "running": False,
            "stale": True,
            "home": str(paths.home),
        }
        for args in (("publish", "a.b", "1"), ("apps", "list"), ("env", "x")):
            other = plexus_cli(*args, "--home", home)
            assert other.returncode == 3, (args, other)
            assert "the last run ended without cleaning up" in other.stderr


def test_live_pid_is_a_running_platform_and_reused_pid_is_not() -> None:
    import os

    assert platform_alive({"pid": os.getpid(), "started_at": time.time()})
    assert not platform_alive({"pid": os.getpid(), "started_at": time.time() - 3600 * 24 * 365})
    assert not platform_alive({"pid": _dead_pid()})
    assert not platform_alive({})


def test_run_removes_stale_state_at_start() -> None:
    with tempfile.TemporaryDirectory(prefix="px-stale-", dir="/tmp") as home:
        paths = _write_stale_state(Path(home))
        supervisor = Supervisor(paths, Path(home) / "apps", load_config(None, persistence=False))
        supervisor._refuse_second_platform()
        assert not paths.state_file.exists()
