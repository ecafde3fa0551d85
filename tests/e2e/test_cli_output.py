"""What the `plexus` commands print, on a real platform: one JSON shape per kind of output,
messages that fit the command, a status that reads at a glance, and apps that appear
when their manifest does."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.paths import PlatformPaths
from clients.bus import Bus, PermissionDenied
from tests.conftest import (
    external_token,
    operator_on,
    plexus_cli,
    running_platform,
    wait_for,
    write_manifest,
)

SLEEPER = (
    'command = ["python", "-c", "import time; time.sleep(600)"]\n'
    '[permissions]\npublish = ["out.>"]\n'
)


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="px-out-", dir="/tmp") as name:
        home, apps = Path(name) / "home", Path(name) / "apps"
        apps.mkdir()
        write_manifest(
            apps,
            "outsider",
            '[permissions]\npublish = ["out.>"]\nsubscribe = ["out.>"]\nrequest = ["out.>"]\n',
        )
        write_manifest(
            apps, "napper", SLEEPER.replace("[permissions]", 'restart = "never"\n[permissions]')
        )
        with running_platform(home, apps):
            yield home, apps


def _cli(home: Path, *args: str) -> Any:
    result = plexus_cli(*args, "--home", str(home))
    assert result.returncode == 0, (args, result.stderr)
    return result


def _json(home: Path, *args: str) -> Any:
    return json.loads(_cli(home, *args, "--json").stdout)


def test_lists_are_arrays_and_streams_are_lines(live: tuple[Path, Path]) -> None:
    home, _ = live
    since = time.time() - 1
    with operator_on(home) as bus:
        for n in range(3):
            bus.publish("out.shape", {"n": n}, confirm=True)
    history = _json(home, "history", "out.shape")
    assert isinstance(history, list) and [m["data"] for m in history] == [
        {"n": 0},
        {"n": 1},
        {"n": 2},
    ]
    assert set(history[0]) == {
        "id",
        "topic",
        "sender",
        "timestamp",
        "correlation_id",
        "attempt",
        "data",
    }
    replay = _cli(home, "replay", "out.>", "--since", str(since), "--json").stdout
    lines = replay.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["topic"] == "out.shape" for line in lines)
    assert isinstance(_json(home, "dlq", "list"), list)
    assert isinstance(_json(home, "keys", "list"), list)
    apps = _json(home, "apps", "list")
    assert isinstance(apps, list) and [a["app"] for a in apps] == ["napper", "outsider"]
    assert {"app", "pid", "state", "connections", "restarts", "exit_reason"} <= set(apps[0])


def test_every_data_command_has_json(live: tuple[Path, Path]) -> None:
    home, _ = live
    assert _json(home, "env", "outsider")["PLEXUS_APP_ID"] == "outsider"
    missing = plexus_cli("dlq", "replay", "--home", str(home), "424242", "--json")
    assert missing.returncode == 6 and "no dead letter 424242" in missing.stderr
    assert missing.stdout == ""
    assert _json(home, "publish", "out.json", "1")["topic"] == "out.json"
    assert _json(home, "dlq", "purge", "--yes") == {"purged": 0}


def test_epoch_zero_replays_from_the_start(live: tuple[Path, Path]) -> None:
    home, _ = live
    with operator_on(home) as bus:
        bus.publish("out.zero", {"first": True}, confirm=True)
    lines = _cli(home, "replay", "out.zero", "--since", "0", "--json").stdout.splitlines()
    assert [json.loads(line)["data"] for line in lines] == [{"first": True}]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--since", "-1"), "--since"),
        (("--since", "1e20"), "--since"),
        (("--since", "yesterday"), "--since"),
        (("--since", "0", "--until", "9999-01-01"), "--until"),
    ],
)
def test_a_bad_time_names_the_option_in_one_line(
    live: tuple[Path, Path], args: tuple[str, ...], option: str
) -> None:
    home, _ = live
    result = plexus_cli("replay", "--home", str(home), "out.>", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr  # one line, as every error
    assert result.stderr.startswith("plexus: error:") and f"'{option}'" in result.stderr
    assert "header" not in result.stderr and "9223372036854775808" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("publish",),
        ("status", "--bogus"),
        ("nosuchcommand",),
        ("dlq", "replay", "zero"),
        ("subscribe", "x", "--count", "0"),
    ],
)
def test_argument_errors_are_one_line(args: tuple[str, ...]) -> None:
    result = plexus_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("plexus: error:") and "--help" in result.stderr


def test_messages_fit_the_command(live: tuple[Path, Path]) -> None:
    home, apps = live
    pattern = plexus_cli("history", "--home", str(home), "quotes.*")
    assert pattern.returncode == 6
    assert "plexus replay 'quotes.*'" in pattern.stderr and "ublish" not in pattern.stderr
    nobody = plexus_cli("request", "--home", str(home), "out.nobody", "1", "--timeout", "2")
    assert nobody.returncode != 0
    assert "or check it." not in nobody.stderr and "spelling" in nobody.stderr
    # a permission refusal says the fix once
    paths = PlatformPaths.resolve(home)
    token = external_token(home, "outsider")
    with (
        Bus.connect(paths.bus_endpoint(), "outsider", token) as app,
        pytest.raises(PermissionDenied) as denied,
    ):
        app.publish("orders.new", {}, confirm=True)
    text = str(denied.value)
    assert text.count("manifest") == 1 and 'publish = ["orders.new"]' in text
    gone = plexus_cli("run", "--home", str(home.parent / "other"), "--apps", str(apps / "none"))
    assert gone.returncode == 6
    assert "does not exist" in gone.stderr and "field" not in gone.stderr


def test_status_reads_at_a_glance(live: tuple[Path, Path]) -> None:
    home, _ = live
    text = _cli(home, "status").stdout
    assert re.search(r"running \d+ (s|min|h|d)\b", text), text
    assert re.search(r"p99 (-|\d+ µs|\d+\.\d ms|\d+\.\d s)", text), text
    assert re.search(r"clients\s+\d+ connected \(\d+ apps, \d+ platform", text), text
    assert "discarded by clean closes" in text
    assert re.search(r"outsider\s+-\s+EXTERNAL", text), text
    report = _json(home, "status")
    assert report["apps"]["outsider"]["state"] == "EXTERNAL"
    assert report["apps"]["outsider"]["external"] is True
    assert report["clients"] == report["app_clients"] + report["platform_clients"]
    assert set(report["dlq"]) == {"entries", "dropped", "by_reason", "discarded_on_close"}


def test_clean_closes_are_counted_in_status(live: tuple[Path, Path]) -> None:
    home, _ = live
    before = _json(home, "status")["dlq"]["discarded_on_close"]
    # the subscriber subscribes, never reads, and leaves with BYE
    with operator_on(home) as bus, operator_on(home) as subscriber:
        subscriber.subscribe("out.closing")
        for n in range(5):
            bus.publish("out.closing", {"n": n}, confirm=True)
        bus.flush(10)
    report = wait_for(
        lambda: (r := _json(home, "status"))["dlq"]["discarded_on_close"] > before and r, 10
    )
    assert report["dlq"]["entries"] == 0


def test_a_manifest_added_while_running_appears_and_can_start(live: tuple[Path, Path]) -> None:
    home, apps = live

    def state(app: str) -> str | None:
        listed = {a["app"]: a for a in _json(home, "apps", "list")}
        return listed[app]["state"] if app in listed else None

    write_manifest(apps, "latecomer", SLEEPER)
    write_manifest(apps, "visitor", '[permissions]\npublish = ["out.>"]\n')
    assert wait_for(lambda: state("latecomer"), 10) == "STOPPED"
    assert wait_for(lambda: state("visitor"), 10) == "EXTERNAL"
    started = _json(home, "apps", "start", "latecomer")
    assert started["app"] == "latecomer"
    wait_for(lambda: state("latecomer") == "RUNNING", 15)
    (apps / "latecomer.toml").unlink()
    (apps / "visitor.toml").unlink()
    wait_for(lambda: state("latecomer") is None and state("visitor") is None, 20)
