"""The whole platform (`plexus run`) with persistence on and off.

On: a full restart (SIGTERM, start again) leaves history and replay answering exactly as
before, and the sensitive canary is in no file. Off (`--no-persistence`): nothing is
written to disk, pub/sub, delivery and the DLQ still work, and history says clearly that
persistence is off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from broker.paths import PlatformPaths
from clients.bus import Bus
from tests.conftest import (
    external_token,
    files_containing,
    operator_on,
    plexus_cli,
    running_platform,
    wait_for,
    write_manifest,
)

CANARY = "CANARY-e2e-4b1d-never-on-disk"


def queries(home: Path, since: float) -> tuple[str, str]:
    history = plexus_cli("history", "--home", str(home), "orders.fill", "--last", "50", "--json")
    replay = plexus_cli("replay", "--home", str(home), "orders.>", "--since", str(since), "--json")
    assert history.returncode == 0, history.stderr
    assert replay.returncode == 0, replay.stderr
    return history.stdout, replay.stdout


def test_a_full_restart_answers_history_and_replay_as_before(short_tmp: Path) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    config = short_tmp / "plexus.toml"
    config.write_text('[persistence]\nsensitive_topics = ["orders.secret.>"]\n', encoding="utf-8")
    started = time.time()
    with running_platform(home, apps, "--config", str(config)):
        with operator_on(home) as bus:
            for i in range(400):
                bus.publish("orders.fill", {"i": i})
            bus.publish("orders.secret.pin", {"pin": CANARY})
            bus.publish("orders.note", {"note": CANARY}, sensitive=True)
            bus.flush(20)
        before = queries(home, started)
    assert len(json.loads(before[0])) == 50
    assert len(before[1].splitlines()) == 402
    assert files_containing(home, CANARY.encode()) == []
    with running_platform(home, apps, "--config", str(config)):
        after = queries(home, started)
        secret = plexus_cli("history", "--home", str(home), "orders.secret.pin", "--json")
    assert after == before
    assert json.loads(secret.stdout)[0]["data"] == {"pin": CANARY}


def test_without_persistence_nothing_is_stored_and_the_bus_still_works(short_tmp: Path) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    write_manifest(apps, "picky", '[permissions]\nsubscribe = ["orders.>"]\n')
    with running_platform(home, apps, "--no-persistence"):
        paths = PlatformPaths.resolve(home)
        picky = Bus.connect(
            paths.bus_endpoint(),
            "picky",
            external_token(home, "picky"),
            session="picky",
        )
        with picky, operator_on(home) as bus:
            got = picky.subscribe("orders.new")
            picky.subscribe("orders.bad", lambda m: m.reject("unprocessable"), manual_ack=True)
            bus.publish("orders.new", {"note": CANARY}, sensitive=True, confirm=True)
            message = got.get(timeout=5)
            assert message is not None and message.data == {"note": CANARY}
            bus.publish("orders.bad", {"note": CANARY}, confirm=True)
            wait_for(lambda: bus.dead_letters()["entries"], timeout=10)
        status = json.loads(plexus_cli("status", "--home", str(home), "--json").stdout)
        assert status["persistence"] is False and status["store"] is None
        history = plexus_cli("history", "--home", str(home), "orders.new")
        assert history.returncode == 8
        assert "--no-persistence" in history.stderr
        listed = plexus_cli("dlq", "list", "--home", str(home), "--json")
        assert json.loads(listed.stdout)[0]["reason"] == "rejected"
    assert files_containing(home, CANARY.encode()) == []
    assert not (home / "store").exists()
