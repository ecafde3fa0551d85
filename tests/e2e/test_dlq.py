"""The dead-letter queue on a real platform (`plexus run`): a clean exit leaves it empty,
and `plexus dlq purge` confirms on a terminal, refuses without one (unless --yes) and
purges by app, reason or age."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from broker.paths import PlatformPaths
from clients.bus import Bus
from tests.conftest import (
    REPO,
    external_token,
    operator_on,
    plexus_cli,
    running_platform,
    wait_for,
    write_manifest,
)

PLEXUS = (sys.executable, "-m", "plexus")


def _app_bus(home: Path, app: str) -> Bus:
    paths = PlatformPaths.resolve(home)
    token = external_token(home, app)
    return Bus.connect(paths.bus_endpoint(), app, token, session=app)


def _purge_on_a_terminal(home: Path, answer: str, *args: str) -> tuple[int, str, str]:
    """`plexus dlq purge ARGS` with a terminal for stdin, answering the prompt."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [*PLEXUS, "dlq", "purge", "--home", str(home), *args],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        os.write(controller, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    return process.returncode, stdout, stderr


def _dlq(home: Path) -> list[dict[str, object]]:
    listed = plexus_cli("dlq", "list", "--home", str(home), "--json")
    assert listed.returncode == 0, listed.stderr
    entries: list[dict[str, object]] = json.loads(listed.stdout)
    return entries


def test_clean_exits_leave_the_dlq_empty_and_purge_confirms_and_filters(
    short_tmp: Path,
) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    for app in ("picky", "fussy", "idle"):
        write_manifest(apps, app, '[permissions]\nsubscribe = ["orders.>"]\n')
    with running_platform(home, apps, "--no-persistence"), operator_on(home) as bus:
        # a subscriber that leaves cleanly with messages queued: discarded, not dead
        with _app_bus(home, "idle") as idle:
            idle.subscribe("orders.>")
            for i in range(5):
                bus.publish("orders.new", {"i": i}, confirm=True)
            bus.flush(10)
        assert bus.broker_stats()["discarded_on_close"] == 5
        # the CLI's own exit: `subscribe --count 1` while four arrive
        subscriptions = bus.broker_stats()["subscriptions"]
        sub = subprocess.Popen(
            [
                *PLEXUS,
                "subscribe",
                "--home",
                str(home),
                "orders.>",
                "--count",
                "1",
                "--timeout",
                "20",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        wait_for(lambda: bus.broker_stats()["subscriptions"] > subscriptions, timeout=15)
        for i in range(4):
            bus.publish("orders.new", {"i": i})
        bus.flush(10)
        _, stderr = sub.communicate(timeout=30)
        assert sub.returncode == 0, stderr
        wait_for(lambda: bus.broker_stats()["subscriptions"] == subscriptions, timeout=10)
        stats = bus.broker_stats()
        assert stats["dlq_size"] == 0 and stats["discarded_on_close"] >= 5
        assert _dlq(home) == []
        # failures do dead-letter: two rejected for picky, one for fussy
        with _app_bus(home, "picky") as picky, _app_bus(home, "fussy") as fussy:
            picky.subscribe("orders.bad", lambda m: m.reject("no"), manual_ack=True)
            fussy.subscribe("orders.worse", lambda m: m.reject("no"), manual_ack=True)
            for topic in ("orders.bad", "orders.bad", "orders.worse"):
                bus.publish(topic, {}, confirm=True)
            wait_for(lambda: len(bus.dead_letters()["entries"]) == 3, timeout=10)
        # not a terminal and no --yes: refused, nothing purged
        refused = plexus_cli("dlq", "purge", "--home", str(home))
        assert refused.returncode == 2 and "--yes" in refused.stderr, refused
        assert refused.stderr.count("\n") == 1 and len(_dlq(home)) == 3
        # filters select; --yes purges without asking
        for args in (["--reason", "nacked"], ["--older-than", "3600"], ["--app", "nobody"]):
            none = plexus_cli("dlq", "purge", "--home", str(home), "--yes", "--json", *args)
            assert (none.returncode, json.loads(none.stdout)) == (0, {"purged": 0}), none
        fussy_only = plexus_cli("dlq", "purge", "--home", str(home), "--app", "fussy", "--yes")
        assert (fussy_only.returncode, fussy_only.stdout) == (0, "purged 1\n")
        assert {e["app"] for e in _dlq(home)} == {"picky"}
        # on a terminal it asks: "n" keeps them (exit 1), "y" purges the chosen ones
        code, stdout, stderr = _purge_on_a_terminal(home, "n", "--reason", "rejected")
        assert code == 1 and "Purge 2 dead letters (reason rejected)?" in stdout, stderr
        assert "nothing purged" in stderr and len(_dlq(home)) == 2
        code, stdout, stderr = _purge_on_a_terminal(home, "y", "--older-than", "0")
        assert code == 0 and stdout.rstrip().endswith("purged 2"), (stdout, stderr)
        assert _dlq(home) == []
        bad = plexus_cli("dlq", "purge", "--home", str(home), "--reason", "bored", "--yes")
        assert bad.returncode == 2
