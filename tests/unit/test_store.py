"""The message store on real LMDB files: segments, rolling, reading across segments, a
read-only reader in another process, the writer that applies events to the store and
the durable state, and the restore pages read back from both for a recovering broker."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import persistence.store as store_module
from broker import event_records as R
from broker.codec import encode_sids
from broker.protocol import MAX_FRAME_BYTES
from broker.topics import pattern_matches
from broker.wire import EvRestore
from persistence.restore import RestoreReader
from persistence.segments import (
    Segment,
    StoredMessage,
    encode_record,
    list_segment_files,
    segment_map_size,
    segment_name,
    seq_key,
    topic_key,
)
from persistence.state import StateStore
from persistence.store import MessageStore, Row, SegmentPolicy
from persistence.writer import StoreWriter
from security.keyring import KIND_DEAD_LETTER, KIND_MESSAGE, RecordContext, TamperedRecord

REPO = Path(__file__).resolve().parents[2]
TINY = SegmentPolicy(max_bytes=1)
"""Every append rolls to a new segment (any LMDB file is over 1 byte)."""

LMDB_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class FakeClock:
    def __init__(self, now: int = 1_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def row(seq: int, ts: int, topic: str = "t.a", payload: bytes | None = None) -> Row:
    body = payload if payload is not None else f"payload-{seq}".encode()
    return (seq, ts, f"app{seq % 3}", topic, b"id-%d" % seq, b"hdr-%d" % seq, body, seq % 2 == 0)


def assert_is_row(message: StoredMessage | None, expected: Row) -> None:
    assert message is not None
    assert (
        message.seq,
        message.ts_ns,
        message.sender,
        message.topic,
        message.msg_id,
        message.header,
        message.payload,
        message.sealed,
    ) == expected


@pytest.fixture
def writer_store(tmp_path: Path) -> Iterator[MessageStore]:
    store = MessageStore(tmp_path / "segs", readonly=False, policy=TINY)
    yield store
    store.close()


# -- one segment --------------------------------------------------------------------------


def test_append_get_round_trip_in_one_segment(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "segs", readonly=False)
    rows = [row(1, 10), row(2, 20, "t.b"), row(5, 20), row(9, 31, payload=b"")]
    store.append(rows[:2])
    store.append(rows[2:])
    store.append([])  # nothing to do
    for expected in rows:
        assert_is_row(store.get(expected[0]), expected)
    for missing in (0, 3, 4, 6, 10, 2**40):
        assert store.get(missing) is None
    assert store.last_seq() == 9
    (info,) = store.segments()
    assert (info.first_seq, info.last_seq, info.first_ts_ns, info.last_ts_ns) == (1, 9, 10, 31)
    assert info.path == tmp_path / "segs" / segment_name(1)
    assert info.size_bytes == info.path.stat().st_size > 0
    assert store.total_bytes() == info.size_bytes
    assert store.active_first_seq == 1
    assert store.describe() == {
        "segments": 1,
        "bytes": info.size_bytes,
        "first_seq": 1,
        "last_seq": 9,
    }
    store.close()


def test_empty_and_missing_store(tmp_path: Path) -> None:
    reader = MessageStore(tmp_path / "nothing-here")
    assert reader.segments() == []
    assert reader.last_seq() == 0
    assert reader.get(1) is None
    assert list(reader.scan(0)) == []
    assert reader.recent(5) == []
    assert reader.history("t", 5) == []
    assert reader.total_bytes() == 0
    assert reader.active_first_seq is None
    writer = MessageStore(tmp_path / "fresh", readonly=False)
    assert writer.segments() == []
    assert writer.describe()["segments"] == 0
    writer.close()


def write_segment(path: Path, rows: Sequence[tuple[int, int, str]]) -> Segment:
    """A segment holding (seq, ts, topic) rows, written through its own LMDB handles."""
    segment = Segment(path, rows[0][0] if rows else 1, False, segment_map_size(1 << 20))
    with segment.env.begin(write=True) as txn:
        for seq, ts, topic in rows:
            record = encode_record(ts, ["s", topic, b"id", b"h", b"p", False])
            txn.put(seq_key(seq), record, db=segment.msgs)
            txn.put(topic_key(topic, seq), b"", db=segment.topics)
    return segment


@st.composite
def holey_rows(draw: st.DrawFn, topics: Sequence[str] = ("t",)) -> list[tuple[int, int, str]]:
    """Ascending seqs with holes, non-decreasing timestamps (often equal)."""
    steps = draw(
        st.lists(
            st.tuples(st.integers(1, 6), st.integers(0, 3), st.sampled_from(topics)),
            min_size=1,
            max_size=40,
        )
    )
    seq = draw(st.integers(1, 1_000))
    ts = draw(st.integers(0, 100))
    rows: list[tuple[int, int, str]] = []
    for gap, dts, topic in steps:
        rows.append((seq, ts, topic))
        seq += gap
        ts += dts
    return rows


@LMDB_SETTINGS
@given(rows=holey_rows())
def test_first_seq_at_agrees_with_brute_force(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, int, str]]
) -> None:
    segment = write_segment(tmp_path_factory.mktemp("seg") / "seg.mdb", rows)
    try:
        seqs = [seq for seq, _, _ in rows]
        stamps = sorted({ts for _, ts, _ in rows})
        probes = {0, stamps[0] - 1, stamps[-1] + 1, *stamps, *(t + 1 for t in stamps)}
        for probe in sorted(probes):
            target = next((seq for seq, ts, _ in rows if ts >= probe), None)
            position = segment.first_seq_at(probe)
            if target is None:
                assert position is None, probe
                continue
            assert position is not None, probe
            # the next message at or after `position` is exactly the target
            assert position <= target
            assert not [seq for seq in seqs if position <= seq < target], (probe, position)
    finally:
        segment.close()


@LMDB_SETTINGS
@given(rows=holey_rows(topics=("a", "a.b", "ab", "a-", "b")), count=st.integers(0, 8))
def test_last_of_topic_agrees_with_brute_force(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, int, str]], count: int
) -> None:
    segment = write_segment(tmp_path_factory.mktemp("seg") / "seg.mdb", rows)
    try:
        for topic in ("a", "a.b", "ab", "a-", "b", "c", "a.b.c"):
            expected = [seq for seq, _, t in reversed(rows) if t == topic][:count]
            assert segment.last_of_topic(topic, count) == expected, topic
    finally:
        segment.close()


def test_empty_segment_has_no_bounds_and_no_position(tmp_path: Path) -> None:
    segment = write_segment(tmp_path / "seg.mdb", [])
    try:
        assert segment.bounds() is None
        assert segment.first_seq_at(0) is None
        assert list(segment.scan(0)) == []
        assert segment.last_of_topic("t", 3) == []
    finally:
        segment.close()


def test_segment_scan_pages_past_its_read_batch(tmp_path: Path) -> None:
    rows = [(seq, seq // 3, "t") for seq in range(1, 3000, 2)]  # 1500 messages, odd seqs
    segment = write_segment(tmp_path / "seg.mdb", rows)
    try:
        assert [m.seq for m in segment.scan(0)] == [seq for seq, _, _ in rows]
        assert [m.seq for m in segment.scan(1026)] == list(range(1027, 3000, 2))
        assert list(segment.scan(3000)) == []
    finally:
        segment.close()


# -- rolling ------------------------------------------------------------------------------


def test_tiny_max_bytes_rolls_on_every_append(writer_store: MessageStore) -> None:
    store = writer_store
    batches = [[row(1, 1), row(2, 1)], [row(4, 2)], [row(5, 3), row(8, 3), row(9, 4)], [row(12, 9)]]
    for batch in batches:
        store.append(batch)
        assert store.active_first_seq == batch[0][0]
    infos = store.segments()
    assert [(i.first_seq, i.last_seq) for i in infos] == [(1, 2), (4, 4), (5, 9), (12, 12)]
    assert [(i.first_ts_ns, i.last_ts_ns) for i in infos] == [(1, 1), (2, 2), (3, 4), (9, 9)]
    assert [first for first, _ in list_segment_files(store.directory)] == [1, 4, 5, 12]
    for batch in batches:
        for expected in batch:
            assert_is_row(store.get(expected[0]), expected)
    for hole in (3, 6, 7, 10, 11, 13):
        assert store.get(hole) is None
    assert store.last_seq() == 12
    assert store.total_bytes() == sum(i.size_bytes for i in infos)


def test_period_rolls_with_an_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock(1_000)
    policy = SegmentPolicy(max_bytes=1 << 30, period_ns=1_000)
    store = MessageStore(tmp_path / "segs", readonly=False, policy=policy, clock=clock)
    for now, seq in [(1_000, 1), (1_999, 2), (2_000, 3), (2_999, 4), (10_000, 5)]:
        clock.now = now
        store.append([row(seq, now)])
    assert [(i.first_seq, i.last_seq) for i in store.segments()] == [(1, 2), (3, 4), (5, 5)]
    store.close()

    # A restarted writer dates the active segment by its first message.
    clock.now = 10_999
    store = MessageStore(tmp_path / "segs", readonly=False, policy=policy, clock=clock)
    assert store.active_first_seq == 5
    store.append([row(6, clock.now)])
    clock.now = 11_000
    store.append([row(7, clock.now)])
    assert [(i.first_seq, i.last_seq) for i in store.segments()] == [
        (1, 2),
        (3, 4),
        (5, 6),
        (7, 7),
    ]
    store.close()


def test_map_full_rolls_to_a_new_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "segment_map_size", lambda _max_bytes: 256 * 1024)
    store = MessageStore(tmp_path / "segs", readonly=False)  # size limit never reached
    big = b"x" * 5_000
    firsts_of_batches: list[int] = []
    seq = 1
    while len(store.segments()) < 3:
        firsts_of_batches.append(seq)
        store.append([row(seq + i, seq + i, payload=big) for i in range(3)])
        seq += 3
    infos = store.segments()
    assert infos[0].first_seq == 1
    for info in infos[1:]:
        assert info.first_seq in firsts_of_batches  # a batch is never split
    for before, after in itertools.pairwise(infos):
        assert after.first_seq == before.last_seq + 1
    assert [m.seq for m in store.scan(0)] == list(range(1, seq))
    assert all(store.get(s) is not None for s in range(1, seq))
    store.close()


def test_batch_bigger_than_a_segment_map_is_still_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "segment_map_size", lambda _max_bytes: 256 * 1024)
    store = MessageStore(tmp_path / "segs", readonly=False)
    rows = [row(seq, seq, payload=b"x" * 5_000) for seq in range(1, 101)]  # ~500 KB
    try:
        store.append(rows)
        assert [m.seq for m in store.scan(0)] == list(range(1, 101))
    finally:
        store.close()


def test_many_segments_beyond_the_open_reader_cache(writer_store: MessageStore) -> None:
    store = writer_store
    for seq in range(1, 41):
        store.append([row(seq, seq, f"t.{seq % 4}")])
    assert len(store.segments()) == 40  # opens every one: the cache evicts the oldest
    store.append([row(41, 41)])  # the active segment stayed usable
    assert [m.seq for m in store.scan(0)] == list(range(1, 42))
    assert [m.seq for m in store.history("t.1", 3)] == [29, 33, 37]
    assert all(store.get(seq) is not None for seq in range(1, 42))


# -- reading ------------------------------------------------------------------------------


def test_history_is_oldest_first_across_segments(writer_store: MessageStore) -> None:
    store = writer_store
    topics = ["a", "a.b", "ab", "a", "b", "a", "a.b", "a"]
    for index, topic in enumerate(topics):
        seq = 10 + 2 * index
        store.append([row(seq, seq, topic), row(seq + 1, seq, "noise")])
    a_seqs = [10 + 2 * i for i, t in enumerate(topics) if t == "a"]
    assert [m.seq for m in store.history("a", 3)] == a_seqs[-3:]
    assert [m.seq for m in store.history("a", 100)] == a_seqs
    assert [m.topic for m in store.history("a", 100)] == ["a"] * len(a_seqs)
    assert [m.seq for m in store.history("a.b", 1)] == [22]
    assert [m.seq for m in store.history("ab", 5)] == [14]
    assert store.history("a", 0) == []
    assert store.history("zzz", 5) == []
    assert len(store.segments()) == len(topics)


def test_recent_is_newest_first_across_segments(writer_store: MessageStore) -> None:
    store = writer_store
    for first in (1, 4, 7):
        store.append([row(first, first), row(first + 1, first + 1)])
    assert [m.seq for m in store.recent(3)] == [8, 7, 5]
    assert [m.seq for m in store.recent(100)] == [8, 7, 5, 4, 2, 1]
    assert store.recent(0) == []
    assert_is_row(store.recent(1)[0], row(8, 8))


def test_scan_since_is_inclusive_and_after_seq_is_a_cursor(writer_store: MessageStore) -> None:
    store = writer_store
    # (seq, ts): equal timestamps straddle segment boundaries
    store.append([row(1, 100), row(2, 200), row(4, 200)])
    store.append([row(5, 200), row(7, 300)])
    store.append([row(8, 300), row(9, 400), row(12, 500)])
    assert [m.seq for m in store.scan(0)] == [1, 2, 4, 5, 7, 8, 9, 12]
    assert [m.seq for m in store.scan(200)] == [2, 4, 5, 7, 8, 9, 12]
    assert [m.seq for m in store.scan(201)] == [7, 8, 9, 12]
    assert [m.seq for m in store.scan(300)] == [7, 8, 9, 12]
    assert [m.seq for m in store.scan(500)] == [12]
    assert list(store.scan(501)) == []
    assert [m.seq for m in store.scan(200, after_seq=4)] == [5, 7, 8, 9, 12]
    assert [m.seq for m in store.scan(200, after_seq=3)] == [4, 5, 7, 8, 9, 12]
    assert [m.seq for m in store.scan(0, after_seq=7)] == [8, 9, 12]
    assert list(store.scan(0, after_seq=12)) == []
    # paging with the cursor visits everything exactly once
    seen: list[int] = []
    cursor = 0
    while page := list(store.scan(150, after_seq=cursor))[:2]:
        seen += [m.seq for m in page]
        cursor = page[-1].seq
    assert seen == [2, 4, 5, 7, 8, 9, 12]


def test_scan_with_a_wildcard_match(writer_store: MessageStore) -> None:
    store = writer_store
    topics = ["market.AAPL.prices", "market.MSFT.prices", "market.AAPL", "orders.new", "$sys.x"]
    for seq, topic in enumerate(topics, start=1):
        store.append([row(seq, seq * 10, topic)])

    def scan(pattern: str, since: int = 0) -> list[str]:
        return [m.topic for m in store.scan(since, match=lambda t: pattern_matches(pattern, t))]

    assert scan("market.*.prices") == ["market.AAPL.prices", "market.MSFT.prices"]
    assert scan("market.>") == topics[:3]
    assert scan("market.>", since=20) == topics[1:3]
    assert scan(">") == topics[:4]  # wildcards never match $sys
    assert scan("$sys.x") == ["$sys.x"]
    assert scan("nothing.*") == []


@st.composite
def store_contents(draw: st.DrawFn) -> tuple[list[list[Row]], bool]:
    topics = ("a", "a.b", "a.b.c", "ab", "b.x", "$sys.t")
    rows = [row(seq, ts, topic) for seq, ts, topic in draw(holey_rows(topics=topics))]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(rows) - 1)), max_size=5)))
    batches = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    return [b for b in batches if b], draw(st.booleans())


@LMDB_SETTINGS
@given(
    contents=store_contents(),
    pattern=st.sampled_from([None, "a", "a.>", "a.*", "*.x", ">", "ab", "$sys.>"]),
    data=st.data(),
)
def test_store_reads_agree_with_a_reference_model(
    tmp_path_factory: pytest.TempPathFactory,
    contents: tuple[list[list[Row]], bool],
    pattern: str | None,
    data: st.DataObject,
) -> None:
    batches, roll_every_append = contents
    policy = TINY if roll_every_append else SegmentPolicy()
    store = MessageStore(tmp_path_factory.mktemp("store"), readonly=False, policy=policy)
    try:
        for batch in batches:
            store.append(batch)
        rows = [r for batch in batches for r in batch]
        by_seq = {r[0]: r for r in rows}
        stamps = [r[1] for r in rows]
        since = data.draw(st.integers(min(stamps) - 1, max(stamps) + 1), label="since")
        after = data.draw(st.integers(0, rows[-1][0] + 1), label="after_seq")
        match: Callable[[str], bool] | None = None
        if pattern is not None:
            match = lambda topic: pattern_matches(pattern, topic)  # noqa: E731
        expected = [
            r[0] for r in rows if r[1] >= since and r[0] > after and (match is None or match(r[3]))
        ]
        assert [m.seq for m in store.scan(since, after, match)] == expected
        for seq in range(rows[0][0] - 1, rows[-1][0] + 2):
            found = store.get(seq)
            if seq in by_seq:
                assert_is_row(found, by_seq[seq])
            else:
                assert found is None
        count = data.draw(st.integers(0, len(rows) + 1), label="count")
        assert [m.seq for m in store.recent(count)] == [r[0] for r in reversed(rows)][:count]
        for topic in ("a", "a.b", "ab"):
            of_topic = [r[0] for r in rows if r[3] == topic]
            tail = of_topic[-count:] if count else []
            assert [m.seq for m in store.history(topic, count)] == tail
        assert store.last_seq() == rows[-1][0]
    finally:
        store.close()


# -- deleting and other readers -------------------------------------------------------------


def test_delete_frees_a_closed_segment_never_the_active_one(writer_store: MessageStore) -> None:
    store = writer_store
    for first in (1, 3, 5):
        store.append([row(first, first), row(first + 1, first + 1)])
    directory = store.directory
    victim = directory / segment_name(3)
    lock = victim.with_name(victim.name + "-lock")
    assert victim.exists()
    expected_freed = victim.stat().st_size + (lock.stat().st_size if lock.exists() else 0)
    before = store.total_bytes()
    size = victim.stat().st_size
    assert store.delete(3) == expected_freed > 0
    assert not victim.exists()
    assert not lock.exists()
    assert store.total_bytes() == before - size
    assert [i.first_seq for i in store.segments()] == [1, 5]
    assert store.get(3) is None
    assert store.get(4) is None
    assert [m.seq for m in store.scan(0)] == [1, 2, 5, 6]
    # the active segment stays, and so does everything in it
    assert store.delete(5) == 0
    assert (directory / segment_name(5)).exists()
    assert_is_row(store.get(6), row(6, 6))
    assert store.delete(3) == 0  # already gone
    store.append([row(7, 7)])
    assert [m.seq for m in store.scan(0)] == [1, 2, 5, 6, 7]


READER = """
import json, sys
from pathlib import Path
from persistence.store import MessageStore

store = MessageStore(Path(sys.argv[1]))
for line in sys.stdin:
    command, *args = line.split()
    if command == "segments":
        out = [info.first_seq for info in store.segments()]
    elif command == "refresh":
        store.refresh()
        out = "ok"
    elif command == "get":
        found = store.get(int(args[0]))
        out = None if found is None else [found.seq, found.topic, found.payload.decode()]
    elif command == "scan":
        out = [m.seq for m in store.scan(int(args[0]))]
    elif command == "history":
        out = [m.seq for m in store.history(args[0], int(args[1]))]
    elif command == "recent":
        out = [m.seq for m in store.recent(int(args[0]))]
    else:
        out = "?"
    print(json.dumps(out), flush=True)
"""


class Reader:
    """A read-only MessageStore in another process (LMDB allows one env per process)."""

    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", READER, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the reader died answering {command!r}"
        return json.loads(line)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def test_a_readonly_store_in_another_process_follows_the_writer(
    writer_store: MessageStore,
) -> None:
    store = writer_store
    for seq in (1, 2, 3):
        store.append([row(seq, seq, "t.a")])
    reader = Reader(store.directory)
    try:
        assert reader.ask("segments") == [1, 2, 3]
        assert reader.ask("get 2") == [2, "t.a", "payload-2"]
        store.append([row(4, 4, "t.b")])
        assert reader.ask("segments") == [1, 2, 3]  # the listing is cached ...
        assert reader.ask("refresh") == "ok"
        assert reader.ask("segments") == [1, 2, 3, 4]  # ... until refresh
        store.append([row(5, 5, "t.a")])
        assert reader.ask("get 5") == [5, "t.a", "payload-5"]  # a miss re-lists by itself
        store.append([row(6, 6, "t.a")])
        assert reader.ask("scan 0") == [1, 2, 3, 4, 5, 6]  # scan and history re-list too
        store.append([row(7, 7, "t.a")])
        assert reader.ask("history t.a 3") == [5, 6, 7]
        assert reader.ask("recent 2") == [7, 6]
        store.delete(1)
        assert reader.ask("refresh") == "ok"
        assert reader.ask("segments") == [2, 3, 4, 5, 6, 7]
        assert reader.ask("get 1") is None
    finally:
        reader.close()


def test_get_of_a_segment_deleted_since_the_last_listing_is_none(
    writer_store: MessageStore,
) -> None:
    store = writer_store
    for seq in (1, 2, 3):
        store.append([row(seq, seq)])
    reader = Reader(store.directory)
    try:
        assert reader.ask("refresh") == "ok"  # lists 1, 2, 3 but opens none of them
        store.delete(1)  # retention in the writer
        assert reader.ask("get 1") is None
        assert reader.ask("get 2") == [2, "t.a", "payload-2"]
    finally:
        reader.close()


# -- the writer and the durable state -------------------------------------------------------


def ev(seq: int, record: R.EventRecord) -> R.Event:
    """An event as a consumer receives it (encoded, then decoded)."""
    (event,) = R.decode_events(R.encode_event(seq, seq * 1_000, record))
    return event


def msg(
    seq: int,
    topic: str = "t.a",
    payload: bytes = b"plain",
    sensitive: bool = False,
    targets: Sequence[tuple[str, str, tuple[int, ...]]] = (),
) -> R.Event:
    packed: list[R.Target] = [[app, session, encode_sids(sids)] for app, session, sids in targets]
    record = R.Published(
        "pub", "s", topic, b"id-%d" % seq, "", "", sensitive, b"hdr", payload, packed
    )
    return ev(seq, record)


def sub(seq: int, app: str, session: str, sid: int, pattern: str, durable: bool) -> R.Event:
    return ev(seq, R.Subscribed(app, session, sid, pattern, durable, False))


def unsub(seq: int, app: str, session: str, sid: int, durable: bool = True) -> R.Event:
    return ev(seq, R.Unsubscribed(app, session, sid, durable, "unsubscribe"))


def ack(seq: int, app: str, session: str, stored_seqs: list[int]) -> R.Event:
    return ev(seq, R.Acked(app, session, stored_seqs, [b"id-%d" % s for s in stored_seqs]))


def dead_record(
    entry_id: int,
    stored_seq: int,
    session: tuple[str, str] = ("sub", "s1"),
    topic: str = "t.a",
    sensitive: bool = False,
    payload: bytes = b"plain",
) -> R.DeadLettered:
    return R.DeadLettered(
        entry_id,
        session[0],
        session[1],
        "nacked",
        4,
        "handler failed",
        stored_seq,
        "pub",
        123,
        topic,
        b"id-%d" % stored_seq,
        sensitive,
        b"hdr",
        payload,
        encode_sids((1,)),
    )


def dead(
    seq: int,
    entry_id: int,
    stored_seq: int,
    session: tuple[str, str] = ("sub", "s1"),
    topic: str = "t.a",
    sensitive: bool = False,
    payload: bytes = b"plain",
) -> R.Event:
    return ev(seq, dead_record(entry_id, stored_seq, session, topic, sensitive, payload))


FAKE_SEALED = b"\x02SEALED:"
"""What FakeSealer's records start with: version byte 2 (a bundle), then a marker."""


class FakeSealer:
    def __init__(self) -> None:
        self.calls: list[tuple[RecordContext, bytes]] = []

    def seal_record(self, context: RecordContext, plaintext: bytes) -> bytes:
        self.calls.append((context, plaintext))
        return FAKE_SEALED + plaintext[::-1]


def unsealed(stored: bytes) -> list[Any]:
    """The bundle inside a FakeSealer record."""
    assert stored.startswith(FAKE_SEALED)
    fields: list[Any] = msgpack.unpackb(stored[len(FAKE_SEALED) :][::-1], raw=False)
    return fields


class Stores:
    """A MessageStore and a StateStore under one directory, reopenable."""

    def __init__(self, root: Path, state_map: int = 1 << 30) -> None:
        self.root = root
        self.state_map = state_map
        self.sealer = FakeSealer()
        self.messages, self.state = self._open()

    def _open(self) -> tuple[MessageStore, StateStore]:
        messages = MessageStore(self.root / "segs", readonly=False)
        state = StateStore(self.root / "state.mdb", readonly=False, map_size=self.state_map)
        return messages, state

    def writer(self, sensitive_topics: Sequence[str] = (), sealer: bool = True) -> StoreWriter:
        return StoreWriter(
            self.messages, self.state, self.sealer if sealer else None, sensitive_topics
        )

    def reopen(self) -> None:
        self.close()
        self.messages, self.state = self._open()

    def close(self) -> None:
        self.messages.close()
        self.state.close()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    opened = Stores(tmp_path)
    yield opened
    opened.close()


def test_msg_is_stored_with_pending_for_its_targets(stores: Stores) -> None:
    writer = stores.writer()
    targets = [("sub", "s1", (1, 2)), ("other", "s", (5,))]
    assert writer.commit([msg(1, targets=targets), msg(2)]) == 2
    assert writer.watermark == 2
    stored = stores.messages.get(1)
    assert stored is not None
    assert (stored.seq, stored.ts_ns, stored.sender, stored.topic) == (1, 1_000, "pub", "t.a")
    assert (stored.msg_id, stored.header, stored.payload, stored.sealed) == (
        b"id-1",
        b"hdr",
        b"plain",
        False,
    )
    assert stores.state.pending_of("sub", "s1") == [(1, [1, 2])]
    assert stores.state.pending_of("other", "s") == [(1, [5])]
    assert stores.state.pending_of("sub", "s2") == []
    assert stores.state.pending_count() == 2
    assert writer.stored == 2


def test_ack_and_dead_remove_pending(stores: Stores) -> None:
    writer = stores.writer()
    target = [("sub", "s1", (1,))]
    writer.commit([msg(1, targets=target), msg(2, targets=target), msg(3, targets=target)])
    writer.commit([ack(4, "sub", "s1", [1, 99])])  # an unknown seq is harmless
    assert [seq for seq, _ in stores.state.pending_of("sub", "s1")] == [2, 3]
    writer.commit([dead(5, entry_id=70, stored_seq=2)])
    assert [seq for seq, _ in stores.state.pending_of("sub", "s1")] == [3]
    writer.commit([dead(6, entry_id=71, stored_seq=0)])  # not a stored delivery
    assert [seq for seq, _ in stores.state.pending_of("sub", "s1")] == [3]
    writer.commit([ack(7, "other", "s1", [3])])  # another app's ack
    assert [seq for seq, _ in stores.state.pending_of("sub", "s1")] == [3]

    letters = {letter.entry_id: letter.fields for letter in stores.state.dead_letters()}
    assert sorted(letters) == [70, 71]
    first = letters[70]
    for name, value in zip(
        [f.name for f in dataclasses.fields(R.DeadLettered)],
        R.values(dead_record(70, 2)),
        strict=True,
    ):
        assert first[name] == value, name
    assert first["sealed"] is False
    assert first["dead_ns"] == 5_000


def test_durable_subscriptions_and_unsub_of_their_pending(stores: Stores) -> None:
    writer = stores.writer()
    writer.commit(
        [
            sub(1, "sub", "s1", 1, "t.>", True),
            sub(2, "sub", "s1", 2, "t.a", True),
            sub(3, "sub", "s1", 3, "x.*", False),  # not durable: not stored
            sub(4, "sub", "s2", 1, "t.>", True),
            msg(5, targets=[("sub", "s1", (1, 2)), ("sub", "s2", (1,))]),
            msg(6, targets=[("sub", "s1", (1,))]),
            msg(7, targets=[("sub", "s1", (2,))]),
        ]
    )
    assert stores.state.subscriptions() == {
        ("sub", "s1"): {1: "t.>", 2: "t.a"},
        ("sub", "s2"): {1: "t.>"},
    }
    writer.commit([unsub(8, "sub", "s1", 1)])
    assert stores.state.subscriptions() == {("sub", "s1"): {2: "t.a"}, ("sub", "s2"): {1: "t.>"}}
    # sid 1 left every pending entry of s1 (an entry left with no sid is gone) ...
    assert stores.state.pending_of("sub", "s1") == [(5, [2]), (7, [2])]
    # ... and the other session's sid 1 is untouched
    assert stores.state.pending_of("sub", "s2") == [(5, [1])]
    writer.commit([unsub(9, "sub", "s1", 3, durable=False)])  # not durable: nothing stored
    assert stores.state.pending_of("sub", "s1") == [(5, [2]), (7, [2])]
    writer.commit([unsub(10, "sub", "s1", 2)])
    assert stores.state.subscriptions() == {("sub", "s2"): {1: "t.>"}}
    assert stores.state.pending_of("sub", "s1") == []


def test_dead_letters_replay_and_purge(stores: Stores) -> None:
    writer = stores.writer()
    writer.commit(
        [
            msg(1, targets=[("sub", "s1", (1,))]),
            dead(2, entry_id=7, stored_seq=1),
            dead(3, entry_id=8, stored_seq=0),
            dead(4, entry_id=9, stored_seq=0),
            dead(5, entry_id=10, stored_seq=0),
        ]
    )
    assert stores.state.pending_of("sub", "s1") == []
    assert [d.entry_id for d in stores.state.dead_letters()] == [7, 8, 9, 10]
    writer.commit([ev(6, R.DlqReplayed(7, "sub", "s1", 1, encode_sids((1, 4)), "$op"))])
    assert [d.entry_id for d in stores.state.dead_letters()] == [8, 9, 10]
    assert stores.state.pending_of("sub", "s1") == [(1, [1, 4])]
    writer.commit([ev(7, R.DlqReplayed(8, "sub", "s1", 0, b"", "$op"))])  # not durable
    assert [d.entry_id for d in stores.state.dead_letters()] == [9, 10]
    assert stores.state.pending_of("sub", "s1") == [(1, [1, 4])]
    writer.commit([ev(8, R.DlqPurged([9, 123], "$op"))])
    assert [d.entry_id for d in stores.state.dead_letters()] == [10]
    writer.commit([ev(9, R.DlqPurged([10], "$broker"))])
    assert list(stores.state.dead_letters()) == []


def test_watermark_is_persisted_and_commit_is_idempotent(stores: Stores) -> None:
    writer = stores.writer()
    first = [msg(1, targets=[("sub", "s1", (1,))]), ack(2, "sub", "s1", [1]), msg(3)]
    assert writer.commit(first) == 3
    assert stores.state.watermark() == 3
    assert writer.commit(first) == 3  # everything already applied: nothing happens
    assert writer.commit(first[:1]) == 3
    assert stores.state.pending_of("sub", "s1") == []  # the MSG's pending not re-added
    assert writer.stored == 2
    assert [m.seq for m in stores.messages.scan(0)] == [1, 3]

    stores.reopen()
    writer = stores.writer()
    assert writer.watermark == 3
    assert stores.state.watermark() == 3
    assert writer.commit([*first, msg(4, targets=[("sub", "s1", (1,))])]) == 4  # only 4 is new
    assert [m.seq for m in stores.messages.scan(0)] == [1, 3, 4]
    assert stores.state.pending_of("sub", "s1") == [(4, [1])]
    assert writer.stored == 1
    # a batch without any message still moves the watermark; without state changes it
    # is recorded in the messages' own transaction (one synced commit), not in state.mdb
    assert writer.commit([sub(5, "sub", "s1", 9, "t.>", False)]) == 5
    stores.reopen()
    assert (stores.state.watermark(), stores.messages.watermark()) == (4, 5)
    assert stores.writer().watermark == 5
    assert writer.commit([]) == 5


def test_messages_stored_before_a_crash_are_not_stored_twice(stores: Stores) -> None:
    """The messages commit first: a crash before the state commit leaves rows beyond the
    watermark; the broker sends those events again and only their state is applied."""
    events = [msg(1, targets=[("sub", "s1", (1,))]), msg(2), msg(3, targets=[("sub", "s1", (1,))])]
    stores.messages.append(
        [
            (e.seq, e.ts_ns, "pub", e.record.topic, e.record.msg_id, b"hdr", b"plain", False)
            for e in events[:2]
            if isinstance(e.record, R.Published)
        ]
    )
    stores.reopen()
    writer = stores.writer()
    assert writer.watermark == stores.state.watermark() == 0
    assert writer.commit(events) == 3
    assert [m.seq for m in stores.messages.scan(0)] == [1, 2, 3]
    assert stores.state.pending_of("sub", "s1") == [(1, [1]), (3, [1])]
    assert stores.state.watermark() == 3


def test_the_watermark_never_names_a_message_the_segments_lack(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the message store does with a batch it cannot take, the durable watermark
    (what the broker confirms publishes up to) must not pass messages that are missing."""
    monkeypatch.setattr(store_module, "segment_map_size", lambda _max_bytes: 256 * 1024)
    stores.reopen()
    writer = stores.writer()
    events = [msg(seq, payload=b"x" * 5_000) for seq in range(1, 101)]  # ~500 KB, one commit
    with contextlib.suppress(lmdb.MapFullError):
        writer.commit(events)
    durable = stores.state.watermark()
    missing = [seq for seq in range(1, durable + 1) if stores.messages.get(seq) is None]
    assert missing == []


def test_sensitive_flag_seals_the_stored_payload(stores: Stores) -> None:
    writer = stores.writer()
    writer.commit([msg(1, payload=b"secret", sensitive=True), msg(2, payload=b"public")])
    sealed = stores.messages.get(1)
    assert sealed is not None
    assert b"secret" not in sealed.payload and b"hdr" not in sealed.payload
    assert (sealed.header, unsealed(sealed.payload)) == (b"", [b"hdr", b"secret"])
    assert sealed.sealed
    [(context, _)] = stores.sealer.calls
    assert context == RecordContext(KIND_MESSAGE, 1, 1000, b"id-1", "pub", "t.a")
    plain = stores.messages.get(2)
    assert plain is not None
    assert (plain.payload, plain.sealed) == (b"public", False)
    assert writer.sealed == 1


def test_sensitive_topics_seal_without_the_flag(stores: Stores) -> None:
    writer = stores.writer(sensitive_topics=["secret.>", "hr.*.salary"])
    writer.commit(
        [
            msg(1, topic="secret.plans", payload=b"p1"),
            msg(2, topic="hr.bob.salary", payload=b"p2"),
            msg(3, topic="hr.bob.address", payload=b"p3"),
            msg(4, topic="secret", payload=b"p4"),  # `>` needs one more token
            msg(5, topic="public.news", payload=b"p5"),
        ]
    )
    found = {m.seq: m for m in stores.messages.scan(0)}
    assert {seq for seq, m in found.items() if m.sealed} == {1, 2}
    for seq in (1, 2):
        assert unsealed(found[seq].payload) == [b"hdr", b"p%d" % seq]
    for seq in (3, 4, 5):
        assert found[seq].payload == b"p%d" % seq
    assert [context.topic for context, _ in stores.sealer.calls] == [
        "secret.plans",
        "hr.bob.salary",
    ]


def test_dead_letters_of_sensitive_messages_are_sealed(stores: Stores) -> None:
    writer = stores.writer(sensitive_topics=["secret.>"])
    writer.commit(
        [
            dead(1, entry_id=1, stored_seq=0, sensitive=True, payload=b"flagged"),
            dead(2, entry_id=2, stored_seq=0, topic="secret.x", payload=b"by-topic"),
            dead(3, entry_id=3, stored_seq=0, payload=b"plain"),
        ]
    )
    letters = {d.entry_id: d.fields for d in stores.state.dead_letters()}
    for entry_id, payload in ((1, b"flagged"), (2, b"by-topic")):
        letter = letters[entry_id]
        assert letter["sealed"] is True
        assert (letter["header"], letter["error"]) == (b"", "")
        assert unsealed(letter["payload"]) == [b"hdr", payload, "handler failed"]
    assert (letters[3]["payload"], letters[3]["sealed"]) == (b"plain", False)
    assert letters[3]["error"] == "handler failed"
    contexts = [context for context, _ in stores.sealer.calls]
    assert [(c.kind, c.seq, c.ts_ns, c.sender) for c in contexts] == [
        (KIND_DEAD_LETTER, 1, 123, "pub"),
        (KIND_DEAD_LETTER, 2, 123, "pub"),
    ]


def test_sensitive_message_without_a_sealer_is_refused_and_nothing_advances(
    stores: Stores,
) -> None:
    writer = stores.writer(sealer=False)
    with pytest.raises(RuntimeError):
        writer.commit([msg(1), msg(2, payload=b"secret", sensitive=True)])
    assert writer.watermark == 0
    assert stores.state.watermark() == 0
    assert stores.messages.last_seq() == 0
    assert writer.commit([msg(1)]) == 1  # a plain message still goes through


def test_state_map_full_grows_and_retries(tmp_path: Path) -> None:
    stores = Stores(tmp_path, state_map=64 * 1024)
    try:
        writer = stores.writer()
        letters = [
            dead(seq, entry_id=seq, stored_seq=0, payload=b"y" * 20_000) for seq in range(1, 11)
        ]
        assert writer.commit(letters) == 10
        assert [d.entry_id for d in stores.state.dead_letters()] == list(range(1, 11))
        assert stores.state.env.info()["map_size"] > 64 * 1024
        assert stores.state.watermark() == 10
    finally:
        stores.close()


def test_sealed_counter_counts_each_payload_once_across_a_state_grow(tmp_path: Path) -> None:
    stores = Stores(tmp_path, state_map=64 * 1024)
    try:
        writer = stores.writer()
        letters = [
            dead(seq, entry_id=seq, stored_seq=0, sensitive=True, payload=b"y" * 20_000)
            for seq in range(1, 11)
        ]
        writer.commit(letters)
        assert writer.sealed == 10
    finally:
        stores.close()


def test_kinds_persistence_does_not_store_only_move_the_watermark(stores: Stores) -> None:
    writer = stores.writer()
    ignored: list[R.EventRecord] = [
        R.Routed(b"id-1", "pub", "t.a", [["sub", "s1"]]),
        R.DeliveryAttempted("sub", "s1", [[b"id-1", 1, 77]]),
        R.Nacked("sub", "s1", b"id-1", 1, "busy", True),
        R.RetryScheduled("sub", "s1", b"id-1", 2, 200, "nacked"),
        R.SessionChanged("sub", "s1", "detached", "peer gone"),
        R.AuthFailed("intruder", "ipc", "CURVE", "bad token", "foreign-process", "x", 42),
        R.Denied("app", "s", "publish", "x.y", 300, "not allowed", ""),
        R.Lifecycle("ticker", "restart", {"exit": 1}),
        R.ConsumerSkipped("$audit", 1, 5, "behind"),
        R.Subscribed("sub", "s1", 4, "t.>", False, False),
        R.Unsubscribed("sub", "s1", 4, False, "session-ended"),
    ]
    events = [ev(seq, record) for seq, record in enumerate(ignored, start=1)]
    assert writer.commit(events) == len(ignored)
    assert stores.state.watermark() == len(ignored)
    assert stores.messages.last_seq() == 0
    assert stores.state.subscriptions() == {}
    assert stores.state.pending_count() == 0
    assert list(stores.state.dead_letters()) == []


# -- the restore pages a recovering broker is sent ------------------------------------------


class FakeOpener:
    """Opens what FakeSealer sealed; anything else is a tampered record."""

    def open_record(self, context: RecordContext, sealed: bytes) -> bytes:
        if not sealed.startswith(FAKE_SEALED):
            raise TamperedRecord("not sealed by FakeSealer", **context.ref())
        return sealed[len(FAKE_SEALED) :][::-1]


def restore_of(stores: Stores, **bounds: int) -> tuple[RestoreReader, list[EvRestore]]:
    reader = RestoreReader(stores.messages, stores.state, FakeOpener(), **bounds)
    pages = [EvRestore.decode(page.frames()) for page in reader.pages()]  # over the wire
    return reader, pages


def test_restore_of_an_empty_store_is_one_done_page(stores: Stores) -> None:
    reader, pages = restore_of(stores)
    assert pages == [EvRestore(0, done=True)]
    assert (reader.rows, reader.skipped) == (0, 0)


def test_restore_carries_sessions_deliveries_dead_letters_and_recent_ids(
    stores: Stores,
) -> None:
    writer = stores.writer(sensitive_topics=["secret.>"])
    writer.commit(
        [
            sub(1, "sub", "s1", 1, "t.>", True),
            sub(2, "sub", "s1", 2, "secret.>", True),
            sub(3, "sub", "s2", 1, "t.a", True),
            msg(4, targets=[("sub", "s1", (1,)), ("sub", "s2", (1,))]),
            msg(5, topic="secret.x", payload=b"hush", targets=[("sub", "s1", (2,))]),
            msg(6, targets=[("sub", "s1", (1,))]),
            ack(7, "sub", "s1", [6]),
            dead(8, entry_id=3, stored_seq=0, sensitive=True, payload=b"dead-secret"),
            msg(9),
        ]
    )
    reader, pages = restore_of(stores)
    (page,) = pages
    assert page.done
    assert page.watermark == 9
    assert sorted(page.sessions) == [
        ("sub", "s1", {1: "t.>", 2: "secret.>"}),
        ("sub", "s2", {1: "t.a"}),
    ]
    by_session = {(d[0], d[1], d[2]): d for d in page.deliveries}
    assert sorted(by_session) == [("sub", "s1", 4), ("sub", "s1", 5), ("sub", "s2", 4)]
    assert by_session["sub", "s1", 5] == (
        *("sub", "s1", 5, [2], "pub", 5_000, "secret.x", b"id-5", b"hdr"),
        *(b"hush", True),  # opened for the broker; still marked as stored sealed
    )
    assert by_session["sub", "s1", 4][3] == [1]
    (letter,) = page.dead_letters
    assert letter[0] == 3
    assert letter[13:] == (b"dead-secret", True, [1])
    assert [r[2] for r in page.recent] == [4, 5, 6, 9]  # oldest first
    assert page.recent[0] == ("pub", b"id-4", 4, 4_000)
    assert (reader.rows, reader.skipped) == (2 + 3 + 1 + 4, 0)


def test_restore_pages_are_bounded_by_rows_and_by_bytes(stores: Stores) -> None:
    writer = stores.writer()
    events = [sub(1, "sub", "s1", 1, "t.>", True)]
    events += [msg(seq, targets=[("sub", "s1", (1,))]) for seq in range(2, 30)]
    writer.commit(events)
    _, pages = restore_of(stores, page_rows=10)
    sizes = [len(p.sessions) + len(p.deliveries) + len(p.recent) for p in pages]
    assert sizes == [10, 10, 10, 10, 10, 7]  # 1 session, 28 deliveries, 28 recent ids
    assert [p.done for p in pages] == [False] * 5 + [True]
    assert {p.watermark for p in pages} == {29}
    deliveries = [d[2] for p in pages for d in p.deliveries]
    assert deliveries == list(range(2, 30))  # in publish order, across pages
    assert [r[2] for p in pages for r in p.recent] == list(range(2, 30))

    big = b"x" * (1024 * 1024)  # the largest payload a publish may carry
    writer.commit([msg(seq, payload=big, targets=[("sub", "s1", (1,))]) for seq in (30, 31)])
    _, pages = restore_of(stores)
    for page in pages:
        assert len(page.frames()[1]) < MAX_FRAME_BYTES  # the broker's per-frame limit
    assert [d[2] for p in pages for d in p.deliveries] == list(range(2, 32))


def test_restore_watermark_covers_messages_stored_beyond_the_state(stores: Stores) -> None:
    """A crash between the two commits leaves messages past the state's watermark: the
    broker must number new events after them, never reuse their seqs."""
    stores.messages.append([(1, 1_000, "pub", "t.a", b"id-1", b"hdr", b"p", False)])
    _, pages = restore_of(stores)
    assert pages[-1].watermark == 1
    assert stores.state.watermark() == 0


def test_restore_skips_what_cannot_be_read_and_sends_the_rest(stores: Stores) -> None:
    writer = stores.writer()
    writer.commit(
        [
            sub(1, "sub", "s1", 1, "t.>", True),
            msg(2, targets=[("sub", "s1", (1,))]),
            msg(3, targets=[("sub", "s1", (1,))]),
        ]
    )
    with stores.state.env.begin(write=True) as txn:  # pending for a message retention deleted
        stores.state.put_pending(txn, "sub", "s1", 1, encode_sids((1,)))
    stores.messages.append([(4, 4_000, "pub", "t.a", b"id-4", b"hdr", b"garbage", True)])
    with stores.state.env.begin(write=True) as txn:  # a sealed record that does not open
        stores.state.put_pending(txn, "sub", "s1", 4, encode_sids((1,)))
    reader, pages = restore_of(stores)
    assert [d[2] for d in pages[-1].deliveries] == [2, 3]
    assert reader.skipped == 2


def test_a_group_without_state_changes_is_one_commit_and_survives_a_crash_of_the_next(
    stores: Stores,
) -> None:
    """A group with no durable subscriber involved records its watermark with its messages
    (one synced commit); a later group's crash between its two commits falls back to it."""
    writer = stores.writer()
    assert writer.commit([msg(1), msg(2), sub(3, "a", "s", 1, "t.>", False)]) == 3
    assert (stores.state.watermark(), stores.messages.watermark()) == (0, 3)  # state untouched
    stores.reopen()
    assert stores.writer().watermark == 3

    stateful = [msg(4, targets=[("sub", "s1", (1,))]), msg(5)]
    # the crash: the group's messages committed, its state transaction never ran
    stores.messages.append(
        [
            (e.seq, e.ts_ns, "pub", e.record.topic, e.record.msg_id, b"hdr", b"plain", False)
            for e in stateful
            if isinstance(e.record, R.Published)
        ]
    )
    stores.reopen()
    writer = stores.writer()
    assert writer.watermark == 3  # not 5: the group's state never landed
    assert writer.commit(stateful) == 5  # sent again: rows skipped, state applied
    assert [m.seq for m in stores.messages.scan(0)] == [1, 2, 4, 5]
    assert stores.state.pending_of("sub", "s1") == [(4, [1])]
    assert stores.state.watermark() == 5
