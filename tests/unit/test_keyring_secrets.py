"""KeyRing, issue 12 threat 9: version-2 records bound to sender, time and seq; KEK rotation
with crash recovery; destroying retired keys; scrypt cost; the passphrase on a descriptor."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from security import keyring
from security.handoff import handoff_pipe
from security.keyring import (
    KIND_DEAD_LETTER,
    KIND_MESSAGE,
    PASSPHRASE_ENV,
    PASSPHRASE_FD_VARIABLE,
    RETIRE_GRACE_NS,
    KeyFileError,
    KeyMissing,
    KeyRefused,
    KeyRing,
    RecordContext,
    TamperedRecord,
    passphrase_from_descriptor,
    record_aad_v2,
    record_key_id,
)

SECOND = 1_000_000_000
CONTEXT = RecordContext(KIND_MESSAGE, 42, 1_700_000_000 * SECOND, b"\x07" * 16, "pub", "orders.new")
PAYLOAD = b"card 4111 1111 1111 1111"


class FakeClock:
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


def ring_doc(keys_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = msgpack.unpackb((keys_dir / "ring").read_bytes(), raw=False)
    return doc


# -- version-2 records ----------------------------------------------------------------------


def test_v2_record_round_trips_with_version_2(ring: KeyRing) -> None:
    sealed = ring.seal_record(CONTEXT, PAYLOAD)
    assert sealed[0] == 2 and record_key_id(sealed) == 1
    assert PAYLOAD not in sealed
    assert ring.open_record(CONTEXT, sealed) == PAYLOAD


_changes = st.sampled_from(["kind", "seq", "ts_ns", "msg_id", "sender", "topic"])


def _moved(context: RecordContext, field: str, draw: st.DataObject) -> RecordContext:
    current = getattr(context, field)
    other: Any
    if field == "kind":
        other = KIND_DEAD_LETTER
    elif isinstance(current, int):
        other = draw.draw(st.integers(0, 2**64 - 1).filter(lambda v: v != current))
    elif isinstance(current, bytes):
        other = draw.draw(st.binary(max_size=20).filter(lambda v: v != current))
    else:
        other = draw.draw(st.text(max_size=20).filter(lambda v: v != current))
    return dataclasses.replace(context, **{field: other})


@pytest.fixture(scope="module")
def shared_ring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyRing]:
    saved = os.environ.pop(PASSPHRASE_ENV, None)
    try:
        yield KeyRing.open(tmp_path_factory.mktemp("v2") / "keys", FakeClock())
    finally:
        if saved is not None:
            os.environ[PASSPHRASE_ENV] = saved


@given(field=_changes, data=st.data())
def test_a_record_moved_to_another_message_sender_time_or_seq_does_not_open(
    shared_ring: KeyRing, field: str, data: st.DataObject
) -> None:
    sealed = shared_ring.seal_record(CONTEXT, PAYLOAD)
    with pytest.raises(TamperedRecord):
        shared_ring.open_record(_moved(CONTEXT, field, data), sealed)


@given(field=_changes, data=st.data())
def test_aad_v2_differs_for_any_two_contexts(field: str, data: st.DataObject) -> None:
    header = b"\x02\x00\x00\x00\x01"
    assert record_aad_v2(header, CONTEXT) != record_aad_v2(header, _moved(CONTEXT, field, data))


def test_aad_v2_length_prefixes_keep_fields_apart() -> None:
    header = b"\x02\x00\x00\x00\x01"
    a = dataclasses.replace(CONTEXT, msg_id=b"ab", sender="c")
    b = dataclasses.replace(CONTEXT, msg_id=b"a", sender="bc")
    assert record_aad_v2(header, a) != record_aad_v2(header, b)


def test_version_1_records_still_open_and_a_downgrade_fails(ring: KeyRing) -> None:
    old = ring.seal(CONTEXT.msg_id, CONTEXT.topic, PAYLOAD)
    assert old[0] == 1
    assert ring.open_record(CONTEXT, old) == PAYLOAD  # a store written before version 2
    new = bytearray(ring.seal_record(CONTEXT, PAYLOAD))
    new[0] = 1  # claim the weaker binding: the tag covers the version byte
    with pytest.raises(TamperedRecord):
        ring.open_record(CONTEXT, bytes(new))
    with pytest.raises(TamperedRecord):
        ring.open_sealed(CONTEXT.msg_id, CONTEXT.topic, ring.seal_record(CONTEXT, PAYLOAD))


# -- scrypt cost ----------------------------------------------------------------------------


def test_a_new_passphrase_ring_uses_scrypt_n_2_17(keys_dir: Path) -> None:
    ring = KeyRing.open(keys_dir, passphrase="correct horse")
    kek = ring_doc(keys_dir)["kek"]
    assert kek == {"kind": "scrypt", "n": 2**17, "r": 8, "p": 1}
    assert ring.kek_info()["n"] >= 2**17
    assert not (keys_dir / "kek").exists()


def test_a_ring_made_with_n_2_15_still_opens_and_kek_rotation_raises_its_cost(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old:
        old.setattr(keyring, "SCRYPT_N", 2**15)
        sealed = KeyRing.open(keys_dir, passphrase="pw").seal_record(CONTEXT, PAYLOAD)
    assert ring_doc(keys_dir)["kek"] == {"kind": "scrypt", "n": 2**15, "r": 8, "p": 1}
    ring = KeyRing.open(keys_dir, passphrase="pw")  # parameters come from the ring
    assert ring.open_record(CONTEXT, sealed) == PAYLOAD
    salt = (keys_dir / "kek.salt").read_bytes()
    assert ring.rotate_kek() == 2
    assert ring_doc(keys_dir)["kek"] == {"kind": "scrypt", "n": 2**17, "r": 8, "p": 1, "gen": 2}
    assert (keys_dir / "kek.salt").read_bytes() != salt
    assert KeyRing.open(keys_dir, passphrase="pw").open_record(CONTEXT, sealed) == PAYLOAD
    with pytest.raises(KeyFileError):
        KeyRing.open(keys_dir, passphrase="wrong")


# -- KEK rotation ---------------------------------------------------------------------------


def test_kek_rotation_rewraps_every_key_and_keeps_every_record(
    ring: KeyRing, keys_dir: Path, clock: FakeClock
) -> None:
    first = ring.seal_record(CONTEXT, b"one")
    ring.rotate()
    second = ring.seal_record(CONTEXT, b"two")
    kek_before = (keys_dir / "kek").read_bytes()
    wrapped_before = [k["wrapped"] for k in ring_doc(keys_dir)["keys"]]
    service = KeyRing.open(keys_dir, clock)  # another process with the ring open
    assert ring.rotate_kek() == 2
    assert (keys_dir / "kek").read_bytes() != kek_before
    assert not (keys_dir / "kek.new").exists()
    wrapped_after = [k["wrapped"] for k in ring_doc(keys_dir)["keys"]]
    assert all(a != b for a, b in zip(wrapped_before, wrapped_after, strict=True))
    assert ring.kek_info() == {"kind": "file", "generation": 2}
    for reader in (ring, KeyRing.open(keys_dir, clock)):
        assert reader.open_record(CONTEXT, first) == b"one"
        assert reader.open_record(CONTEXT, second) == b"two"
    clock.advance(1.1)  # the running process notices the new ring at its next seal
    third = service.seal_record(CONTEXT, b"three")
    assert service.open_record(CONTEXT, first) == b"one"
    assert KeyRing.open(keys_dir, clock).open_record(CONTEXT, third) == b"three"


def test_old_kek_file_no_longer_unwraps_the_ring(ring: KeyRing, keys_dir: Path) -> None:
    old = (keys_dir / "kek").read_bytes()
    ring.rotate_kek()
    (keys_dir / "kek").write_bytes(old)  # a stolen copy of the old KEK is worthless now
    with pytest.raises(KeyFileError, match="cannot be unwrapped"):
        KeyRing.open(keys_dir)


def test_a_kek_rotation_that_died_before_the_ring_was_written_is_undone(
    ring: KeyRing, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = ring.seal_record(CONTEXT, PAYLOAD)
    real = keyring._replace_private

    def crash(path: Path, data: bytes) -> os.stat_result:
        if path.name == "ring":
            raise OSError("power cut")
        return real(path, data)

    with monkeypatch.context() as patched:
        patched.setattr(keyring, "_replace_private", crash)
        with pytest.raises(OSError, match="power cut"):
            ring.rotate_kek()
    assert (keys_dir / "kek.new").exists()
    again = KeyRing.open(keys_dir)
    assert not (keys_dir / "kek.new").exists()
    assert again.open_record(CONTEXT, sealed) == PAYLOAD
    assert again.kek_info()["generation"] == 1


def test_a_kek_rotation_that_died_before_the_rename_is_finished(
    ring: KeyRing, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sealed = ring.seal_record(CONTEXT, PAYLOAD)
    real = os.replace

    def crash(src: Path, dst: Path) -> None:
        if Path(src).name == "kek.new":
            raise OSError("power cut")
        real(src, dst)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="power cut"):
            ring.rotate_kek()
    reader = KeyRing.open(keys_dir)  # the ring is wrapped under kek.new: found and finished
    assert not (keys_dir / "kek.new").exists()
    assert reader.open_record(CONTEXT, sealed) == PAYLOAD
    assert KeyRing.open(keys_dir).kek_info()["generation"] == 2


# -- destroying retired keys ----------------------------------------------------------------


def test_destroy_refuses_unknown_active_needed_and_just_retired_keys(
    ring: KeyRing, clock: FakeClock
) -> None:
    with pytest.raises(KeyRefused, match="no key 9"):
        ring.destroy(9, set())
    with pytest.raises(KeyRefused, match="active key"):
        ring.destroy(1, set())
    ring.rotate()
    with pytest.raises(KeyRefused, match="still seals stored records"):
        ring.destroy(1, {1})
    with pytest.raises(KeyRefused, match="retired less than"):
        ring.destroy(1, set())
    assert ring.destroyable(set()) == []
    clock.advance(RETIRE_GRACE_NS / SECOND)
    assert ring.destroyable({1}) == []
    assert ring.destroyable(set()) == [1]


def test_a_destroyed_key_is_gone_for_every_process_and_its_id_never_returns(
    ring: KeyRing, keys_dir: Path, clock: FakeClock
) -> None:
    doomed = ring.seal_record(CONTEXT, PAYLOAD)
    other = KeyRing.open(keys_dir, clock)
    ring.rotate()
    kept = ring.seal_record(CONTEXT, b"kept")
    clock.advance(RETIRE_GRACE_NS / SECOND)
    ring.destroy(1, set())
    assert [k["id"] for k in ring.describe()] == [2]
    assert ring_doc(keys_dir)["destroyed"] == [1]
    for reader in (ring, other, KeyRing.open(keys_dir, clock)):
        with pytest.raises(KeyMissing, match="destroyed"):
            reader.open_record(CONTEXT, doomed)
        assert reader.open_record(CONTEXT, kept) == b"kept"
    assert ring.rotate() == 3


# -- the passphrase on a descriptor ---------------------------------------------------------


def test_the_passphrase_is_read_from_the_descriptor_once() -> None:
    fd = handoff_pipe("päss phrase".encode())
    environ = {PASSPHRASE_FD_VARIABLE: str(fd)}
    assert passphrase_from_descriptor(environ) == "päss phrase"
    with pytest.raises(OSError):
        os.fstat(fd)  # closed after reading
    assert passphrase_from_descriptor({}) is None
    with pytest.raises(KeyFileError):
        passphrase_from_descriptor({PASSPHRASE_FD_VARIABLE: "not-a-number"})


def test_a_service_ring_ignores_the_environment(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    KeyRing.open(keys_dir, passphrase="pw")
    monkeypatch.setenv(PASSPHRASE_ENV, "pw")
    with pytest.raises(KeyFileError, match="protected by a passphrase"):
        KeyRing.open(keys_dir, from_environment=False)
    assert KeyRing.open(keys_dir, passphrase="pw", from_environment=False).describe()
