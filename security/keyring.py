"""Encryption at rest for stored message payloads: AES-256-GCM data keys kept in a key ring.

Why it is built this way:

* Each payload is sealed with AES-256-GCM under a random 96-bit nonce. Random nonces are
  safe only while one key encrypts far fewer than 2**32 messages, so every data key has a
  usage limit (`USAGE_LIMIT` = 2**28) and the ring rotates to a new key before reaching it.
  Encryptions are reserved in blocks that are written to the ring *before* they are used:
  a crash wastes the rest of a block but can never let a key exceed its limit, and several
  processes sharing the ring draw disjoint blocks under an flock.
* The associated data binds a record to its header (version, key id) and to the message it
  belongs to: a version-2 record (`seal_record`) to its kind (stored message or dead
  letter), sequence number, timestamp, message id, sender and topic; a version-1 record
  (written before version 2 existed, still opened) only to its message id and topic. A
  record copied under another message, sender or place fails its tag instead of opening.
* Data keys never reach the disk in the clear: the ring holds them wrapped by a
  key-encryption key (the 0600 file `kek`, or scrypt of the passphrase with the salt in
  `kek.salt`; N = 2**17 for rings made or rewrapped now, the parameters of older rings are
  read from the ring). Old keys stay in the ring until the operator destroys one no
  stored record needs (`destroy`), so rotating never strands a record.
* The KEK itself can be replaced (`rotate_kek`): every data key is rewrapped under a new
  one. The new secret is written to `kek.new` (`kek.salt.new`) first, then the ring, then
  the secret is renamed over the old one; an open that finds the staged file takes
  whichever of the two unwraps the ring, so a crash at any step leaves a readable ring.
* The persistence service keeps the ring open while `plexus keys rotate` (another process)
  changes it: writes are atomic replaces under the lock, and readers pick the new file up
  within a second (`seal`) or at once when they meet an unknown key id (`open_sealed`).

Files in `keys_dir` (0700, owned by the user; every file 0600):

    kek        32 random bytes (absent in passphrase mode)
    kek.salt   16 random bytes, the scrypt salt (passphrase mode only)
    ring       msgpack {"format": 1,
                        "kek": {"kind": "file", "gen": G}
                             | {"kind": "scrypt", "n": N, "r": R, "p": P, "gen": G},
                        "keys": [{"id": 1.., "created_ns": int, "nonce": 12 bytes,
                                  "wrapped": 48 bytes, "reserved": int}, ...],
                        "destroyed": [id, ...]}
               `wrapped` = AESGCM(kek).encrypt(nonce, data key, b"plexus-key-v1\\0" + id (4 B));
               keys are sorted by id and the last one is the active key. `gen` counts KEK
               rotations (absent: 1); `destroyed` the ids `destroy` removed (absent: none).
    kek.new, kek.salt.new   a KEK rotation under way (see above)
    lock       empty; flock'ed around every change of `ring`

Sealed record: version (1 byte) | key id (4 bytes, big-endian) | nonce (12 bytes) |
ciphertext || tag (16 bytes), with associated data

    version 2: b"plexus-record-v2\\0" + version + key id + kind (1 B) + seq (8 B) + ts_ns (8 B)
               + len(msg_id) (4 B) + msg_id + len(sender) (4 B) + sender + topic (UTF-8)
    version 1: b"plexus-record-v1\\0" + version + key id + len(msg_id) (4 B) + msg_id + topic

(`RecordContext` holds what version 2 binds.) What the plaintext holds is the caller's
business (persistence.sealing).

Errors (floor 1: they carry no wire code; persistence maps them where it answers):

    KeyRingError
    ├── KeyFileError         the key directory or a file: missing, damaged, too open
    ├── KeyRefused           `destroy` refused: unknown, active, just retired or still needed
    └── SealedRecordError    a sealed record does not open (`detail`, `ref`)
        ├── TamperedRecord   malformed or failed its tag
        └── KeyMissing       its key id is not in the ring
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from security.handoff import HandoffError, read_fd_variable

RECORD_V1 = 1
"""Sealed records written before the AAD bound sender, timestamp and sequence (still read)."""
RECORD_VERSION = 2
"""What `seal_record` writes."""
KIND_MESSAGE = 1
"""`RecordContext.kind` of a stored message (a segment row)."""
KIND_DEAD_LETTER = 2
"""`RecordContext.kind` of a dead letter (a state.mdb dlq record)."""
USAGE_LIMIT = 2**28
"""Encryptions allowed per data key: far below the 2**32 bound for random 96-bit nonces."""
RESERVE_BLOCK = 65536
"""Encryptions reserved (persisted in the ring) at a time."""
REFRESH_INTERVAL_NS = 1_000_000_000
"""`seal` looks for a changed ring at most this often."""
PASSPHRASE_ENV = "PLEXUS_KEY_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
"""Where the operator's processes (`plexus run`, `plexus keys`) find the passphrase."""
PASSPHRASE_FD_VARIABLE = "PLEXUS_KEY_PASSPHRASE_FD"  # noqa: S105 (a variable name)
"""Names the inherited descriptor a platform service reads the passphrase from."""
RETIRE_GRACE_NS = 5 * 1_000_000_000
"""A key retired more recently than this may still be sealing in a running service
(which notices a rotation within `REFRESH_INTERVAL_NS`): `destroy` waits it out."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 16
SCRYPT_N = 2**17
"""scrypt cost of rings made (or KEK-rotated) now; 2**15 before: read from the ring."""
SCRYPT_R = 8
SCRYPT_P = 1
MAX_KEY_ID = 2**32 - 1

_HEADER = struct.Struct(">BI")
_MIN_RECORD = _HEADER.size + NONCE_BYTES + TAG_BYTES
_RECORD_AAD = b"plexus-record-v1\0"
_RECORD_AAD_V2 = b"plexus-record-v2\0"
_U64 = struct.Struct(">Q")
_WRAP_AAD = b"plexus-key-v1\0"
_RING_FORMAT = 1
_SCRYPT_MAX_MEMORY = 256 * 2**20

KEK_FILE = "kek"
SALT_FILE = "kek.salt"
STAGED_SUFFIX = ".new"
RING_FILE = "ring"
LOCK_FILE = "lock"


class KeyRingError(Exception):
    """Anything the key ring refuses."""


class KeyFileError(KeyRingError):
    """The key directory or one of its files is missing, damaged or open to other users."""


class KeyRefused(KeyRingError):
    """`destroy` refused: the key is unknown, active, just retired, or a record needs it."""


class SealedRecordError(KeyRingError):
    """A sealed record cannot be turned back into its plaintext.

    `detail` says why and what to do; `ref` names the record (`msg_id` hex, `topic`, and
    `key_id` when its header was readable). A service that answers on the wire maps the
    two kinds below to its own error codes (persistence: 502 and 504).
    """

    def __init__(self, detail: str, **ref: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.ref = ref


class TamperedRecord(SealedRecordError):
    """The record is malformed or failed its integrity check (wrong msg id, topic or bytes)."""


class KeyMissing(SealedRecordError):
    """The record names a key id the ring does not hold."""


def wrap_aad(key_id: int) -> bytes:
    """Associated data of a wrapped data key: binds it to its key id."""
    return _WRAP_AAD + key_id.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class RecordContext:
    """Where a version-2 record belongs: all of it goes into the associated data.

    For a stored message: its event `seq`, broker timestamp, id, sender and topic; for a
    dead letter: its entry id as `seq` and its message's publish time, id, sender, topic.
    """

    kind: int
    seq: int
    ts_ns: int
    msg_id: bytes
    sender: str
    topic: str

    def ref(self) -> dict[str, Any]:
        return {"msg_id": self.msg_id.hex(), "topic": self.topic, "seq": self.seq}


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def record_aad_v2(header: bytes, context: RecordContext) -> bytes:
    """Associated data of a version-2 record: its header and everything in `context`,
    each field fixed-size or length-prefixed, so two contexts never give the same bytes."""
    sender = _utf8(context.sender)
    return b"".join(
        (
            _RECORD_AAD_V2,
            header,
            bytes((context.kind & 0xFF,)),
            _U64.pack(context.seq & (2**64 - 1)),
            _U64.pack(context.ts_ns & (2**64 - 1)),
            len(context.msg_id).to_bytes(4, "big"),
            context.msg_id,
            len(sender).to_bytes(4, "big"),
            sender,
            _utf8(context.topic),
        )
    )


def record_version(sealed: bytes) -> int:
    """The version byte of a sealed record (0 when it is empty)."""
    return sealed[0] if sealed else 0


def record_key_id(sealed: bytes) -> int | None:
    """The key id a sealed record names, None when it is too short to have one."""
    if len(sealed) < _HEADER.size:
        return None
    return int(_HEADER.unpack_from(sealed)[1])


def passphrase_from_descriptor(environ: Mapping[str, str] | None = None) -> str | None:
    """The passphrase handed over on the descriptor `PLEXUS_KEY_PASSPHRASE_FD` names
    (None when it is unset); read once, then the descriptor is closed."""
    try:
        data = read_fd_variable(PASSPHRASE_FD_VARIABLE, environ)
    except HandoffError as exc:
        raise KeyFileError(f"cannot read the passphrase: {exc}") from None
    return None if data is None else data.decode("utf-8", "surrogateescape")


def record_aad(header: bytes, msg_id: bytes, topic: str) -> bytes:
    """Associated data of a version-1 record: binds it to its header, message id and topic."""
    return (
        _RECORD_AAD
        + header
        + len(msg_id).to_bytes(4, "big")
        + msg_id
        + topic.encode("utf-8", "surrogatepass")
    )


@dataclass(frozen=True, slots=True)
class _KekSpec:
    kind: str  # "file" or "scrypt"
    n: int = 0
    r: int = 0
    p: int = 0
    gen: int = 1
    """KEK generation: 1 at creation, one more per `rotate_kek`."""

    @property
    def secret_file(self) -> str:
        """The file holding the KEK (file mode) or the scrypt salt."""
        return KEK_FILE if self.kind == "file" else SALT_FILE

    @property
    def secret_bytes(self) -> int:
        return KEY_BYTES if self.kind == "file" else SALT_BYTES


@dataclass(slots=True)
class _KeyEntry:
    id: int
    created_ns: int
    nonce: bytes
    wrapped: bytes
    reserved: int


@dataclass(slots=True)
class _Ring:
    kek: _KekSpec
    keys: list[_KeyEntry] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Lease:
    """Encryptions `used`..`end` of key `key_id`, already reserved in the ring for us."""

    key_id: int
    used: int
    end: int


_Signature = tuple[int, int, int, int, int]


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _chmod_hint(path: Path, mode: str) -> str:
    return f"run `chmod {mode} {shlex.quote(str(path))}`"


def _check_owner(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.getuid():
        raise KeyFileError(
            f"{path} belongs to uid {st.st_uid}, not to the user running Plexus "
            f"(uid {os.getuid()}); keys must be private to that user"
        )


def _check_private_file(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path} is not a regular file; restore it from backup")
    _check_owner(path, st)
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~0o600:
        raise KeyFileError(
            f"{path} has mode {mode:o}, more than owner read/write; {_chmod_hint(path, '600')}"
        )


def _read_private(path: Path) -> tuple[bytes, os.stat_result] | None:
    """The contents of a 0600 file of ours, or None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"cannot open {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        _check_private_file(path, st)
        return handle.read(), st


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 with `data`; fails if it already exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def _replace_private(path: Path, data: bytes) -> os.stat_result:
    """Atomically replace `path` with a 0600 file holding `data`; returns its stat."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return os.stat(path)


def _int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"bad {what}: {value!r}")
    return value


def _bin(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"bad {what}")
    return value


def _decode_kek_spec(doc: object) -> _KekSpec:
    if not isinstance(doc, dict):
        raise ValueError("bad kek entry")
    kind = doc.get("kind")
    gen = _int(doc.get("gen", 1), "kek generation", 1, 2**32)
    if kind == "file":
        return _KekSpec("file", gen=gen)
    if kind != "scrypt":
        raise ValueError(f"unknown kek kind {kind!r}")
    n = _int(doc.get("n"), "scrypt n", 2, 2**24)
    r = _int(doc.get("r"), "scrypt r", 1, 64)
    p = _int(doc.get("p"), "scrypt p", 1, 16)
    if n & (n - 1) or 128 * n * r > _SCRYPT_MAX_MEMORY:
        raise ValueError("bad scrypt parameters")
    return _KekSpec("scrypt", n, r, p, gen)


def _decode_ring(data: bytes) -> _Ring:
    """Parse and validate the ring file; ValueError on anything unexpected."""
    try:
        doc = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not msgpack ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != _RING_FORMAT:
        raise ValueError("not a version-1 key ring")
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise ValueError("no key list")
    destroyed = doc.get("destroyed", [])
    if not isinstance(destroyed, list):
        raise ValueError("bad destroyed list")
    ring = _Ring(
        _decode_kek_spec(doc.get("kek")),
        destroyed=[_int(item, "destroyed key id", 1, MAX_KEY_ID) for item in destroyed],
    )
    for item in keys:
        if not isinstance(item, dict):
            raise ValueError("bad key entry")
        entry = _KeyEntry(
            id=_int(item.get("id"), "key id", 1, MAX_KEY_ID),
            created_ns=_int(item.get("created_ns"), "created_ns", 0, 2**64),
            nonce=_bin(item.get("nonce"), "wrapping nonce", NONCE_BYTES),
            wrapped=_bin(item.get("wrapped"), "wrapped key", KEY_BYTES + TAG_BYTES),
            reserved=_int(item.get("reserved"), "reserved count", 0, 2**64),
        )
        if ring.keys and entry.id <= ring.keys[-1].id:
            raise ValueError("key ids out of order")
        ring.keys.append(entry)
    return ring


def _encode_ring(ring: _Ring) -> bytes:
    kek: dict[str, Any] = {"kind": ring.kek.kind}
    if ring.kek.kind == "scrypt":
        kek.update(n=ring.kek.n, r=ring.kek.r, p=ring.kek.p)
    if ring.kek.gen != 1:
        kek["gen"] = ring.kek.gen
    extra: dict[str, Any] = {"destroyed": ring.destroyed} if ring.destroyed else {}
    data: bytes = msgpack.packb(
        {
            "format": _RING_FORMAT,
            "kek": kek,
            "keys": [
                {
                    "id": k.id,
                    "created_ns": k.created_ns,
                    "nonce": k.nonce,
                    "wrapped": k.wrapped,
                    "reserved": k.reserved,
                }
                for k in ring.keys
            ],
            **extra,
        },
        use_bin_type=True,
    )
    return data


class KeyRing:
    """Data keys of one platform home: seal and open records, rotate, list keys.

    Use `KeyRing.open`. Thread-safe; several processes may open the same directory.
    """

    def __init__(
        self,
        keys_dir: Path,
        clock: Callable[[], int],
        usage_limit: int,
        reserve_block: int,
    ) -> None:
        if not 1 <= usage_limit <= 2**32:
            raise ValueError("usage_limit must be between 1 and 2**32")
        if reserve_block < 1:
            raise ValueError("reserve_block must be positive")
        self._dir = keys_dir
        self._ring_path = keys_dir / RING_FILE
        self._clock = clock
        self._limit = usage_limit
        self._block = reserve_block
        self._mutex = threading.Lock()
        self._kek: AESGCM | None = None
        self._passphrase: str | None = None
        self._ring = _Ring(_KekSpec("file"))
        self._aeads: dict[int, tuple[bytes, AESGCM]] = {}
        self._signature: _Signature | None = None
        self._lease: _Lease | None = None
        self._next_refresh_ns = 0

    @classmethod
    def open(
        cls,
        keys_dir: Path,
        clock: Callable[[], int] = time.time_ns,
        *,
        usage_limit: int = USAGE_LIMIT,
        reserve_block: int = RESERVE_BLOCK,
        passphrase: str | None = None,
        from_environment: bool = True,
    ) -> KeyRing:
        """Open (creating on first use) the key ring in `keys_dir`.

        `passphrase` defaults to $PLEXUS_KEY_PASSPHRASE unless `from_environment` is false
        (a platform service: it is handed the passphrase on a descriptor instead); it only
        matters when the ring is created, and must then be given on every later open.
        Raises KeyFileError when the directory or a file is too open, missing or damaged.
        """
        if passphrase is None and from_environment:
            passphrase = os.environ.get(PASSPHRASE_ENV)
        if passphrase == "":
            raise KeyFileError(f"{PASSPHRASE_ENV} is set but empty; set a passphrase or unset it")
        ring = cls(keys_dir, clock, usage_limit, reserve_block)
        ring._bootstrap(passphrase)
        return ring

    # -- public API -------------------------------------------------------------------

    def seal_record(self, context: RecordContext, plaintext: bytes) -> bytes:
        """Encrypt `plaintext` under the active key as a version-2 record bound to `context`."""
        key_id, aead = self._sealing_key()
        header = _HEADER.pack(RECORD_VERSION, key_id)
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + aead.encrypt(nonce, plaintext, record_aad_v2(header, context))

    def open_record(self, context: RecordContext, sealed: bytes) -> bytes:
        """The plaintext of a record sealed for `context` (version 2), or of a version-1
        record sealed for its message id and topic.

        Raises TamperedRecord (malformed, altered, or sealed for another message, sender,
        time or place) or KeyMissing (its key is not in the ring); never returns
        unauthenticated bytes.
        """

        def aad(header: bytes, version: int) -> bytes:
            if version == RECORD_V1:
                return record_aad(header, context.msg_id, context.topic)
            return record_aad_v2(header, context)

        return self._open(sealed, (RECORD_V1, RECORD_VERSION), aad, context.ref())

    def seal(self, msg_id: bytes, topic: str, plaintext: bytes) -> bytes:
        """A version-1 record (bound to `msg_id` and `topic` only), as stores written
        before version 2 hold; the platform seals with `seal_record`."""
        key_id, aead = self._sealing_key()
        header = _HEADER.pack(RECORD_V1, key_id)
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + aead.encrypt(nonce, plaintext, record_aad(header, msg_id, topic))

    def open_sealed(self, msg_id: bytes, topic: str, sealed: bytes) -> bytes:
        """The plaintext of a version-1 record `seal` made for `msg_id` and `topic`.

        Raises TamperedRecord (malformed, altered, or sealed for another id/topic) or
        KeyMissing (its key is not in the ring); never returns unauthenticated bytes.
        """
        ref: dict[str, Any] = {"msg_id": msg_id.hex(), "topic": topic}
        return self._open(
            sealed, (RECORD_V1,), lambda header, _v: record_aad(header, msg_id, topic), ref
        )

    def rotate(self) -> int:
        """Add a new data key and make it active; returns its id. Old keys stay readable."""
        with self._mutex, self._locked():
            ring = self._read_required()[0]
            entry = self._new_key(ring.keys[-1].id + 1)
            ring.keys.append(entry)
            st = _replace_private(self._ring_path, _encode_ring(ring))
            self._apply(ring, _signature(st))
            return entry.id

    def rotate_kek(self) -> int:
        """Replace the key-encryption key and rewrap every data key under the new one;
        returns the new KEK generation. A passphrase ring keeps its passphrase with a new
        salt and today's scrypt cost. Data keys (and so every record) are unchanged."""
        with self._mutex, self._locked():
            ring = self._read_required()[0]
            self._kek = self._unlock(ring, finish=True)
            keys = [(entry, self._unwrap(self._kek, entry)) for entry in ring.keys]
            spec = self._fresh_spec(self._passphrase)
            spec = _KekSpec(spec.kind, spec.n, spec.r, spec.p, ring.kek.gen + 1)
            staged = self._dir / (spec.secret_file + STAGED_SUFFIX)
            staged.unlink(missing_ok=True)
            secret = os.urandom(spec.secret_bytes)
            _create_private(staged, secret)
            kek = AESGCM(self._derive(spec, secret))
            for entry, key in keys:
                entry.nonce = os.urandom(NONCE_BYTES)
                entry.wrapped = kek.encrypt(entry.nonce, key, wrap_aad(entry.id))
            ring.kek = spec
            st = _replace_private(self._ring_path, _encode_ring(ring))
            os.replace(staged, self._dir / spec.secret_file)  # the ring is wrapped under it
            _fsync_dir(self._dir)
            self._kek = kek
            self._apply(ring, _signature(st), unlocked=True)
            return spec.gen

    def destroy(self, key_id: int, in_use: Collection[int]) -> None:
        """Remove a retired data key from the ring for good: the records it sealed can
        never be opened again. `in_use` are the key ids stored records still name (the
        caller asks the store: `persistence.key_usage`). Raises KeyRefused for an unknown
        or active key, one retired less than `RETIRE_GRACE_NS` ago, or one in `in_use`."""
        with self._mutex, self._locked():
            ring, _ = self._read_required()
            self._check_destroyable(ring, key_id, in_use)
            ring.keys = [entry for entry in ring.keys if entry.id != key_id]
            ring.destroyed = sorted({*ring.destroyed, key_id})
            st = _replace_private(self._ring_path, _encode_ring(ring))
            self._apply(ring, _signature(st))

    def destroyable(self, in_use: Collection[int]) -> list[int]:
        """The ids `destroy` would accept now (retired, past the grace, in no record)."""
        with self._mutex:
            self._refresh_locked(force=False)
            ring = self._ring
            found = []
            for entry in ring.keys:
                try:
                    self._check_destroyable(ring, entry.id, in_use)
                except KeyRefused:
                    continue
                found.append(entry.id)
            return found

    def refresh(self, force: bool = False) -> bool:
        """Reload the ring if its file changed (always when `force`); True if it changed."""
        with self._mutex:
            return self._refresh_locked(force)

    def describe(self) -> list[dict[str, int | bool]]:
        """The keys, oldest first, without key material: id, created_ns, active, reserved."""
        with self._mutex:
            self._refresh_locked(force=False)
            active = self._ring.keys[-1].id
            return [
                {
                    "id": k.id,
                    "created_ns": k.created_ns,
                    "active": k.id == active,
                    "reserved": k.reserved,
                }
                for k in self._ring.keys
            ]

    def kek_info(self) -> dict[str, Any]:
        """How the KEK is kept (no secret): kind, generation, scrypt parameters."""
        with self._mutex:
            self._refresh_locked(force=False)
            spec = self._ring.kek
            info: dict[str, Any] = {"kind": spec.kind, "generation": spec.gen}
            if spec.kind == "scrypt":
                info.update(n=spec.n, r=spec.r, p=spec.p)
            return info

    # -- internals --------------------------------------------------------------------

    def _sealing_key(self) -> tuple[int, AESGCM]:
        """The active key id and cipher, one encryption of its reserved block taken."""
        with self._mutex:
            self._refresh_due_locked()
            lease = self._lease
            if lease is None or lease.used >= lease.end:
                lease = self._reserve_locked()
            lease.used += 1
            return lease.key_id, self._aeads[lease.key_id][1]

    def _open(
        self,
        sealed: bytes,
        versions: tuple[int, ...],
        aad: Callable[[bytes, int], bytes],
        ref: dict[str, Any],
    ) -> bytes:
        if len(sealed) < _MIN_RECORD:
            raise TamperedRecord(
                f"sealed record of {len(sealed)} bytes is shorter than {_MIN_RECORD}", **ref
            )
        version, key_id = _HEADER.unpack_from(sealed)
        if version not in versions:
            raise TamperedRecord(f"sealed record has unknown version {version}", **ref)
        known = self._key_for(key_id, ref)
        header = bytes(sealed[: _HEADER.size])
        nonce = bytes(sealed[_HEADER.size : _HEADER.size + NONCE_BYTES])
        body = bytes(sealed[_HEADER.size + NONCE_BYTES :])
        try:
            return known.decrypt(nonce, body, aad(header, version))
        except InvalidTag:
            raise TamperedRecord(
                "sealed record failed its integrity check (altered, or stored under another "
                "message, sender or place)",
                key_id=key_id,
                **ref,
            ) from None

    def _key_for(self, key_id: int, ref: dict[str, Any]) -> AESGCM:
        with self._mutex:
            with contextlib.suppress(KeyFileError):  # a key destroyed elsewhere goes in 1 s
                self._refresh_due_locked()
            known = self._aeads.get(key_id)
            if known is None:
                try:
                    self._refresh_locked(force=True)
                except KeyFileError as exc:
                    raise KeyMissing(
                        f"key {key_id} is unknown and the ring cannot be reloaded: {exc}",
                        key_id=key_id,
                        **ref,
                    ) from exc
                known = self._aeads.get(key_id)
            destroyed = key_id in self._ring.destroyed
        if known is None:
            hint = (
                "it was destroyed (`plexus keys destroy`); the record cannot be opened"
                if destroyed
                else f"restore {self._dir} from backup"
            )
            raise KeyMissing(
                f"key {key_id} is not in {self._ring_path}; {hint}", key_id=key_id, **ref
            )
        return known[1]

    def _check_destroyable(self, ring: _Ring, key_id: int, in_use: Collection[int]) -> None:
        ids = [entry.id for entry in ring.keys]
        if key_id not in ids:
            raise KeyRefused(f"there is no key {key_id} in {self._ring_path}")
        position = ids.index(key_id)
        if position == len(ids) - 1:
            raise KeyRefused(
                f"key {key_id} is the active key; `plexus keys rotate` first, then destroy it"
            )
        if key_id in in_use:
            raise KeyRefused(
                f"key {key_id} still seals stored records; they must be gone first "
                "(retention, `plexus dlq purge`) before the key can be destroyed"
            )
        retired_ns = ring.keys[position + 1].created_ns
        if self._clock() - retired_ns < RETIRE_GRACE_NS:
            raise KeyRefused(
                f"key {key_id} was retired less than {RETIRE_GRACE_NS // 10**9} s ago and a "
                "running service may still seal with it; try again shortly"
            )

    def _restore_hint(self) -> str:
        return f"restore {self._dir} (HOME/keys) from backup"

    def _ensure_dir(self) -> None:
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self._dir)
        except OSError as exc:
            raise KeyFileError(f"cannot create {self._dir}: {exc.strerror}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise KeyFileError(f"{self._dir} is not a directory")
        _check_owner(self._dir, st)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{self._dir} has mode {mode:o}, open to other users; "
                f"{_chmod_hint(self._dir, '700')}"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cross-process lock that serialises changes of the ring."""
        path = self._dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            _check_private_file(path, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_ring(self) -> tuple[_Ring, _Signature] | None:
        loaded = _read_private(self._ring_path)
        if loaded is None:
            return None
        data, st = loaded
        try:
            return _decode_ring(data), _signature(st)
        except ValueError as exc:
            raise KeyFileError(
                f"{self._ring_path} is corrupt ({exc}); {self._restore_hint()}"
            ) from exc

    def _read_required(self) -> tuple[_Ring, _Signature]:
        loaded = self._read_ring()
        if loaded is None or not loaded[0].keys:
            raise KeyFileError(f"{self._ring_path} is missing or empty; {self._restore_hint()}")
        return loaded

    def _bootstrap(self, passphrase: str | None) -> None:
        self._ensure_dir()
        self._passphrase = passphrase
        with self._mutex, self._locked():
            loaded = self._read_ring()
            if loaded is None:
                for name in (KEK_FILE, SALT_FILE):
                    if (self._dir / name).exists():
                        raise KeyFileError(
                            f"{self._ring_path} is missing although {self._dir / name} exists; "
                            f"records sealed with its keys cannot be read; {self._restore_hint()}"
                        )
                ring = _Ring(self._fresh_spec(passphrase))
                _replace_private(self._ring_path, _encode_ring(ring))
            else:
                ring = loaded[0]
            if ring.keys:
                self._kek = self._unlock(ring, finish=True)
            else:
                # Nothing is wrapped yet (first open, or one that crashed half-way), so the
                # KEK can still be chosen and created.
                ring.kek = self._fresh_spec(passphrase)
                self._kek = AESGCM(self._load_kek(ring.kek, passphrase, create=True))
                ring.keys.append(self._new_key(1))
                _replace_private(self._ring_path, _encode_ring(ring))
            required = self._read_required()
            self._apply(*required)
            self._next_refresh_ns = self._clock() + REFRESH_INTERVAL_NS

    @staticmethod
    def _fresh_spec(passphrase: str | None) -> _KekSpec:
        if passphrase is None:
            return _KekSpec("file")
        return _KekSpec("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P)

    def _load_secret(self, path: Path, size: int, create: bool) -> bytes:
        loaded = _read_private(path)
        if create and (loaded is None or len(loaded[0]) != size):
            path.unlink(missing_ok=True)
            secret = os.urandom(size)
            _create_private(path, secret)
            return secret
        if loaded is None:
            raise KeyFileError(
                f"{path} is missing, so no key in {self._ring_path} can be unwrapped; "
                f"{self._restore_hint()}"
            )
        if len(loaded[0]) != size:
            raise KeyFileError(
                f"{path} holds {len(loaded[0])} bytes instead of {size}; {self._restore_hint()}"
            )
        return loaded[0]

    def _check_mode(self, spec: _KekSpec, passphrase: str | None) -> None:
        if spec.kind == "file" and passphrase is not None:
            raise KeyFileError(
                f"{PASSPHRASE_ENV} is set, but {self._ring_path} is protected by the key "
                f"file {self._dir / KEK_FILE}; unset {PASSPHRASE_ENV}"
            )
        if spec.kind == "scrypt" and passphrase is None:
            raise KeyFileError(
                f"{self._ring_path} is protected by a passphrase; set {PASSPHRASE_ENV}"
            )

    def _derive(self, spec: _KekSpec, secret: bytes) -> bytes:
        """The KEK from its file's bytes: the key itself, or scrypt(passphrase, salt)."""
        if spec.kind == "file":
            return secret
        assert self._passphrase is not None
        kdf = Scrypt(salt=secret, length=KEY_BYTES, n=spec.n, r=spec.r, p=spec.p)
        return kdf.derive(self._passphrase.encode("utf-8", "surrogateescape"))

    def _load_kek(self, spec: _KekSpec, passphrase: str | None, create: bool) -> bytes:
        self._check_mode(spec, passphrase)
        secret = self._load_secret(self._dir / spec.secret_file, spec.secret_bytes, create)
        return self._derive(spec, secret)

    def _unlock(self, ring: _Ring, finish: bool) -> AESGCM:
        """The KEK that unwraps `ring`: from its file or, after a KEK rotation that did
        not finish, from the staged `.new` file. With `finish` (the lock held) the
        rotation is completed (staged file renamed) or undone (staged file removed)."""
        spec = ring.kek
        self._check_mode(spec, self._passphrase)
        main = self._dir / spec.secret_file
        staged = main.with_name(main.name + STAGED_SUFFIX)
        probe = ring.keys[-1]
        candidates = [main]
        if staged.exists():
            candidates.append(staged)
        failure: KeyFileError | None = None
        for path in candidates:
            try:
                kek = AESGCM(self._derive(spec, self._load_secret(path, spec.secret_bytes, False)))
                self._unwrap(kek, probe)
            except KeyFileError as exc:
                failure = failure or exc
                continue
            if finish and path == staged:
                os.replace(staged, main)
                _fsync_dir(self._dir)
            elif finish and len(candidates) > 1:
                staged.unlink()
            return kek
        assert failure is not None
        raise failure

    def _unwrap(self, kek: AESGCM, entry: _KeyEntry) -> bytes:
        try:
            return kek.decrypt(entry.nonce, entry.wrapped, wrap_aad(entry.id))
        except InvalidTag:
            raise KeyFileError(
                f"key {entry.id} in {self._ring_path} cannot be unwrapped: the kek or "
                f"passphrase does not match the ring, or the ring is damaged; "
                f"{self._restore_hint()}"
            ) from None

    def _new_key(self, key_id: int) -> _KeyEntry:
        if key_id > MAX_KEY_ID:
            raise KeyFileError(f"{self._ring_path} has used up all key ids")
        assert self._kek is not None
        nonce = os.urandom(NONCE_BYTES)
        wrapped = self._kek.encrypt(nonce, AESGCM.generate_key(bit_length=256), wrap_aad(key_id))
        return _KeyEntry(key_id, self._clock(), nonce, wrapped, 0)

    def _apply(self, ring: _Ring, signature: _Signature, unlocked: bool = False) -> None:
        """Make `ring` (just read or written) the current state, unwrapping new keys
        (`unlocked`: `self._kek` already is the KEK of `ring`)."""
        assert self._kek is not None
        if not unlocked and ring.kek != self._ring.kek and self._ring.keys:
            self._kek = self._unlock(ring, finish=False)  # another process rotated the KEK
        aeads: dict[int, tuple[bytes, AESGCM]] = {}
        for entry in ring.keys:
            cached = self._aeads.get(entry.id)
            if cached is not None and cached[0] == entry.wrapped:
                aeads[entry.id] = cached
                continue
            aeads[entry.id] = (entry.wrapped, AESGCM(self._unwrap(self._kek, entry)))
        self._ring = ring
        self._aeads = aeads
        self._signature = signature
        if self._lease is not None and self._lease.key_id != ring.keys[-1].id:
            self._lease = None  # another key became active: stop using the old one

    def _refresh_due_locked(self) -> None:
        """Look for a changed ring if the last look is `REFRESH_INTERVAL_NS` old."""
        now = self._clock()
        if now >= self._next_refresh_ns:
            self._next_refresh_ns = now + REFRESH_INTERVAL_NS
            self._refresh_locked(force=False)

    def _refresh_locked(self, force: bool) -> bool:
        if not force:
            try:
                current = _signature(os.stat(self._ring_path))
            except FileNotFoundError:
                current = None
            if current is not None and current == self._signature:
                return False
        ring, signature = self._read_required()
        changed = ring != self._ring
        self._apply(ring, signature)
        return changed

    def _reserve_locked(self) -> _Lease:
        """Reserve the next block of the active key in the ring (rotating at its limit)."""
        with self._locked():
            ring = self._read_required()[0]
            active = ring.keys[-1]
            if active.reserved >= self._limit:
                active = self._new_key(active.id + 1)
                ring.keys.append(active)
            start = active.reserved
            active.reserved = min(start + self._block, self._limit)
            st = _replace_private(self._ring_path, _encode_ring(ring))
            self._apply(ring, _signature(st))
            self._lease = _Lease(active.id, start, active.reserved)
            return self._lease
