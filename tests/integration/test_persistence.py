"""Persistence with real processes: a broker with persistence on, the persistence service,
real LMDB files, real kill -9.

What must hold: a confirm means stored; history and replay answer from the store (with
permissions); a restarted broker rebuilds durable subscriptions, unacknowledged
deliveries and the DLQ from the store; sensitive payloads never reach a file in the
clear, and a damaged ciphertext is a storage error, never garbage; with persistence off,
history answers with a clear error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lmdb
import pytest

from clients.bus import StorageError
from clients.errors import PermissionDenied
from persistence.segments import decode_record, encode_record, list_segment_files
from tests.conftest import BrokerHandle, files_containing, wait_for

MANIFESTS = {
    "pub": '[permissions]\npublish = ["market.>", "orders.>", "jobs.>"]\n',
    "sub": '[permissions]\nsubscribe = ["market.>", "orders.>", "jobs.>"]\n',
    "nosy": '[permissions]\nsubscribe = ["market.>"]\n',
}
CANARY = "CANARY-7f3a9c-never-on-disk"


def start_stored(root: Path, **persistence_settings: Any) -> BrokerHandle:
    handle = BrokerHandle.prepared(root, MANIFESTS)
    handle.start(persistence=True)
    handle.start_persistence(**persistence_settings)
    return handle


@pytest.fixture
def stored(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = start_stored(short_tmp, sensitive_topics=("orders.secret.>",))
    yield handle
    handle.close()


def wait_stored(handle: BrokerHandle) -> None:
    """Until the store holds every event the broker has produced (acks included)."""
    cli = handle.connect("$cli", session="stored-check")

    def caught_up() -> bool:
        events = cli.broker_stats()["events"]
        return bool(events["stored_watermark"] == events["last_seq"])

    wait_for(caught_up, timeout=10)


def test_confirmed_publishes_are_in_history_and_replay(stored: BrokerHandle) -> None:
    pub = stored.connect("pub")
    started = time.time()
    for i in range(300):
        pub.publish("market.AAPL" if i % 3 else "market.MSFT", {"i": i})
    pub.flush(10)
    sub = stored.connect("sub")
    last = sub.history("market.AAPL", last=5)
    assert [m.data["i"] for m in last] == [293, 295, 296, 298, 299]
    assert all(m.sender == "pub" and m.topic == "market.AAPL" for m in last)
    everything = list(sub.replay("market.>", since=started))
    assert [m.data["i"] for m in everything] == list(range(300))
    # since is inclusive on the broker timestamp; until too
    middle = everything[150]
    tail = list(sub.replay("market.*", since=middle.timestamp))
    assert tail[0].timestamp >= middle.timestamp
    assert middle.id in {m.id for m in tail}
    window = list(sub.replay("market.MSFT", since=started, until=middle.timestamp))
    assert window and all(m.topic == "market.MSFT" for m in window)
    assert max(m.timestamp for m in window) <= middle.timestamp


def test_replay_pages_through_more_than_one_page(stored: BrokerHandle) -> None:
    pub = stored.connect("pub")
    started = time.time()
    for i in range(2500):
        pub.publish("jobs.bulk", i)
    pub.flush(20)
    replayed = [m.data for m in stored.connect("sub").replay("jobs.>", since=started)]
    assert replayed == list(range(2500))


def test_queries_are_authorised_by_subscribe_permissions(stored: BrokerHandle) -> None:
    pub = stored.connect("pub")
    pub.publish("orders.new", {"qty": 1}, confirm=True)
    nosy = stored.connect("nosy")
    with pytest.raises(PermissionDenied) as denied:
        nosy.history("orders.new", last=1)
    assert denied.value.code == 301
    with pytest.raises(PermissionDenied):
        list(nosy.replay(">", since=0))


def test_sensitive_payloads_are_never_on_disk_yet_readable(stored: BrokerHandle) -> None:
    pub = stored.connect("pub")
    pub.publish("orders.new", {"secret": CANARY}, sensitive=True, confirm=True)
    pub.publish("orders.secret.fill", {"secret": CANARY + "-topic"}, confirm=True)
    sub = stored.connect("sub")
    assert sub.history("orders.new", last=1)[0].data == {"secret": CANARY}
    assert sub.history("orders.secret.fill", last=1)[0].data == {"secret": CANARY + "-topic"}
    stored.close()  # everything flushed and closed: nothing left only in memory
    assert files_containing(stored.home, CANARY.encode()) == []
    assert files_containing(stored.home, b"orders.secret.fill")  # the record itself is there


def test_a_flipped_byte_in_a_ciphertext_is_a_storage_error(short_tmp: Path) -> None:
    handle = start_stored(short_tmp)
    try:
        pub = handle.connect("pub")
        pub.publish("orders.new", {"secret": CANARY}, sensitive=True, confirm=True)
        handle.close()
        handle.buses.clear()
        segment = list_segment_files(handle.paths.store_dir / "segments")[-1][1]
        env = lmdb.open(str(segment), subdir=False, max_dbs=4)
        msgs = env.open_db(b"msgs")
        with env.begin(write=True, db=msgs) as txn:
            key, raw = next(iter(txn.cursor()))
            record = decode_record(int.from_bytes(key, "big"), raw)
            assert record.sealed
            damaged = bytearray(record.payload)
            damaged[-5] ^= 0x01
            fields = [
                record.sender,
                record.topic,
                record.msg_id,
                record.header,
                bytes(damaged),
                True,
            ]
            txn.put(key, encode_record(record.ts_ns, fields))
        env.close()
        handle.start(persistence=True)
        handle.start_persistence()
        with pytest.raises(StorageError) as broken:
            handle.connect("sub").history("orders.new", last=1)
        assert broken.value.code == 502
        assert "integrity" in str(broken.value)
    finally:
        handle.close()


def test_persistence_off_answers_history_with_a_clear_error(broker: BrokerHandle) -> None:
    pub = broker.connect("pub")
    pub.publish("market.AAPL", 1, confirm=True)
    with pytest.raises(StorageError) as off:
        pub.history("market.AAPL", last=1)
    assert off.value.code == 501
    assert "--no-persistence" in str(off.value)


def test_a_killed_broker_rebuilds_durable_subscriptions_and_pending_deliveries(
    stored: BrokerHandle,
) -> None:
    durable = stored.connect("sub", session="durable")
    sub = durable.subscribe("jobs.>", durable=True, manual_ack=True)
    pub = stored.connect("pub")
    for i in range(20):
        pub.publish("jobs.work", i)
    pub.flush(10)
    first = [wait_for(lambda: sub.get(0.5)) for _ in range(5)]
    for message in first:
        message.ack()
    durable.close()  # sends the ACKs before BYE
    stored.buses.remove(durable)
    wait_stored(stored)
    stored.kill()
    stored.start(persistence=True)
    for i in range(20, 25):
        pub.publish("jobs.work", i)
    pub.flush(15)
    again = stored.connect("sub", session="durable")
    resumed = again.subscribe("jobs.>", durable=True)
    got: list[int] = []
    while len(got) < 20:
        message = resumed.get(5)
        assert message is not None, f"only {got}"
        got.append(message.data)
    assert got == list(range(5, 25))


def test_dead_letters_survive_a_broker_restart(stored: BrokerHandle) -> None:
    rejecting = stored.connect("sub", session="rejecting")
    rejecting.subscribe("orders.>", lambda m: m.reject("never"), manual_ack=True)
    pub = stored.connect("pub")
    pub.publish("orders.bad", {"n": 1}, sensitive=True, confirm=True)
    cli = stored.connect("$cli")
    wait_for(lambda: cli.dead_letters()["entries"])
    before = cli.dead_letters()["entries"]
    wait_stored(stored)
    stored.kill()
    stored.start(persistence=True)
    after = stored.connect("$cli", session="after").dead_letters()["entries"]
    assert [(e["id"], e["reason"], e["topic"]) for e in after] == [
        (e["id"], e["reason"], e["topic"]) for e in before
    ]


def test_retention_deletes_old_segments_and_frees_their_space(short_tmp: Path) -> None:
    handle = start_stored(short_tmp, max_age_s=1.0, segment_period_s=0.3)
    try:
        pub = handle.connect("pub")
        segments = handle.paths.store_dir / "segments"

        def rolled_to(count: int, round_: int) -> bool:  # a segment rolls on a write
            pub.publish("jobs.old", {"round": round_, "i": -1, "pad": ""}, confirm=True)
            return len(list_segment_files(segments)) >= count

        for round_ in range(4):
            wait_for(partial(rolled_to, round_ + 1, round_), timeout=5, interval=0.05)
            for i in range(200):
                pub.publish("jobs.old", {"round": round_, "i": i, "pad": "x" * 200})
            pub.flush(10)
        peak = sum(p.stat().st_size for _, p in list_segment_files(segments))
        assert len(list_segment_files(segments)) >= 3

        def expired() -> bool:  # only the newest, active segment may stay
            return len(list_segment_files(segments)) <= 1

        wait_for(expired, timeout=10)
        left = sum(p.stat().st_size for _, p in list_segment_files(segments))
        assert left < peak
        remaining = handle.connect("sub").history("jobs.old", last=1000)
        assert all(m.data["round"] == 3 for m in remaining)
    finally:
        handle.close()


def test_the_size_limit_is_kept_with_a_warning(short_tmp: Path) -> None:
    handle = start_stored(short_tmp, max_size_mb=1)
    try:
        alerts = handle.connect("$cli", session="alerts").subscribe("$sys.alerts.storage")
        pub = handle.connect("pub")
        for i in range(4000):
            pub.publish("jobs.big", {"i": i, "pad": "y" * 1000})
        pub.flush(30)
        notice = alerts.get(timeout=10)
        assert notice is not None and notice.data["limit"] == 2**20
        segments = handle.paths.store_dir / "segments"
        limit_with_active = 2**20 + 2 * 128 * 1024  # the active segment may be on top

        def within() -> bool:
            return (
                sum(p.stat().st_size for _, p in list_segment_files(segments)) <= limit_with_active
            )

        wait_for(within, timeout=10)
        newest = handle.connect("sub").history("jobs.big", last=1)
        assert newest[0].data["i"] == 3999  # the newest data is kept, the oldest went
    finally:
        handle.close()


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root; skipped elsewhere), grown later by the test."""
    import os
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = Path(tempfile.mkdtemp(prefix="pxdisk-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=False
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_and_loses_nothing(small_disk: Path) -> None:
    import subprocess

    handle = start_stored(small_disk)
    try:
        alerts = handle.connect("$cli", session="alerts").subscribe("$sys.alerts.storage")
        pub = handle.connect("pub")
        started = time.time()
        for i in range(5000):
            pub.publish("jobs.fill", {"i": i, "pad": "z" * 1000})
        notice = alerts.get(timeout=15)
        assert notice is not None and "cannot write" in notice.data["what"]
        assert "free disk space" in notice.data["hint"]
        assert handle.persistence is not None and handle.persistence.poll() is None
        assert pub.unconfirmed > 0  # not confirmed while not stored
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        pub.flush(30)  # the service retries each second: everything gets stored
        stored = [m.data["i"] for m in handle.connect("sub").replay("jobs.fill", since=started)]
        assert stored == list(range(5000))
    finally:
        handle.close()
