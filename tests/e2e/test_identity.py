"""Identity nobody can forge, proven by attacks through a real platform (`plexus run`).

Each test performs the attack with real processes and sockets: a launched app hunting
for credentials, a leaked credential used from another process, an impostor on the bus
path, an expired or revoked external credential, a second platform on the same home,
and `plexus env` output with shell syntax in the home path.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from clients.bus import Bus
from clients.errors import AuthenticationError, BusError
from security.credentials import ServerKeys
from tests.conftest import (
    PROCESS_START_S,
    REPO,
    external_token,
    plexus_cli,
    stop_process,
    wait_for,
    write_manifest,
)


@dataclass
class Platform:
    home: Path
    apps: Path
    out: Path
    log: Path
    process: subprocess.Popen[str]

    def log_events(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                lines.append(record)
        return lines

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.home / "run" / "platform.json").read_text())
        return data


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    with tempfile.TemporaryDirectory(prefix="px-id-", dir="/tmp") as name:
        root = Path(name)
        home, apps, out = root / "home", root / "apps", root / "out"
        apps.mkdir()
        out.mkdir()
        write_manifest(
            apps,
            "forger",
            'command = ["python", "-m", "tests.e2e.apps.forger"]\n'
            '[permissions]\npublish = ["forge.>"]\n[env]\n'
            f'FORGER_OUT = "{out / "forger.json"}"\nFORGER_GO = "{out / "go"}"\n'
            'FORGER_NEIGHBOUR = "outsider"\n',
        )
        write_manifest(apps, "outsider", '[permissions]\npublish = ["market.>"]\n')
        write_manifest(apps, "listener", '[permissions]\nsubscribe = ["market.>"]\n')
        log = root / "platform.log"
        sink = log.open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps)],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(
                lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S
            )
            yield Platform(home, apps, out, log, process)
        finally:
            stop_process(process, 15)
            sink.close()


def test_a_launched_app_finds_no_credential_it_can_use(platform: Platform) -> None:
    # an external app holds its credential in its environment, where the forger looks
    token = external_token(platform.home, "outsider")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, "PLEXUS_TOKEN": token},
    )
    try:
        (platform.out / "go").touch()
        report_path = platform.out / "forger.json"
        wait_for(report_path.exists, 90)
        report = json.loads(report_path.read_text())
    finally:
        stop_process(holder)
    attempts = report["attempts"]
    assert report["found"] >= 1  # it did find the external app's token in /proc
    assert attempts and all(not a["ok"] for a in attempts), attempts
    for a in attempts:  # a foreign or unknown key fails the handshake; its own key a claim
        assert a["code"] == (205 if a["token"] == "own" else 200), a
    escaped = report["escaped"]
    assert escaped is not None and not escaped["ok"], escaped  # orphaned, still inside
    assert escaped["ppid"] == platform.state()["pid"]  # re-parented to the supervisor

    def recorded() -> list[dict[str, Any]]:
        return [e for e in platform.log_events("auth-denied") if e.get("app") == "forger"]

    events = wait_for(lambda: len(recorded()) >= len(attempts) and recorded(), 20)
    codes = {e["code"] for e in events}
    assert {"foreign-process", "unknown-key", "identity-mismatch"} <= codes
    assert all(e["pid"] > 0 for e in events)
    stolen = [e for e in events if e["code"] == "foreign-process"]
    assert stolen and all(e["claimed"] == "outsider" for e in stolen)
    claims = {e["claimed"] for e in events if e["code"] == "identity-mismatch"}
    assert claims == {"$supervisor", "$cli", "outsider"}


def test_a_leaked_credential_is_refused_from_an_unrelated_process(platform: Platform) -> None:
    leaked = platform.out / "forger.token"
    wait_for(leaked.exists, 60)
    token = leaked.read_text()
    endpoint = platform.state()["endpoint"]
    with pytest.raises(AuthenticationError):
        Bus.connect(endpoint, "forger", token, timeout=5, session="stolen")

    def recorded() -> bool:  # the broker logs the refusal; its line may land a moment later
        return any(
            e["code"] == "foreign-process" and e["claimed"] == "forger" and e["pid"] == os.getpid()
            for e in platform.log_events("auth-denied")
        )

    wait_for(recorded, 20)


def test_the_operator_needs_no_set_up_and_an_unknown_key_is_the_operator(
    platform: Platform,
) -> None:
    status = plexus_cli("status", "--home", str(platform.home), "--json")
    assert status.returncode == 0, status.stderr
    listed = plexus_cli("credentials", "list", "--home", str(platform.home), "--json")
    assert listed.returncode == 0, listed.stderr
    kinds = {(g["app"], g["kind"]) for g in json.loads(listed.stdout)}
    assert ("forger", "app") in kinds and ("$supervisor", "service") in kinds
    assert all("key" not in g and "token" not in g for g in json.loads(listed.stdout))


def test_env_only_for_manifests_without_a_command(platform: Platform) -> None:
    refused = plexus_cli("env", "--home", str(platform.home), "forger")
    assert refused.returncode == 6 and "command" in refused.stderr
    unknown = plexus_cli("env", "--home", str(platform.home), "nobody")
    assert unknown.returncode == 5


def test_revoking_an_external_credential_closes_its_session_at_once(platform: Platform) -> None:
    token = external_token(platform.home, "listener")
    endpoint = platform.state()["endpoint"]
    bus = Bus.connect(endpoint, "listener", token, timeout=10, session="revoked")
    try:
        bus.subscribe("market.>")
        listed = json.loads(
            plexus_cli("credentials", "list", "--home", str(platform.home), "--json").stdout
        )
        mine = [g for g in listed if g["app"] == "listener" and g["kind"] == "external"]
        assert mine and all(g["expires_at"] > time.time() + 3600 for g in mine)
        revoked = plexus_cli("credentials", "revoke", "--home", str(platform.home), "listener")
        assert revoked.returncode == 0, revoked.stderr

        def refused() -> bool:
            try:
                bus.publish("market.x", 1, confirm=True, timeout=2)
            except BusError:
                return True
            return False

        wait_for(refused, 20)
    finally:
        bus.close(timeout=0.5)
    with pytest.raises(AuthenticationError):
        Bus.connect(endpoint, "listener", token, timeout=5, session="again")
    gone = plexus_cli("credentials", "revoke", "--home", str(platform.home), "listener")
    assert gone.returncode == 5


def test_an_impostor_on_the_bus_path_gets_no_credential(platform: Platform) -> None:
    """A process binds the bus path in the broker's place (libzmq lets a second bind take
    an ipc path): a PLAIN server with a ZAP handler, and a CURVE server with its own key.
    An app connecting there never completes a handshake, so the impostor learns nothing."""
    token = external_token(platform.home, "outsider")
    endpoint = platform.state()["endpoint"]
    for mechanism in ("plain", "curve"):
        context: zmq.Context[Any] = zmq.Context()
        zap = context.socket(zmq.REP)
        zap.bind("inproc://zeromq.zap.01")
        impostor = context.socket(zmq.ROUTER)
        impostor.linger = 0
        if mechanism == "plain":
            impostor.plain_server = True
        else:
            ServerKeys.generate().serve(impostor)
        impostor.zap_domain = b"plexus"
        path = endpoint.removeprefix("ipc://") + f".{mechanism}"
        impostor.bind(f"ipc://{path}")
        try:
            with pytest.raises(BusError):
                Bus.connect(f"ipc://{path}", "outsider", token, timeout=3, session="imp")
            assert not zap.poll(500), "the impostor's ZAP handler was asked"
            assert not impostor.poll(0)
        finally:
            impostor.close(0)
            zap.close(0)
            context.term()


def test_a_second_platform_on_the_same_home_is_refused(platform: Platform) -> None:
    second = plexus_cli("run", "--home", str(platform.home), "--apps", str(platform.apps))
    assert second.returncode != 0
    assert "already runs" in second.stderr


def test_env_output_is_shell_quoted_and_runs_nothing_when_evaled() -> None:
    with tempfile.TemporaryDirectory(prefix="px-q-", dir="/tmp") as name:
        root = Path(name)
        canary = root / "pwned"
        home = root / f"h$(touch {canary})'x"
        apps = root / "apps"
        apps.mkdir()
        write_manifest(apps, "ext", '[permissions]\npublish = ["q.>"]\n')
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S
            )
            printed = plexus_cli("env", "--home", str(home), "ext")
            assert printed.returncode == 0, printed.stderr
            shown = subprocess.run(
                ["sh", "-c", 'eval "$1"; printf %s "$PLEXUS_HOME"', "sh", printed.stdout],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
            assert not canary.exists()
            assert shown.stdout == str(home.resolve())
            assert shlex.split(printed.stdout.splitlines()[0].removeprefix("export "))
        finally:
            stop_process(process, 15)
