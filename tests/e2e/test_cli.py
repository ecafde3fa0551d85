"""The `plexus` command's contract: exit codes, stale state, signals and pipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.paths import PlatformPaths
from clients.bus import Bus
from supervisor.config import load_config
from supervisor.platform_state import platform_alive
from supervisor.supervisor import Supervisor
from tests.conftest import (
    REPO,
    external_token,
    operator_on,
    plexus_cli,
    running_platform,
    stop_process,
    wait_for,
    write_manifest,
)


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


@pytest.fixture(scope="module")
def live() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="px-cli-", dir="/tmp") as name:
        home, apps = Path(name) / "home", Path(name) / "apps"
        apps.mkdir()
        write_manifest(
            apps, "outsider", '[permissions]\npublish = ["cli.>"]\nsubscribe = ["cli.>"]\n'
        )
        with running_platform(home, apps):
            yield home


def test_unknown_app_is_exit_5_in_every_command(live: Path) -> None:
    for args in (
        ("apps", "stop", "nosuch"),
        ("apps", "start", "nosuch"),
        ("apps", "restart", "nosuch"),
        ("env", "nosuch"),
    ):
        result = plexus_cli(*args, "--home", str(live))
        assert result.returncode == 5, (args, result)
        assert "nosuch" in result.stderr


def _plexus(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "plexus", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _subscriptions(home: Path) -> int:
    result = plexus_cli("status", "--home", str(home), "--json")
    count: int = json.loads(result.stdout)["subscriptions"]
    return count


def test_ctrl_c_during_subscribe_exits_130_after_what_it_printed(live: Path) -> None:
    before = _subscriptions(live)
    sub = _plexus("subscribe", "--home", str(live), "cli.sigint.>", "--json")
    try:
        wait_for(lambda: _subscriptions(live) > before, 10)
        with operator_on(live) as bus:
            bus.publish("cli.sigint.a", {"n": 1}, confirm=True)
            bus.publish("cli.sigint.a", {"n": 2}, confirm=True)
        assert sub.stdout is not None
        lines = [sub.stdout.readline(), sub.stdout.readline()]
        sub.send_signal(signal.SIGINT)
        rest, stderr = sub.communicate(timeout=10)
    finally:
        stop_process(sub)
    assert sub.returncode == 130, stderr
    assert [json.loads(line)["data"] for line in lines] == [{"n": 1}, {"n": 2}]
    assert rest == "" and "Traceback" not in stderr


def test_closed_pipe_during_replay_exits_quietly(live: Path) -> None:
    since = time.time() - 1
    with operator_on(live) as bus:
        for n in range(3000):
            bus.publish("cli.pipe.x", {"n": n, "pad": "x" * 100})
        bus.publish("cli.pipe.x", {"n": "last"}, confirm=True)
    replay = _plexus("replay", "--home", str(live), "cli.pipe.>", "--since", str(since), "--json")
    assert replay.stdout is not None and replay.stderr is not None
    first = replay.stdout.readline()
    replay.stdout.close()
    try:
        replay.wait(20)
        stderr = replay.stderr.read()
    finally:
        stop_process(replay)
    assert json.loads(first)["topic"] == "cli.pipe.x"
    assert replay.returncode in (0, 141), stderr
    assert stderr == ""


def test_version() -> None:
    result = plexus_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("plexus ")


def test_publish_from_stdin_or_file_sensitive_and_to(live: Path, tmp_path: Path) -> None:
    home = str(live)
    paths = PlatformPaths.resolve(live)
    token = external_token(live, "outsider")
    with Bus.connect(paths.bus_endpoint(), "outsider", token) as app:
        sub = app.subscribe("cli.to.>")
        wait_for(lambda: _subscriptions(live) > 0, 10)
        piped = plexus_cli(
            "publish", "--home", home, "cli.to.a", "-", input_text='{"via": "stdin"}'
        )
        assert piped.returncode == 0, piped.stderr
        body = tmp_path / "body.json"
        body.write_text('{"via": "file"}', encoding="utf-8")
        from_file = plexus_cli("publish", "--home", home, "cli.to.b", "--file", str(body))
        assert from_file.returncode == 0, from_file.stderr
        secret = plexus_cli(
            "publish",
            "--home",
            home,
            "cli.to.c",
            '{"via": "to"}',
            "--sensitive",
            "--to",
            "outsider",
        )
        assert secret.returncode == 0, secret.stderr
        got = [sub.get(5) for _ in range(3)]
    assert [m.data if m else None for m in got] == [
        {"via": "stdin"},
        {"via": "file"},
        {"via": "to"},
    ]
    nan = plexus_cli("publish", "--home", home, "cli.to.a", "NaN")
    assert nan.returncode == 6 and "JSON" in nan.stderr
    neither = plexus_cli("publish", "--home", home, "cli.to.a")
    assert neither.returncode == 2


def test_request_prints_the_reply(live: Path) -> None:
    home = str(live)
    listed = plexus_cli("request", "--home", home, "$sys.supervisor.apps", '{"op": "list"}')
    assert listed.returncode == 0, listed.stderr
    assert "outsider" in json.loads(listed.stdout)["apps"]
    as_json = plexus_cli(
        "request", "--home", home, "$sys.supervisor.apps", '{"op": "list"}', "--json"
    )
    assert as_json.returncode == 0 and "outsider" in json.loads(as_json.stdout)["data"]["apps"]
    nobody = plexus_cli("request", "--home", home, "cli.nobody", "1", "--timeout", "1")
    assert nobody.returncode != 0 and nobody.stderr.startswith("plexus: error:")


def test_stop_stops_the_platform_cleanly(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="px-stop-", dir="/tmp") as name:
        home, apps = Path(name) / "home", Path(name) / "apps"
        apps.mkdir()
        with running_platform(home, apps) as process:
            stopped = plexus_cli("stop", "--home", str(home))
            assert stopped.returncode == 0, stopped.stderr
            assert process.wait(5) == 0
            assert not PlatformPaths.resolve(home).state_file.exists()
        assert plexus_cli("stop", "--home", str(home)).returncode == 3
