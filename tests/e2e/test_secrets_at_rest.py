"""Issue 12, threat 9: secrets at rest and in logs, through the real platform.

A receiver's NACK text and a publisher's correlation id of sensitive messages reach no
file under the home and no log line, and `plexus dlq list` redacts the error; a sealed
record moved to another message or claimed for another sender does not open; the KEK is
rotated under a running platform; retired keys are destroyed only when no record needs
them; the passphrase reaches the persistence service on a descriptor, never in any
service's environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from broker.dlq import SEALED_ERROR
from broker.paths import PlatformPaths
from clients.bus import Message
from persistence.segments import Segment, StoredMessage, decode_record, encode_record
from security.keyring import PASSPHRASE_ENV, PASSPHRASE_FD_VARIABLE
from tests.conftest import (
    PROCESS_START_S,
    REPO,
    files_containing,
    operator_on,
    plexus_cli,
    running_platform,
    stop_process,
    wait_for,
)

SECRET = "SECRET-nack-5e1f-never-stored"
CID = "CID-SECRET-77d0-never-stored"
TOPIC = "vault.card"


@contextmanager
def logged_platform(home: Path, apps: Path, log: Path) -> Iterator[None]:
    """`plexus run` like `running_platform`, its stderr (every service's log lines) to `log`."""
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        wait_for(lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S)
        yield
    finally:
        stop_process(process, 15)


def cli_json(*args: str) -> Any:
    done = plexus_cli(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(240)
def test_nack_texts_and_correlation_ids_of_sensitive_messages_reach_no_file_nor_log(
    short_tmp: Path,
) -> None:
    home, apps, log = short_tmp / "home", short_tmp / "apps", short_tmp / "platform.log"
    apps.mkdir()
    attempts: list[int] = []

    def flaky(message: Message) -> None:
        """Fails twice, the second time (a group of its own, after the retry's backoff)
        quoting the payload, then succeeds."""
        attempts.append(message.attempt)
        if len(attempts) == 1:
            message.nack()
        elif len(attempts) == 2:
            message.nack(f"could not parse {SECRET}")
        else:
            message.ack()

    with logged_platform(home, apps, log):
        with operator_on(home) as publisher, operator_on(home) as receiver:
            receiver.subscribe(
                f"{TOPIC}.bad", lambda m: m.reject(f"refused {SECRET}"), manual_ack=True
            )
            receiver.subscribe(f"{TOPIC}.flaky", flaky, manual_ack=True)
            receiver.subscribe("plain.bad", lambda m: m.reject("plain reason"), manual_ack=True)
            publisher.publish(f"{TOPIC}.bad", {"n": 1}, sensitive=True, correlation_id=CID)
            publisher.publish("plain.bad", {"n": 3})
            publisher.flush(20)
            wait_for(lambda: len(publisher.dead_letters()["entries"]) == 2, timeout=20)
            publisher.publish(f"{TOPIC}.flaky", {"n": 2}, sensitive=True, correlation_id=CID)
            publisher.flush(20)
            wait_for(lambda: len(attempts) >= 3, timeout=20)
            wait_for(
                lambda: plexus_cli("history", "--home", str(home), "plain.bad").returncode == 0
            )
            assert files_containing(home, SECRET.encode()) == []
        listed = plexus_cli("dlq", "list", "--home", str(home), "--json")
        history = cli_json("history", "--home", str(home), f"{TOPIC}.bad", "--json")
    assert listed.returncode == 0, listed.stderr
    errors = {entry["topic"]: entry["last_error"] for entry in json.loads(listed.stdout)}
    assert errors == {f"{TOPIC}.bad": SEALED_ERROR, "plain.bad": "plain reason"}
    assert SECRET not in listed.stdout
    assert history[0]["correlation_id"] == CID  # sealed with the payload, opened for the operator
    for needle in (SECRET, CID):
        assert files_containing(home, needle.encode()) == [], needle
    logged = log.read_text(encoding="utf-8", errors="replace")
    assert "dead-letter" in logged and "plain reason" in logged  # the log lines exist
    assert SECRET not in logged and CID not in logged
    with logged_platform(home, apps, log):  # restored from the store, still redacted
        again = cli_json("dlq", "list", "--home", str(home), "--json")
    assert {entry["topic"]: entry["last_error"] for entry in again} == errors
    assert files_containing(home, SECRET.encode()) == []
    assert SECRET not in log.read_text(encoding="utf-8", errors="replace")


def sealed_rows(home: Path) -> Iterator[tuple[Segment, int, StoredMessage]]:
    """Every sealed row of the (stopped) platform's segments, opened for writing."""
    for path in sorted(PlatformPaths.resolve(home).segments_dir.glob("seg-*.mdb")):
        segment = Segment(path, int(path.name[4:24]), False, 1 << 30)
        try:
            with segment.env.begin(db=segment.msgs) as txn:
                rows = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
            for key, raw in rows:
                stored = decode_record(int.from_bytes(key, "big"), raw)
                if stored.sealed:
                    yield segment, int.from_bytes(key, "big"), stored
        finally:
            segment.close()


def rewrite(home: Path, change: Callable[[list[StoredMessage]], list[StoredMessage]]) -> None:
    """Replace the sealed rows of the stopped platform with `change(rows)` (same seqs)."""
    found = list(sealed_rows(home))
    changed = change([stored for _, _, stored in found])
    for path in sorted(PlatformPaths.resolve(home).segments_dir.glob("seg-*.mdb")):
        segment = Segment(path, int(path.name[4:24]), False, 1 << 30)
        try:
            with segment.env.begin(write=True, db=segment.msgs) as txn:
                for stored in changed:
                    key = stored.seq.to_bytes(8, "big")
                    if txn.get(key) is not None:
                        fields = [
                            stored.sender,
                            stored.topic,
                            stored.msg_id,
                            stored.header,
                            stored.payload,
                            stored.sealed,
                        ]
                        txn.put(key, encode_record(stored.ts_ns, fields))
        finally:
            segment.close()


def history_of(home: Path) -> subprocess.CompletedProcess[str]:
    return plexus_cli("history", "--home", str(home), TOPIC, "--json")


@pytest.mark.timeout(240)
def test_a_sealed_record_moved_to_another_message_or_sender_does_not_open(
    short_tmp: Path,
) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    with running_platform(home, apps):
        with operator_on(home) as bus:
            bus.publish(TOPIC, {"pin": "1111"}, sensitive=True, confirm=True)
            bus.publish(TOPIC, {"pin": "2222"}, sensitive=True, confirm=True)
        assert [m["data"]["pin"] for m in json.loads(history_of(home).stdout)] == ["1111", "2222"]
    original = [stored for _, _, stored in sealed_rows(home)]
    assert len(original) == 2 and all(stored.header == b"" for stored in original)

    def swapped(rows: list[StoredMessage]) -> list[StoredMessage]:
        first, second = rows
        return [
            StoredMessage(**{**_fields(first), "payload": second.payload}),
            StoredMessage(**{**_fields(second), "payload": first.payload}),
        ]

    def other_sender(rows: list[StoredMessage]) -> list[StoredMessage]:
        return [StoredMessage(**{**_fields(row), "sender": "intruder"}) for row in rows]

    for attack in (swapped, other_sender):
        rewrite(home, attack)
        with running_platform(home, apps):
            refused = history_of(home)
        assert refused.returncode == 8, (attack.__name__, refused.stdout, refused.stderr)
        assert "502" in refused.stderr or "integrity" in refused.stderr, refused.stderr
        rewrite(home, lambda _rows: original)
    with running_platform(home, apps):
        restored = history_of(home)
    assert [m["data"]["pin"] for m in json.loads(restored.stdout)] == ["1111", "2222"]


def _fields(stored: StoredMessage) -> dict[str, Any]:
    return {name: getattr(stored, name) for name in StoredMessage.__slots__}


def environ_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_the_passphrase_reaches_the_service_on_a_descriptor_and_the_kek_rotates_live(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    passphrase = "PASSPHRASE-e2e-0c4d-never-in-environ"
    monkeypatch.setenv(PASSPHRASE_ENV, passphrase)  # the operator's shell running `plexus run`
    keys_dir = PlatformPaths.resolve(home).keys_dir
    with running_platform(home, apps):
        status = cli_json("status", "--home", str(home), "--json")
        store_pid, broker_pid = status["store"]["pid"], status["broker"]["pid"]
        service_env = environ_of(store_pid)
        assert f"{PASSPHRASE_FD_VARIABLE}=".encode() in service_env
        for pid in (store_pid, broker_pid):
            env = environ_of(pid)
            assert passphrase.encode() not in env
            assert f"{PASSPHRASE_ENV}=".encode() not in env.replace(b"_FD=", b"")
        with operator_on(home) as bus:
            bus.publish(TOPIC, {"n": "before"}, sensitive=True, confirm=True)
            salt = (keys_dir / "kek.salt").read_bytes()
            rotated = cli_json("keys", "rotate", "--kek", "--home", str(home), "--json")
            assert rotated["kek"] == {"kind": "scrypt", "generation": 2, "n": 2**17, "r": 8, "p": 1}
            assert rotated["rewrapped"] == [1]
            assert (keys_dir / "kek.salt").read_bytes() != salt
            bus.publish(TOPIC, {"n": "after"}, sensitive=True, confirm=True)
        live = cli_json("history", "--home", str(home), TOPIC, "--json")
    assert [m["data"]["n"] for m in live] == ["before", "after"]
    ring = msgpack.unpackb((keys_dir / "ring").read_bytes(), raw=False)
    assert ring["kek"]["n"] == 2**17 and not (keys_dir / "kek").exists()
    with running_platform(home, apps):  # the restarted service derives the new KEK
        again = cli_json("history", "--home", str(home), TOPIC, "--json")
    assert again == live
    assert files_containing(home, passphrase.encode()) == []


@pytest.mark.timeout(240)
def test_a_retired_key_is_destroyed_only_when_no_stored_record_needs_it(
    short_tmp: Path,
) -> None:
    home, apps = short_tmp / "home", short_tmp / "apps"
    apps.mkdir()
    with running_platform(home, apps), operator_on(home) as bus:
        bus.publish(TOPIC, {"n": 1}, sensitive=True, confirm=True)  # sealed with key 1
    assert cli_json("keys", "rotate", "--home", str(home), "--json") == {"active_key": 2}
    refused = plexus_cli("keys", "destroy", "1", "--home", str(home), "--json")
    assert refused.returncode == 6
    assert "still seals stored records" in refused.stderr
    assert "(1 stored records name it)" in refused.stderr
    active = plexus_cli("keys", "destroy", "2", "--home", str(home))
    assert active.returncode == 6 and "active key" in active.stderr
    assert cli_json("keys", "rotate", "--home", str(home), "--json") == {"active_key": 3}
    pruned: dict[str, Any] = {}

    def prune() -> bool:  # key 2 sealed nothing; it goes once its retirement grace is over
        pruned.update(cli_json("keys", "prune", "--home", str(home), "--json"))
        return bool(pruned["destroyed"] == [2])

    wait_for(prune, timeout=30, interval=0.5)
    assert pruned["kept"] == [
        {"id": 1, "active": False, "records": 1},
        {"id": 3, "active": True, "records": 0},
    ]
    assert [k["id"] for k in cli_json("keys", "list", "--home", str(home), "--json")] == [1, 3]
    with running_platform(home, apps):
        kept = cli_json("history", "--home", str(home), TOPIC, "--json")
    assert [m["data"]["n"] for m in kept] == [1]
