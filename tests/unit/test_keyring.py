"""KeyRing: AES-256-GCM sealing of stored payloads, rotation, usage limits and key files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import Code, StorageFailure
from persistence.errors import storage_failure
from security import keyring
from security.keyring import (
    NONCE_BYTES,
    PASSPHRASE_ENV,
    KeyFileError,
    KeyMissing,
    KeyRing,
    KeyRingError,
    SealedRecordError,
    TamperedRecord,
    record_aad,
    wrap_aad,
)

SECOND = 1_000_000_000
MSG_ID = b"\x01" * 16
TOPIC = "orders.new"
PAYLOAD = b'{"symbol": "ACME", "qty": 100}'


class FakeClock:
    """An injectable clock: time moves only when the test says so."""

    def __init__(self, now: int = 1_700_000_000 * SECOND) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SECOND)


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "keys"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ring(keys_dir: Path, clock: FakeClock) -> KeyRing:
    return KeyRing.open(keys_dir, clock)


def key_id_of(sealed: bytes) -> int:
    return int.from_bytes(sealed[1:5], "big")


def nonce_of(sealed: bytes) -> bytes:
    return sealed[5 : 5 + NONCE_BYTES]


def ring_doc(keys_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb((keys_dir / "ring").read_bytes(), raw=False)
    return doc


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- sealing and opening ------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", PAYLOAD, bytes(range(256)) * 300])
def test_round_trip(ring: KeyRing, plaintext: bytes) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, plaintext)
    assert len(plaintext) < 16 or plaintext not in sealed  # a byte or two can occur by chance
    assert ring.open_sealed(MSG_ID, TOPIC, sealed) == plaintext


def test_layout_version_key_id_nonce_and_tag(ring: KeyRing) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    assert sealed[0] == 1
    assert key_id_of(sealed) == 1
    assert len(sealed) == 1 + 4 + 12 + len(PAYLOAD) + 16


def test_nonce_is_12_random_bytes_each_time(ring: KeyRing) -> None:
    records = [ring.seal(MSG_ID, TOPIC, PAYLOAD) for _ in range(200)]
    nonces = {nonce_of(r) for r in records}
    assert all(len(n) == 12 for n in nonces)
    assert len(nonces) == len(records)
    assert len({r[17:] for r in records}) == len(records)


def test_a_record_opens_with_the_unwrapped_data_key_and_documented_aad(
    ring: KeyRing, keys_dir: Path
) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    kek = (keys_dir / "kek").read_bytes()
    entry = ring_doc(keys_dir)["keys"][0]
    data_key = AESGCM(kek).decrypt(entry["nonce"], entry["wrapped"], wrap_aad(1))
    aad = record_aad(sealed[:5], MSG_ID, TOPIC)
    assert AESGCM(data_key).decrypt(nonce_of(sealed), sealed[17:], aad) == PAYLOAD


FLIP_POSITIONS = {
    "version": 0,
    "key-id-high": 1,
    "key-id-low": 4,
    "nonce-first": 5,
    "nonce-last": 16,
    "ciphertext-first": 17,
    "ciphertext-middle": 17 + len(PAYLOAD) // 2,
    "ciphertext-last": 17 + len(PAYLOAD) - 1,
    "tag-first": -16,
    "tag-last": -1,
}


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
@pytest.mark.parametrize("position", FLIP_POSITIONS.values(), ids=FLIP_POSITIONS.keys())
def test_flipping_any_byte_is_detected(ring: KeyRing, position: int, mask: int) -> None:
    ring.rotate()  # two keys: a flipped key id may name another existing key
    sealed = bytearray(ring.seal(MSG_ID, TOPIC, PAYLOAD))
    sealed[position] ^= mask
    with pytest.raises((TamperedRecord, KeyMissing)):
        ring.open_sealed(MSG_ID, TOPIC, bytes(sealed))


def test_every_single_byte_flip_is_detected(ring: KeyRing) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    for position in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x5A
        with pytest.raises(SealedRecordError):
            ring.open_sealed(MSG_ID, TOPIC, bytes(damaged))


@pytest.mark.parametrize("length", [0, 1, 5, 17, 32])
def test_truncated_record_is_tampered(ring: KeyRing, length: int) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    with pytest.raises(TamperedRecord):
        ring.open_sealed(MSG_ID, TOPIC, sealed[:length])
    with pytest.raises(TamperedRecord):
        ring.open_sealed(MSG_ID, TOPIC, sealed[:-1])
    with pytest.raises(TamperedRecord):
        ring.open_sealed(MSG_ID, TOPIC, sealed + b"\0")


@pytest.mark.parametrize(
    ("msg_id", "topic"),
    [
        (b"\x02" * 16, TOPIC),
        (MSG_ID[:-1], TOPIC),
        (b"", TOPIC),
        (MSG_ID, "orders.old"),
        (MSG_ID, "orders.new."),
        (MSG_ID, ""),
        (MSG_ID + b"o", "rders.new"),  # the id/topic boundary is part of the binding
    ],
)
def test_wrong_msg_id_or_topic_is_tampered(ring: KeyRing, msg_id: bytes, topic: str) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    with pytest.raises(TamperedRecord) as caught:
        ring.open_sealed(msg_id, topic, sealed)
    assert storage_failure(caught.value).code is Code.STORED_DATA_CORRUPT
    assert caught.value.ref["topic"] == topic


def test_unknown_key_id_is_key_missing(ring: KeyRing) -> None:
    sealed = ring.seal(MSG_ID, TOPIC, PAYLOAD)
    foreign = sealed[:1] + (99).to_bytes(4, "big") + sealed[5:]
    with pytest.raises(KeyMissing) as caught:
        ring.open_sealed(MSG_ID, TOPIC, foreign)
    assert storage_failure(caught.value).code is Code.KEY_UNAVAILABLE
    assert caught.value.ref["key_id"] == 99
    assert "99" in str(caught.value)


def test_record_errors_carry_no_wire_code_and_persistence_maps_them() -> None:
    tampered = TamperedRecord("bad tag", msg_id="01")
    missing = KeyMissing("no key 7", key_id=7)
    for error in (tampered, missing):
        assert isinstance(error, SealedRecordError)
        assert isinstance(error, KeyRingError)
        assert not hasattr(error, "code")  # floor 1: the wire codes live above
    assert isinstance(KeyFileError("x"), KeyRingError)
    assert str(tampered) == "bad tag"
    assert tampered.ref == {"msg_id": "01"}
    corrupt, unavailable = storage_failure(tampered), storage_failure(missing)
    assert isinstance(corrupt, StorageFailure)
    assert corrupt.code is Code.STORED_DATA_CORRUPT
    assert int(corrupt.code) == 502
    assert unavailable.code is Code.KEY_UNAVAILABLE
    assert int(unavailable.code) == 504
    assert str(corrupt) == "STORED_DATA_CORRUPT (502): bad tag"
    assert corrupt.ref == {"msg_id": "01"}
    assert unavailable.ref == {"key_id": 7}


@pytest.fixture(scope="module")
def shared_ring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyRing]:
    saved = os.environ.pop(PASSPHRASE_ENV, None)
    try:
        ring = KeyRing.open(tmp_path_factory.mktemp("hypothesis") / "keys", FakeClock())
        ring.rotate()
        yield ring
    finally:
        if saved is not None:
            os.environ[PASSPHRASE_ENV] = saved


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), msg_id=st.binary(max_size=20), topic=st.text(max_size=20))
def test_random_bytes_only_raise_storage_data_errors(
    shared_ring: KeyRing, data: bytes, msg_id: bytes, topic: str
) -> None:
    with pytest.raises(SealedRecordError):
        shared_ring.open_sealed(msg_id, topic, data)


@settings(max_examples=300, deadline=None)
@given(key_id=st.sampled_from([0, 1, 2, 3, 2**32 - 1]), rest=st.binary(max_size=100))
def test_random_bodies_under_real_key_ids_only_raise_storage_data_errors(
    shared_ring: KeyRing, key_id: int, rest: bytes
) -> None:
    data = b"\x01" + key_id.to_bytes(4, "big") + rest
    with pytest.raises(SealedRecordError):
        shared_ring.open_sealed(MSG_ID, TOPIC, data)


# -- rotation and other processes ---------------------------------------------------------


def test_rotate_new_data_uses_new_key_and_old_data_still_opens(ring: KeyRing) -> None:
    old = ring.seal(MSG_ID, TOPIC, b"old")
    assert ring.rotate() == 2
    new = ring.seal(MSG_ID, TOPIC, b"new")
    assert key_id_of(old) == 1
    assert key_id_of(new) == 2
    assert ring.open_sealed(MSG_ID, TOPIC, old) == b"old"
    assert ring.open_sealed(MSG_ID, TOPIC, new) == b"new"
    assert [(k["id"], k["active"]) for k in ring.describe()] == [(1, False), (2, True)]


def test_another_process_sees_the_rotation_after_refresh(keys_dir: Path, clock: FakeClock) -> None:
    service = KeyRing.open(keys_dir, clock)
    cli = KeyRing.open(keys_dir, clock)
    before = service.seal(MSG_ID, TOPIC, b"before")
    assert cli.rotate() == 2
    assert service.refresh() is True
    assert service.refresh() is False
    after = service.seal(MSG_ID, TOPIC, b"after")
    assert key_id_of(before) == 1
    assert key_id_of(after) == 2
    assert cli.open_sealed(MSG_ID, TOPIC, after) == b"after"
    assert service.open_sealed(MSG_ID, TOPIC, before) == b"before"
    assert [k["active"] for k in service.describe()] == [False, True]


def test_seal_picks_up_a_rotation_within_a_second(keys_dir: Path, clock: FakeClock) -> None:
    service = KeyRing.open(keys_dir, clock)
    cli = KeyRing.open(keys_dir, clock)
    assert key_id_of(service.seal(MSG_ID, TOPIC, PAYLOAD)) == 1
    cli.rotate()
    clock.advance(0.5)
    assert key_id_of(service.seal(MSG_ID, TOPIC, PAYLOAD)) == 1  # no stat before 1 s
    clock.advance(0.5)
    assert key_id_of(service.seal(MSG_ID, TOPIC, PAYLOAD)) == 2


def test_open_sealed_finds_a_key_created_by_another_process(
    keys_dir: Path, clock: FakeClock
) -> None:
    service = KeyRing.open(keys_dir, clock)
    cli = KeyRing.open(keys_dir, clock)
    cli.rotate()
    sealed = cli.seal(MSG_ID, TOPIC, PAYLOAD)
    assert key_id_of(sealed) == 2
    assert service.open_sealed(MSG_ID, TOPIC, sealed) == PAYLOAD  # no explicit refresh


def test_describe_lists_keys_without_material(ring: KeyRing, clock: FakeClock) -> None:
    clock.advance(10)
    ring.rotate()
    listing = ring.describe()
    assert listing == [
        {"id": 1, "created_ns": clock.now - 10 * SECOND, "active": False, "reserved": 0},
        {"id": 2, "created_ns": clock.now, "active": True, "reserved": 0},
    ]


# -- usage limits -------------------------------------------------------------------------


def test_usage_limit_rotates_automatically(keys_dir: Path, clock: FakeClock) -> None:
    ring = KeyRing.open(keys_dir, clock, usage_limit=5, reserve_block=2)
    records = [ring.seal(MSG_ID, TOPIC, bytes([i])) for i in range(12)]
    assert [key_id_of(r) for r in records] == [1] * 5 + [2] * 5 + [3] * 2
    for i, record in enumerate(records):
        assert ring.open_sealed(MSG_ID, TOPIC, record) == bytes([i])
    assert [(k["id"], k["reserved"], k["active"]) for k in ring.describe()] == [
        (1, 5, False),
        (2, 5, False),
        (3, 2, True),
    ]


def test_reservation_is_persisted_before_use(keys_dir: Path, clock: FakeClock) -> None:
    ring = KeyRing.open(keys_dir, clock, usage_limit=100, reserve_block=8)
    assert ring_doc(keys_dir)["keys"][0]["reserved"] == 0
    ring.seal(MSG_ID, TOPIC, PAYLOAD)
    assert ring_doc(keys_dir)["keys"][0]["reserved"] == 8
    for _ in range(7):
        ring.seal(MSG_ID, TOPIC, PAYLOAD)
    assert ring_doc(keys_dir)["keys"][0]["reserved"] == 8
    ring.seal(MSG_ID, TOPIC, PAYLOAD)
    assert ring_doc(keys_dir)["keys"][0]["reserved"] == 16


def test_crashes_never_let_a_key_exceed_its_limit(keys_dir: Path, clock: FakeClock) -> None:
    limit, block = 10, 4
    used: dict[int, int] = {}
    for _ in range(7):  # each process seals once, then "crashes" (is dropped)
        process = KeyRing.open(keys_dir, clock, usage_limit=limit, reserve_block=block)
        key_id = key_id_of(process.seal(MSG_ID, TOPIC, PAYLOAD))
        used[key_id] = used.get(key_id, 0) + 1
        del process
    keys = ring_doc(keys_dir)["keys"]
    assert all(k["reserved"] <= limit for k in keys)
    # key 1 reserved 0-4, 4-8, 8-10, then was full (same for key 2): a crash wastes the
    # rest of its block, a later process never reuses a count, and no key goes beyond 10
    assert [k["reserved"] for k in keys] == [10, 10, 4]
    assert used == {1: 3, 2: 3, 3: 1}


def test_two_processes_share_a_key_limit(keys_dir: Path, clock: FakeClock) -> None:
    a = KeyRing.open(keys_dir, clock, usage_limit=6, reserve_block=2)
    b = KeyRing.open(keys_dir, clock, usage_limit=6, reserve_block=2)
    used: dict[int, int] = {}
    for i in range(20):
        process = a if i % 3 else b
        key_id = key_id_of(process.seal(MSG_ID, TOPIC, PAYLOAD))
        used[key_id] = used.get(key_id, 0) + 1
    assert all(count <= 6 for count in used.values())
    assert all(k["reserved"] <= 6 for k in ring_doc(keys_dir)["keys"])


@pytest.mark.parametrize(("limit", "block"), [(0, 1), (2**32 + 1, 1), (10, 0)])
def test_bad_limits_are_rejected(keys_dir: Path, limit: int, block: int) -> None:
    with pytest.raises(ValueError):
        KeyRing.open(keys_dir, usage_limit=limit, reserve_block=block)


# -- key files ----------------------------------------------------------------------------


def test_first_open_creates_private_files(ring: KeyRing, keys_dir: Path) -> None:
    assert mode_of(keys_dir) == 0o700
    for name in ("kek", "ring", "lock"):
        assert mode_of(keys_dir / name) == 0o600, name
    assert len((keys_dir / "kek").read_bytes()) == 32
    doc = ring_doc(keys_dir)
    assert doc["format"] == 1
    assert doc["kek"] == {"kind": "file"}
    [entry] = doc["keys"]
    assert entry["id"] == 1
    assert len(entry["nonce"]) == 12
    assert len(entry["wrapped"]) == 48
    assert not (keys_dir / "kek.salt").exists()
    assert not (keys_dir / "ring.tmp").exists()


def test_reopening_keeps_the_keys(keys_dir: Path, clock: FakeClock) -> None:
    sealed = KeyRing.open(keys_dir, clock).seal(MSG_ID, TOPIC, PAYLOAD)
    kek = (keys_dir / "kek").read_bytes()
    again = KeyRing.open(keys_dir, clock)
    assert again.open_sealed(MSG_ID, TOPIC, sealed) == PAYLOAD
    assert (keys_dir / "kek").read_bytes() == kek


def test_key_material_never_in_plaintext_in_the_ring(keys_dir: Path, clock: FakeClock) -> None:
    ring = KeyRing.open(keys_dir, clock)
    ring.rotate()
    ring.rotate()
    raw = (keys_dir / "ring").read_bytes()
    kek = (keys_dir / "kek").read_bytes()
    assert kek not in raw
    entries = msgpack.unpackb(raw, raw=False)["keys"]
    assert len(entries) == 3
    for entry in entries:
        data_key = AESGCM(kek).decrypt(entry["nonce"], entry["wrapped"], wrap_aad(entry["id"]))
        assert len(data_key) == 32
        assert data_key not in raw
        assert data_key[:16] not in raw
        assert data_key[16:] not in raw


def test_wrapped_key_is_bound_to_its_id(keys_dir: Path, clock: FakeClock) -> None:
    KeyRing.open(keys_dir, clock).rotate()
    doc = ring_doc(keys_dir)
    first, second = doc["keys"]
    first["wrapped"], second["wrapped"] = second["wrapped"], first["wrapped"]
    first["nonce"], second["nonce"] = second["nonce"], first["nonce"]
    (keys_dir / "ring").write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(KeyFileError, match="cannot be unwrapped"):
        KeyRing.open(keys_dir, clock)


def test_missing_dir_is_created_0700(tmp_path: Path) -> None:
    keys_dir = tmp_path / "a" / "b" / "keys"
    KeyRing.open(keys_dir)
    assert mode_of(keys_dir) == 0o700


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o710, 0o777])
def test_loose_dir_is_refused(tmp_path: Path, mode: int) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    keys_dir.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        KeyRing.open(keys_dir)
    assert f"chmod 700 {keys_dir}" in str(caught.value)
    assert not (keys_dir / "kek").exists()


@pytest.mark.parametrize("name", ["kek", "ring", "lock"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o700, 0o660])
def test_loose_key_file_is_refused(keys_dir: Path, name: str, mode: int) -> None:
    KeyRing.open(keys_dir)
    path = keys_dir / name
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        KeyRing.open(keys_dir)
    assert str(path) in str(caught.value)
    assert f"chmod 600 {path}" in str(caught.value)


def test_loose_ring_is_refused_by_a_running_ring(ring: KeyRing, keys_dir: Path) -> None:
    (keys_dir / "ring").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        ring.refresh(force=True)


def test_symlinked_kek_is_refused(keys_dir: Path, tmp_path: Path) -> None:
    KeyRing.open(keys_dir)
    elsewhere = tmp_path / "kek-elsewhere"
    (keys_dir / "kek").rename(elsewhere)
    (keys_dir / "kek").symlink_to(elsewhere)
    with pytest.raises(KeyFileError):
        KeyRing.open(keys_dir)


def test_missing_ring_is_refused(keys_dir: Path) -> None:
    KeyRing.open(keys_dir)
    (keys_dir / "ring").unlink()
    with pytest.raises(KeyFileError, match="from backup") as caught:
        KeyRing.open(keys_dir)
    assert "ring is missing" in str(caught.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"format": 2, "kek": {"kind": "file"}, "keys": []}),
        msgpack.packb({"format": 1, "kek": {"kind": "file"}, "keys": [{"id": 1}]}),
    ],
)
def test_corrupt_ring_is_refused(keys_dir: Path, content: bytes) -> None:
    KeyRing.open(keys_dir)
    (keys_dir / "ring").write_bytes(content)
    with pytest.raises(KeyFileError, match="from backup"):
        KeyRing.open(keys_dir)


def test_wrong_kek_is_refused(keys_dir: Path) -> None:
    KeyRing.open(keys_dir)
    (keys_dir / "kek").write_bytes(os.urandom(32))
    with pytest.raises(KeyFileError, match=r"cannot be unwrapped.*from backup"):
        KeyRing.open(keys_dir)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_damaged_kek_is_refused(keys_dir: Path, damage: str) -> None:
    KeyRing.open(keys_dir)
    if damage == "delete":
        (keys_dir / "kek").unlink()
    else:
        (keys_dir / "kek").write_bytes(b"short")
    with pytest.raises(KeyFileError, match="from backup"):
        KeyRing.open(keys_dir)
    assert not (keys_dir / "kek").exists() or (keys_dir / "kek").read_bytes() == b"short"


def test_first_open_crashing_before_the_kek_recovers(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: Path, data: bytes) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(keyring, "_create_private", crash)
    with pytest.raises(OSError, match="simulated crash"):
        KeyRing.open(keys_dir)
    assert ring_doc(keys_dir)["keys"] == []
    monkeypatch.undo()
    ring = KeyRing.open(keys_dir)
    assert ring.open_sealed(MSG_ID, TOPIC, ring.seal(MSG_ID, TOPIC, PAYLOAD)) == PAYLOAD


# -- passphrase mode ----------------------------------------------------------------------


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring, "SCRYPT_N", 2**10)


@pytest.mark.usefixtures("fast_scrypt")
def test_passphrase_from_environment(keys_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    sealed = KeyRing.open(keys_dir).seal(MSG_ID, TOPIC, PAYLOAD)
    assert not (keys_dir / "kek").exists()
    assert len((keys_dir / "kek.salt").read_bytes()) == 16
    assert mode_of(keys_dir / "kek.salt") == 0o600
    assert ring_doc(keys_dir)["kek"] == {"kind": "scrypt", "n": 2**10, "r": 8, "p": 1}
    assert KeyRing.open(keys_dir).open_sealed(MSG_ID, TOPIC, sealed) == PAYLOAD

    monkeypatch.setenv(PASSPHRASE_ENV, "wrong horse")
    with pytest.raises(KeyFileError, match="passphrase does not match"):
        KeyRing.open(keys_dir)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(KeyFileError, match=PASSPHRASE_ENV):
        KeyRing.open(keys_dir)
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    with pytest.raises(KeyFileError, match="empty"):
        KeyRing.open(keys_dir)


@pytest.mark.usefixtures("fast_scrypt")
def test_passphrase_on_a_kek_file_ring_is_refused(keys_dir: Path) -> None:
    KeyRing.open(keys_dir)
    with pytest.raises(KeyFileError, match=f"unset {PASSPHRASE_ENV}"):
        KeyRing.open(keys_dir, passphrase="something")


@pytest.mark.usefixtures("fast_scrypt")
def test_loose_salt_is_refused(keys_dir: Path) -> None:
    KeyRing.open(keys_dir, passphrase="pw")
    (keys_dir / "kek.salt").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyRing.open(keys_dir, passphrase="pw")
