"""`plexus run` end to end: real supervisor, broker and app processes, the real CLI."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from clients.bus import Bus
from tests.conftest import PROCESS_START_S, REPO, plexus_cli, stop_process, wait_for, write_manifest

COUNT = 2000


@dataclass
class Platform:
    home: Path
    apps: Path
    out: Path
    process: subprocess.Popen[str]

    def status(self) -> dict[str, Any]:
        result = plexus_cli("status", "--home", str(self.home), "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def lines(self, name: str) -> list[dict[str, Any]]:
        path = self.out / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _app(apps: Path, app_id: str, module: str, permissions: str, **env: str) -> None:
    env_lines = "".join(f'{k} = "{v}"\n' for k, v in env.items())
    write_manifest(
        apps,
        app_id,
        f'command = ["python", "-m", "{module}"]\n[permissions]\n{permissions}\n[env]\n{env_lines}',
    )


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    with tempfile.TemporaryDirectory(prefix="px-e2e-", dir="/tmp") as name:
        root = Path(name)
        home, apps, out = root / "home", root / "apps", root / "out"
        apps.mkdir()
        out.mkdir()
        ready = ":".join(str(out / f"{c}.jsonl.ready") for c in ("narrow", "wide"))
        _app(
            apps,
            "producer",
            "tests.e2e.apps.producer",
            'publish = ["market.>"]',
            PRODUCER_COUNT=str(COUNT),
            PRODUCER_TOPIC="market.E2E.prices",
            PRODUCER_WAIT_FILE=ready,
        )
        _app(
            apps,
            "narrow",
            "tests.e2e.apps.consumer",
            'subscribe = ["market.*.prices"]',
            CONSUMER_PATTERN="market.*.prices",
            CONSUMER_OUT=str(out / "narrow.jsonl"),
        )
        _app(
            apps,
            "wide",
            "tests.e2e.apps.consumer",
            'subscribe = ["market.>"]',
            CONSUMER_PATTERN="market.>",
            CONSUMER_OUT=str(out / "wide.jsonl"),
        )
        _app(
            apps,
            "intruder",
            "tests.e2e.apps.intruder",
            'publish = ["chatter.>"]',
            INTRUDER_OUT=str(out / "intruder.json"),
        )
        write_manifest(apps, "outsider", '[permissions]\npublish = ["market.>"]\n')
        log = (root / "platform.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        platform = Platform(home, apps, out, process)
        try:
            wait_for(
                lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S
            )
            yield platform
        finally:
            stop_process(process, 15)
            log.close()


def test_apps_in_separate_processes_exchange_messages(platform: Platform) -> None:
    wait_for(
        lambda: (
            len(platform.lines("narrow.jsonl")) >= COUNT
            and len(platform.lines("wide.jsonl")) >= COUNT
        ),
        30,
    )
    for name in ("narrow.jsonl", "wide.jsonl"):
        lines = [line for line in platform.lines(name) if line["topic"] == "market.E2E.prices"]
        assert [line["data"]["seq"] for line in lines] == list(range(COUNT)), name
        assert {line["sender"] for line in lines} == {"producer"}

    def all_running() -> dict[str, Any] | None:
        status = platform.status()
        states = [status["apps"][a]["state"] for a in ("producer", "narrow", "wide")]
        return status if states == ["RUNNING"] * 3 else None

    status = wait_for(all_running, 10)
    pids = {app["pid"] for app in status["apps"].values() if app["pid"]}
    assert len(pids) == 4  # four launched apps, four processes
    assert status["supervisor_pid"] not in pids and status["broker"]["pid"] not in pids
    assert status["apps"]["outsider"]["pid"] is None  # external: not launched


def test_app_outside_its_permissions_is_denied(platform: Platform) -> None:
    path = platform.out / "intruder.json"
    wait_for(path.exists, 20)
    outcomes = {o["try"]: o for o in json.loads(path.read_text())}
    assert outcomes["publish"]["code"] == 300 and outcomes["publish"]["kind"] == "PermissionDenied"
    assert outcomes["subscribe"]["code"] == 301
    assert outcomes["sys"]["code"] == 302
    assert outcomes["allowed"]["ok"] is True


def test_external_app_connects_with_plexus_env(platform: Platform) -> None:
    result = plexus_cli("env", "--home", str(platform.home), "outsider")
    assert result.returncode == 0, result.stderr
    env: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0]
    assert set(env) == {"PLEXUS_ENDPOINT", "PLEXUS_APP_ID", "PLEXUS_TOKEN", "PLEXUS_HOME"}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        with Bus.connect() as bus:
            assert bus.app_id == "outsider"
            bus.publish("market.OUT.prices", {"seq": -1}, confirm=True)
    finally:
        os.environ.clear()
        os.environ.update(old)
    wait_for(lambda: any(line["sender"] == "outsider" for line in platform.lines("wide.jsonl")))
    unknown = plexus_cli("env", "--home", str(platform.home), "nobody")
    assert unknown.returncode == 5 and "nobody" in unknown.stderr


def test_operator_publish_and_subscribe(platform: Platform) -> None:
    home = str(platform.home)
    before = platform.status()["subscriptions"]
    sub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plexus",
            "subscribe",
            "--home",
            home,
            "ops.>",
            "--count",
            "2",
            "--json",
            "--timeout",
            "20",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: platform.status()["subscriptions"] > before, 10)

        def published() -> bool:
            return plexus_cli("publish", "--home", home, "ops.note", '{"n": 1}').returncode == 0

        assert published() and published()
        stdout, stderr = sub.communicate(timeout=20)
    finally:
        stop_process(sub)
    assert sub.returncode == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["topic"], r["data"], r["sender"]) for r in records] == [
        ("ops.note", {"n": 1}, "$cli")
    ] * 2
    bad_json = plexus_cli("publish", "--home", home, "ops.note", "{not json")
    assert bad_json.returncode == 6 and "JSON" in bad_json.stderr
    bad_topic = plexus_cli("publish", "--home", home, "ops..note", "1")
    assert bad_topic.returncode == 6
    timeout = plexus_cli("subscribe", "--home", home, "quiet.>", "--count", "1", "--timeout", "0.5")
    assert timeout.returncode == 7


def test_status_when_nothing_runs() -> None:
    with tempfile.TemporaryDirectory(prefix="px-none-", dir="/tmp") as home:
        result = plexus_cli("status", "--home", home)
        assert result.returncode == 3 and "no platform" in result.stderr
        as_json = plexus_cli("status", "--home", home, "--json")
        assert as_json.returncode == 3 and json.loads(as_json.stdout)["running"] is False
        assert plexus_cli("publish", "--home", home, "a.b", "1").returncode == 3


def test_demo_platform_runs_and_stops_cleanly_on_sigterm() -> None:
    with tempfile.TemporaryDirectory(prefix="px-demo-", dir="/tmp") as home:
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", home],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            status = wait_for(lambda: _status_if_flowing(home), 30)
            tree = {
                status["broker"]["pid"],
                *(a["pid"] for a in status["apps"].values() if a["pid"]),
            }
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            stop_process(process)
        assert process.returncode == 0, output
        assert "blotter | " in output and "market." in output
        assert "platform-stopped" in output
        wait_for(
            lambda: (
                not any(
                    psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                    for pid in tree
                )
            ),
            10,
        )
        assert plexus_cli("status", "--home", home).returncode == 3


def _status_if_flowing(home: str) -> dict[str, Any] | None:
    result = plexus_cli("status", "--home", home, "--json")
    if result.returncode != 0:
        return None
    status: dict[str, Any] = json.loads(result.stdout)
    return status if status["delivered"] > 0 else None


def test_run_refuses_bad_manifests_and_config() -> None:
    with tempfile.TemporaryDirectory(prefix="px-bad-", dir="/tmp") as name:
        root = Path(name)
        apps = root / "apps"
        apps.mkdir()
        write_manifest(apps, "broken", 'restart = "sometimes"\n')
        result = plexus_cli("run", "--home", str(root / "home"), "--apps", str(apps))
        assert result.returncode == 6
        assert "broken.toml" in result.stderr and "restart" in result.stderr
        (apps / "broken.toml").unlink()
        config = root / "bad.toml"
        config.write_text("[broker]\nheartbeat_ms = -1\n", encoding="utf-8")
        result = plexus_cli(
            "run", "--home", str(root / "home"), "--apps", str(apps), "--config", str(config)
        )
        assert result.returncode == 6 and "heartbeat_ms" in result.stderr


def test_dlq_commands_list_replay_and_purge(platform: Platform) -> None:
    home = str(platform.home)
    listed = plexus_cli("dlq", "list", "--home", home, "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)  # a list is one JSON array
    missing = plexus_cli("dlq", "replay", "--home", home, "999999")
    assert missing.returncode == 6 and "no dead letter 999999" in missing.stderr
    bad = plexus_cli("dlq", "replay", "--home", home, "zero")
    assert bad.returncode == 2
    purged = plexus_cli("dlq", "purge", "--home", home, "--json", "--yes")
    assert purged.returncode == 0 and "purged" in json.loads(purged.stdout)
    assert json.loads(plexus_cli("dlq", "list", "--home", home, "--json").stdout) == []
