"""persistence.sealing with a real key ring and real LMDB: what of a sensitive message and
dead letter is sealed, older records still open, NACK texts never journaled, and the key
ids the store reports in use (what `plexus keys destroy` asks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import event_records as R
from broker.codec import encode_pub_header
from broker.paths import PlatformPaths
from persistence.key_usage import key_ids_in_use
from persistence.restore import RestoreReader
from persistence.sealing import (
    dead_letter_context,
    message_context,
    open_dead_letter,
    open_message,
    seal_dead_letter,
    seal_message,
)
from persistence.segments import StoredMessage
from persistence.service import PersistenceConfig, PersistenceService
from persistence.state import StateStore
from persistence.store import MessageStore
from persistence.writer import StoreWriter
from security.credentials import ServerKeys
from security.keyring import PASSPHRASE_ENV, KeyRing, TamperedRecord

SECRET = b"SECRET-4e2a"
MSG_ID = b"\x05" * 16
HEADER = encode_pub_header(MSG_ID, "vault.x", correlation_id="cid-SECRET-4e2a", sensitive=True)


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def paths(tmp_path: Path) -> PlatformPaths:
    paths = PlatformPaths(tmp_path / "home")
    paths.prepare()
    paths.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return paths


@pytest.fixture
def ring(paths: PlatformPaths) -> KeyRing:
    return KeyRing.open(paths.keys_dir)


@pytest.fixture
def stores(paths: PlatformPaths) -> Iterator[tuple[MessageStore, StateStore]]:
    messages = MessageStore(paths.segments_dir, readonly=False)
    state = StateStore(paths.state_path, readonly=False)
    yield messages, state
    messages.close()
    state.close()


def published(seq: int, sensitive: bool, sender: str = "pub") -> R.Event:
    record = R.Published(sender, "s", "vault.x", MSG_ID, "cid", "", sensitive, HEADER, SECRET, [])
    return R.Event(seq, 1_000 * seq, record)


def dead(seq: int, entry_id: int, error: str, sensitive: bool = True) -> R.Event:
    record = R.DeadLettered(
        entry_id, "sub", "s1", "rejected", 1, error, 0, "pub", 77, "vault.x", MSG_ID,
        sensitive, HEADER, SECRET, b"",
    )  # fmt: skip
    return R.Event(seq, 1_000 * seq, record)


def test_a_sensitive_row_keeps_header_and_payload_only_sealed(
    ring: KeyRing, stores: tuple[MessageStore, StateStore]
) -> None:
    messages, state = stores
    StoreWriter(messages, state, ring).commit([published(1, True), published(2, False)])
    sealed, plain = messages.get(1), messages.get(2)
    assert sealed is not None and plain is not None
    assert sealed.header == b"" and SECRET not in sealed.payload and b"cid-" not in sealed.payload
    assert open_message(ring, sealed) == (HEADER, SECRET)
    assert open_message(ring, plain) == (HEADER, SECRET)  # a plain row is as it was


def test_a_row_sealed_before_version_2_still_opens(ring: KeyRing) -> None:
    old = ring.seal(MSG_ID, "vault.x", SECRET)  # payload only; header in clear
    stored = StoredMessage(3, 3_000, "pub", "vault.x", MSG_ID, HEADER, old, True)
    assert open_message(ring, stored) == (HEADER, SECRET)


@given(
    seq=st.integers(1, 2**40),
    ts=st.integers(0, 2**62),
    sender=st.text(min_size=1, max_size=12),
    other=st.text(min_size=1, max_size=12),
)
def test_a_sealed_row_claimed_for_another_sender_or_seq_does_not_open(
    tmp_path_factory: pytest.TempPathFactory, seq: int, ts: int, sender: str, other: str
) -> None:
    ring = _shared_ring(tmp_path_factory)
    context = message_context(seq, ts, sender, "vault.x", MSG_ID)
    header, payload = seal_message(ring, context, HEADER, SECRET)
    row = StoredMessage(seq, ts, sender, "vault.x", MSG_ID, header, payload, True)
    assert open_message(ring, row) == (HEADER, SECRET)
    if other != sender:
        with pytest.raises(TamperedRecord):
            open_message(ring, dataclasses.replace(row, sender=other))
    with pytest.raises(TamperedRecord):
        open_message(ring, dataclasses.replace(row, seq=seq + 1))
    with pytest.raises(TamperedRecord):
        open_message(ring, dataclasses.replace(row, ts_ns=ts + 1))


_RINGS: dict[str, KeyRing] = {}


def _shared_ring(factory: pytest.TempPathFactory) -> KeyRing:
    if "ring" not in _RINGS:
        _RINGS["ring"] = KeyRing.open(factory.mktemp("sealing") / "keys")
    return _RINGS["ring"]


def test_a_sensitive_dead_letter_seals_its_error_and_header_too(
    ring: KeyRing, stores: tuple[MessageStore, StateStore]
) -> None:
    messages, state = stores
    error = f"could not parse {SECRET.decode()}"
    StoreWriter(messages, state, ring).commit([dead(1, 7, error), dead(2, 8, "plain", False)])
    letters = {d.entry_id: d.fields for d in state.dead_letters()}
    stored = msgpack.packb(letters[7], use_bin_type=True)
    assert SECRET not in stored and b"cid-" not in stored
    assert (letters[7]["error"], letters[7]["header"], letters[7]["sealed"]) == ("", b"", True)
    opened = open_dead_letter(ring, 7, letters[7])
    assert (opened["error"], opened["header"], opened["payload"]) == (error, HEADER, SECRET)
    assert letters[8]["error"] == "plain"
    moved = {**letters[7]}
    with pytest.raises(TamperedRecord):  # under another entry id
        open_dead_letter(ring, 8, moved)
    restored = [page for page in RestoreReader(messages, state, ring).pages()]
    rows = [row for page in restored for row in page.dead_letters]
    assert [(row[0], row[6]) for row in rows] == [(7, error), (8, "plain")]


def test_a_dead_letter_sealed_before_version_2_still_opens(ring: KeyRing) -> None:
    record = {"msg_id": MSG_ID, "topic": "vault.x", "sender": "pub", "published_ns": 77}
    record.update(header=HEADER, error="old", sealed=True)
    record["payload"] = ring.seal(MSG_ID, "vault.x", SECRET)
    assert open_dead_letter(ring, 5, record)["payload"] == SECRET
    fresh = {**record, "payload": SECRET}
    seal_dead_letter(ring, 5, fresh)
    assert dead_letter_context(5, fresh).seq == 5
    assert open_dead_letter(ring, 5, fresh)["error"] == "old"


def test_the_store_reports_which_keys_its_sealed_records_need(
    paths: PlatformPaths, ring: KeyRing, stores: tuple[MessageStore, StateStore]
) -> None:
    messages, state = stores
    writer = StoreWriter(messages, state, ring)
    writer.commit([published(1, True), published(2, False), dead(3, 1, "x")])
    ring.rotate()
    writer.commit([published(4, True)])
    messages.close()  # LMDB opens an environment once per process; the CLI is another one
    state.close()
    assert key_ids_in_use(paths) == {1: 2, 2: 1}


def nacked(seq: int, reason: str) -> R.Event:
    return R.Event(seq, seq, R.Nacked("sub", "s1", MSG_ID, 1, reason, True))


def test_a_nack_text_of_the_receiver_is_never_journaled(paths: PlatformPaths) -> None:
    service = PersistenceService(
        PersistenceConfig(paths), "token", ServerKeys.generate(), monotonic=lambda: 0
    )
    try:
        assert service.journal is not None
        assert service.writer.seals([nacked(1, f"bad card {SECRET.decode()}")])
        assert not service._journal_group([nacked(1, f"bad card {SECRET.decode()}")])
        assert service._journal_group([nacked(2, "nacked")])  # the client's own default text
        assert SECRET not in (paths.store_dir / "journal").read_bytes()
    finally:
        service.close()
