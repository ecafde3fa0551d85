"""The one codec of wire protocol v1: frames in, typed values out, and back.

Every decoder treats its input as hostile: sizes are checked before msgpack sees the bytes,
msgpack runs with tight limits, and every failure raises `ProtocolViolation` with a code.
The broker routes without re-encoding: a PUB header is decoded once to validate and route,
then forwarded byte for byte beside a small broker-written stamp (sender, time, sequence).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from broker.errors import Code, ProtocolViolation
from broker.protocol import MAX_HEADER_BYTES, MESSAGE_ID_BYTES

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_ID_TEXT = 128


def pack(value: Any) -> bytes:
    """msgpack-encode `value` (bin for bytes, str for text)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_map(raw: bytes, what: str = "header", limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode an untrusted msgpack map with string keys, bounded in size and depth.

    `limit` is the most bytes accepted; peers' headers get the protocol's 8 KiB, while a
    client reading the broker's own bulky answers (STATSOK, DLQOK, WELCOME) allows more.
    """
    if not isinstance(raw, bytes):
        raise ProtocolViolation(Code.MALFORMED_FRAME, f"{what} frame is not bytes")
    if len(raw) > limit:
        raise ProtocolViolation(Code.TOO_LARGE, f"{what} is {len(raw)} bytes, limit {limit}")
    small = limit <= MAX_HEADER_BYTES
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=1024 if small else limit,
            max_map_len=64 if small else limit,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, StackError, ...)
        raise ProtocolViolation(
            Code.BAD_HEADER, f"{what} is not valid msgpack: {type(exc).__name__}"
        ) from None
    if not isinstance(value, dict) or not all(type(key) is str for key in value):
        raise ProtocolViolation(Code.BAD_HEADER, f"{what} must be a msgpack map with str keys")
    return value


def _optional_text(header: dict[str, Any], key: str) -> str | None:
    value = header.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_ID_TEXT:
        raise ProtocolViolation(
            Code.BAD_HEADER, f"header field {key!r} must be a string ≤ {_MAX_ID_TEXT} chars"
        )
    return value


def required_int(header: dict[str, Any], key: str, low: int, high: int) -> int:
    """Field `key` as an int within [low, high], else BAD_HEADER."""
    value = header.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolViolation(
            Code.BAD_HEADER, f"header field {key!r} must be an integer in [{low}, {high}]"
        )
    return value


def required_text(header: dict[str, Any], key: str) -> str:
    """Field `key` as a string, else BAD_HEADER."""
    value = header.get(key)
    if not isinstance(value, str):
        raise ProtocolViolation(Code.BAD_HEADER, f"header field {key!r} must be a string")
    return value


@dataclass(slots=True)
class PubHeader:
    """What the broker needs from a PUB header to route it.

    Not frozen, like `Stamp` and `Envelope`: one is made per message, and a frozen
    dataclass's __init__ (object.__setattr__ per field) cost 2 µs of the broker's
    per-message budget here; nothing hashes or mutates them."""

    msg_id: bytes
    topic: str
    confirm: bool = False
    dest: str | None = None
    """Direct send: only subscriptions of this app id receive the message."""
    sensitive: bool = False
    """Stored only encrypted (header `sens`)."""
    correlation_id: str = ""
    """Header `cid` ("" when absent): joins a message to its conversation in the events."""
    traceparent: str = ""
    """Header `tp` ("" when absent): the W3C trace context, reported in the events."""


_PLAIN_PUB_KEYS = frozenset({"id", "topic", "ts", "cf"})
"""The header of a plain publish (what the client sends unless asked for more)."""


def decode_pub_header(raw: bytes) -> PubHeader:
    """Validate a PUB header (topic validity is the router's job: it caches it).

    The broker's hot path: a plain header (only `id`, `topic`, `ts`, `cf`, each well
    typed) is checked inline, about a third of the full check's cost; anything else, and
    every error, takes the full path (`unpack_map` and `pub_fields`), so the result and
    the errors are the same either way (tests/unit/test_codec.py)."""
    if type(raw) is bytes and len(raw) <= MAX_HEADER_BYTES:
        try:
            value = msgpack.unpackb(
                raw, raw=False, max_ext_len=0, max_map_len=64, max_array_len=1024
            )
        except Exception:  # the full path names the error
            value = None
        if type(value) is dict and value.keys() <= _PLAIN_PUB_KEYS:
            msg_id = value.get("id")
            topic = value.get("topic")
            confirm = value.get("cf", False)
            if (
                type(msg_id) is bytes
                and len(msg_id) == MESSAGE_ID_BYTES
                and type(topic) is str
                and type(value.get("ts", 0)) is int
                and (confirm is False or confirm is True)
            ):
                return PubHeader(msg_id, topic, confirm)
    return pub_fields(unpack_map(raw))


def pub_fields(header: dict[str, Any]) -> PubHeader:
    """Check the fields of a decoded PUB header."""
    msg_id = header.get("id")
    if not isinstance(msg_id, bytes) or len(msg_id) != MESSAGE_ID_BYTES:
        raise ProtocolViolation(
            Code.BAD_HEADER, f"header field 'id' must be {MESSAGE_ID_BYTES} bytes (bin)"
        )
    topic = required_text(header, "topic")
    correlation_id = _optional_text(header, "cid")
    traceparent = _optional_text(header, "tp")
    if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent):
        raise ProtocolViolation(Code.BAD_HEADER, "header field 'tp' is not a W3C traceparent")
    sensitive = header.get("sens", False)
    if not isinstance(sensitive, bool):
        raise ProtocolViolation(Code.BAD_HEADER, "header field 'sens' must be a boolean")
    client_ts = header.get("ts", 0)
    if type(client_ts) is not int:
        raise ProtocolViolation(Code.BAD_HEADER, "header field 'ts' must be an integer")
    confirm = header.get("cf", False)
    if not isinstance(confirm, bool):
        raise ProtocolViolation(Code.BAD_HEADER, "header field 'cf' must be a boolean")
    dest = _optional_text(header, "dest")
    return PubHeader(
        msg_id, topic, confirm, dest, sensitive, correlation_id or "", traceparent or ""
    )


def encode_pub_header(
    msg_id: bytes,
    topic: str,
    correlation_id: str | None = None,
    traceparent: str | None = None,
    sensitive: bool = False,
    client_ts_ns: int | None = None,
    confirm: bool = False,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The header a client sends with each published payload."""
    header: dict[str, Any] = {"id": msg_id, "topic": topic}
    if correlation_id is not None:
        header["cid"] = correlation_id
    if traceparent is not None:
        header["tp"] = traceparent
    if sensitive:
        header["sens"] = True
    if confirm:
        header["cf"] = True
    header["ts"] = client_ts_ns if client_ts_ns is not None else time.time_ns()
    if extra:
        header.update(extra)
    return pack(header)


@dataclass(slots=True)
class Stamp:
    """What the broker vouches for about a delivered message (never taken from the client)."""

    seq: int
    sender: str
    timestamp_ns: int
    attempt: int


_stamp_packer = msgpack.Packer(use_bin_type=True)
"""Reused for stamps (ints and one str, no user callbacks): saves a Packer per message."""


def encode_stamp(seq: int, sender: str, timestamp_ns: int, attempt: int = 1) -> bytes:
    return _stamp_packer.pack([seq, sender, timestamp_ns, attempt])  # type: ignore[no-any-return]


def decode_stamp(raw: bytes) -> Stamp:
    try:
        seq, sender, ts, attempt = msgpack.unpackb(raw, raw=False)
    except Exception:
        raise ProtocolViolation(Code.MALFORMED_FRAME, "bad DELIVER stamp") from None
    if not (
        type(seq) is int
        and isinstance(sender, str)
        and type(ts) is int
        and type(attempt) is int
        and attempt >= 1
    ):
        raise ProtocolViolation(Code.MALFORMED_FRAME, "bad DELIVER stamp fields")
    return Stamp(seq, sender, ts, attempt)


def encode_sids(sids: tuple[int, ...]) -> bytes:
    return pack(list(sids))


def decode_sids(raw: bytes) -> list[int]:
    try:
        sids = msgpack.unpackb(raw)
    except Exception:
        raise ProtocolViolation(Code.MALFORMED_FRAME, "bad DELIVER sids") from None
    if not isinstance(sids, list) or not all(type(s) is int for s in sids):
        raise ProtocolViolation(Code.MALFORMED_FRAME, "DELIVER sids must be integers")
    return sids


@dataclass(slots=True)
class Envelope:
    """One delivered message as a client sees it: header fields, broker stamp, payload."""

    msg_id: bytes
    topic: str
    sender: str
    timestamp_ns: int
    seq: int
    attempt: int
    correlation_id: str | None
    traceparent: str | None
    sensitive: bool
    payload: bytes
    reply_to: str | None = None
    """Reply id of a request (header `reply`): the responder answers `to` it."""
    in_reply_to: str | None = None
    """On a reply: the reply id of the request it answers (header `to`)."""
    error: str | None = None
    """On a reply: the responder's failure, instead of a result (header `err`)."""


def decode_envelope(stamp_raw: bytes, header_raw: bytes, payload: bytes) -> Envelope:
    """Decode one delivered message; the sender comes from the stamp, never the header."""
    stamp = decode_stamp(stamp_raw)
    header = unpack_map(header_raw)
    pub = pub_fields(header)
    return Envelope(
        msg_id=pub.msg_id,
        topic=pub.topic,
        sender=stamp.sender,
        timestamp_ns=stamp.timestamp_ns,
        seq=stamp.seq,
        attempt=stamp.attempt,
        correlation_id=header.get("cid"),
        traceparent=header.get("tp"),
        sensitive=bool(header.get("sens", False)),
        payload=payload,
        reply_to=header.get("reply") if isinstance(header.get("reply"), str) else None,
        in_reply_to=header.get("to") if isinstance(header.get("to"), str) else None,
        error=header.get("err") if isinstance(header.get("err"), str) else None,
    )


_POOL_BYTES = 4096


class MessageIdGenerator:
    """Time-ordered unique 16-byte ids (UUIDv7 layout): 48-bit ms time, 74 random bits.

    Within one millisecond a counter in the random field keeps ids strictly increasing,
    so ids from one process sort in creation order. The random bits come from a pool
    refilled with `os.urandom` 4 KiB at a time: `os.urandom` releases the GIL, and a
    publishing thread that gives the GIL to the client's I/O thread per message waited
    for it back (16 µs per publish measured, half the cost of `Bus.publish`). A forked
    child starts a pool of its own, so parent and child never share random bits.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._pool = b""
        self._offset = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget_pool)

    def _forget_pool(self) -> None:
        self._lock = threading.Lock()
        self._pool, self._offset = b"", 0

    def _random(self, size: int) -> int:
        """`size` random bytes as an int, from the pool (under the lock)."""
        if self._offset + size > len(self._pool):
            self._pool, self._offset = os.urandom(_POOL_BYTES), 0
        start = self._offset
        self._offset = start + size
        return int.from_bytes(self._pool[start : start + size], "big")

    def new(self) -> bytes:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
                self._counter += 1
                if self._counter > 0xFFF:  # 4096 ids in one ms: borrow the next ms
                    ms = self._last_ms = ms + 1
                    self._counter = 0
            else:
                self._last_ms = ms
                self._counter = self._random(2) & 0x3FF
            counter = self._counter & 0xFFF
            rand = self._random(8) & 0x3FFFFFFFFFFFFFFF
        value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
        return value.to_bytes(MESSAGE_ID_BYTES, "big")


new_message_id = MessageIdGenerator().new
