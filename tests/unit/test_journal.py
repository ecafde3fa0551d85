"""The persistence journal on a real file: records back after a crash, torn and stale ones
never read as news, a clean close leaves nothing to replay; and the service applying what
a crash left in it before it serves (time injected, no sockets)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import persistence.journal as journal_module
from broker import event_records as R
from broker.codec import encode_pub_header
from broker.paths import PlatformPaths
from persistence.journal import HEAD_BYTES, Journal, JournalRecord, encode_record, scan
from persistence.service import PersistenceConfig, PersistenceService
from security.credentials import ServerKeys

CAPACITY = 64 * 1024
TS = 1_700_000_000_000_000_000


def _open(path: Path, capacity: int = CAPACITY) -> Journal:
    journal = Journal(path, capacity)
    journal.records()
    return journal


def test_records_come_back_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = _open(path)
    journal.append(1, 3, b"one")
    journal.append(5, 5, b"two")  # seqs may skip (a consumer resumed past a gap)
    journal.close(clean=False)  # a crash: nothing applied
    again = _open(path)
    assert again.records() == [JournalRecord(1, 3, b"one"), JournalRecord(5, 5, b"two")]
    assert again.last == 5
    assert again.offset == 2 * HEAD_BYTES + len(b"one") + len(b"two")
    again.close(clean=False)


def test_the_file_is_preallocated_and_zeroed_once(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    _open(path).close(clean=True)
    assert path.stat().st_size == CAPACITY
    assert path.read_bytes() == bytes(CAPACITY)
    journal = _open(path, capacity=CAPACITY // 2)  # a smaller setting keeps the file
    assert journal.capacity == CAPACITY
    journal.close(clean=True)


def test_a_torn_last_record_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = _open(path)
    journal.append(1, 1, b"whole")
    journal.append(2, 2, b"torn by the crash")
    journal.close(clean=False)
    data = bytearray(path.read_bytes())
    data[HEAD_BYTES + len(b"whole") + HEAD_BYTES + 3] ^= 0xFF  # a byte of the payload
    path.write_bytes(bytes(data))
    again = _open(path)
    assert again.records() == [JournalRecord(1, 1, b"whole")]
    assert again.offset == HEAD_BYTES + len(b"whole")  # the next record overwrites it
    again.close(clean=False)


def test_stale_records_after_a_rewind_are_not_news(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = _open(path)
    journal.append(1, 2, b"aaaa")
    journal.append(3, 4, b"bbbb")  # both applied to LMDB, then the rewind
    journal.rewind()
    journal.append(5, 6, b"cccc")  # the same size: record (3, 4) follows it whole
    journal.close(clean=False)
    records, _ = scan(path.read_bytes())
    assert records == [JournalRecord(5, 6, b"cccc")]  # 3 is not above 6: the run ends


def test_a_rewind_without_new_records_replays_only_what_lmdb_has(tmp_path: Path) -> None:
    # the old run is still at offset 0: its seqs are at or below the store's watermark,
    # and the service skips those (test_service_applies_what_a_crash_left_in_the_journal)
    path = tmp_path / "journal"
    journal = _open(path)
    journal.append(1, 2, b"applied")
    journal.rewind()
    journal.close(clean=False)
    assert [r.last for r in _open(path).records()] == [2]


def test_a_clean_close_leaves_nothing_to_replay(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = _open(path)
    journal.append(1, 1, b"x")
    journal.close(clean=True)
    assert _open(path).records() == []


def test_what_does_not_fit_or_goes_backwards_is_refused(tmp_path: Path) -> None:
    journal = _open(tmp_path / "journal", capacity=HEAD_BYTES + 10)
    assert journal.fits(10) and not journal.fits(11)
    with pytest.raises(ValueError, match="does not fit"):
        journal.append(1, 1, bytes(11))
    journal.append(1, 1, bytes(10))
    journal.rewind()
    with pytest.raises(ValueError, match="must grow"):
        journal.append(1, 1, b"")
    journal.close(clean=False)


def test_a_nearly_full_disk_gets_no_journal_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_free_bytes", lambda _: CAPACITY)
    with pytest.raises(OSError, match="the journal wants"):
        Journal(tmp_path / "journal", CAPACITY)
    assert not (tmp_path / "journal").exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.lists(st.binary(max_size=40), max_size=5))
def test_scan_reads_any_bytes_and_only_whole_growing_records(
    junk: bytes, payloads: list[bytes]
) -> None:
    records = b"".join(
        encode_record(2 * n + 1, 2 * n + 2, payload) for n, payload in enumerate(payloads)
    )
    found, end = scan(records + junk)
    assert found[: len(payloads)] == [
        JournalRecord(2 * n + 1, 2 * n + 2, p) for n, p in enumerate(payloads)
    ]
    assert all(a.last < b.first for a, b in itertools.pairwise(found))
    assert len(records) <= end <= len(records) + len(junk)
    found, end = scan(junk)  # never raises on garbage
    assert end <= len(junk)


# -- the service --------------------------------------------------------------------------


def _published(seq: int) -> R.Event:
    msg_id = seq.to_bytes(16, "big")
    header = encode_pub_header(msg_id, "t.a")
    record = R.Published("pub", "p", "t.a", msg_id, "", "", False, header, b"m%d" % seq, [])
    return R.Event(seq, TS + seq, record)


def _journal_events(path: Path, events: list[R.Event]) -> None:
    journal = _open(path, PersistenceConfig(PlatformPaths(path.parent)).journal.capacity)
    payload = b"".join(R.encode_event(e.seq, e.ts_ns, e.record) for e in events)
    journal.append(events[0].seq, events[-1].seq, payload)
    journal.close(clean=False)


def test_service_applies_what_a_crash_left_in_the_journal(tmp_path: Path) -> None:
    paths = PlatformPaths(tmp_path)
    paths.prepare()
    paths.store_dir.mkdir(parents=True, exist_ok=True)
    _journal_events(paths.store_dir / journal_module.JOURNAL_FILE, [_published(1), _published(2)])
    service = PersistenceService(
        PersistenceConfig(paths), "token", ServerKeys.generate(), monotonic=lambda: 0
    )
    try:
        assert service.writer.stored == 2  # in LMDB before anything is served
        assert service.watermark == service.writer.watermark == 2
        assert service.journal is not None and service.journal.offset == 0  # rewound
    finally:
        service.close()
    # the clean close emptied the journal; the store keeps its watermark
    again = PersistenceService(
        PersistenceConfig(paths), "token", ServerKeys.generate(), monotonic=lambda: 0
    )
    try:
        assert again.writer.stored == 0 and again.watermark == 2
    finally:
        again.close()
