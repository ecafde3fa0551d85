"""Event stream v2: every event the broker reports, as a typed frozen record.

Persistence, audit, tracing and the gateway consume the stream; this module is the one
definition of what they read. An event travels as one msgpack array
`[seq, kind, ts_ns, field…]` with the fields of its record in declaration order, and a
batch is `[EV, head, blob]`: `head` is 18 bytes (schema version u16, epoch u64, first seq
u64, big-endian), `blob` the events concatenated. Consumers never index fields by
position: `decode_events` gives records, each checked field by field against its type, and
an unknown kind, a wrong arity or a wrong type is a malformed batch (ProtocolViolation).

`ts_ns` is the broker's wall clock (for `Published` the message's broker timestamp).
Sessions are named by (app, session); `sids` fields are packed msgpack arrays of ints as
in a DELIVER frame; message ids are 16 bytes.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

import msgpack

from broker.errors import Code, ProtocolViolation

EV: Final = b"EV"
"""PUB topic frame (and EVDATA frame) of an event batch."""

SCHEMA_VERSION: Final = 2
_HEAD = struct.Struct(">HQQ")
HEAD_BYTES: Final = _HEAD.size
_packer = msgpack.Packer(use_bin_type=True)

Target = list[Any]
"""[app, session, sids]: a session a message was queued for through durable subscriptions."""


@dataclass(frozen=True, slots=True)
class Published:
    """A publish the broker accepted (not a duplicate), or a broker notice."""

    KIND: ClassVar[int] = 1
    sender: str
    session: str
    topic: str
    msg_id: bytes
    correlation_id: str
    traceparent: str
    sensitive: bool
    header: bytes
    payload: bytes
    targets: list[Target]
    """The durable deliveries the store tracks as pending until acked or dead."""


@dataclass(frozen=True, slots=True)
class Subscribed:
    KIND: ClassVar[int] = 2
    app: str
    session: str
    sid: int
    pattern: str
    durable: bool
    serve: bool


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """A subscription ended: `reason` is "unsubscribe", "session-ended" or "expired"."""

    KIND: ClassVar[int] = 3
    app: str
    session: str
    sid: int
    durable: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Acked:
    """One ACK command: `msg_ids` of every delivery it finished; `stored_seqs` the
    `Published` seqs among them tracked for durable subscriptions."""

    KIND: ClassVar[int] = 4
    app: str
    session: str
    stored_seqs: list[int]
    msg_ids: list[bytes]


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """A delivery moved to the dead-letter queue (`stored_seq` 0: it was not tracked)."""

    KIND: ClassVar[int] = 5
    entry_id: int
    app: str
    session: str
    reason: str
    attempts: int
    error: str
    stored_seq: int
    sender: str
    published_ns: int
    topic: str
    msg_id: bytes
    sensitive: bool
    header: bytes
    payload: bytes
    sids: bytes


@dataclass(frozen=True, slots=True)
class DlqReplayed:
    """A dead letter delivered again; `stored_seq`/`sids` tracked as pending again."""

    KIND: ClassVar[int] = 6
    entry_id: int
    app: str
    session: str
    stored_seq: int
    sids: bytes
    actor: str


@dataclass(frozen=True, slots=True)
class DlqPurged:
    """Entries purged (`actor` the operator's identity, or "$broker" for a full DLQ)."""

    KIND: ClassVar[int] = 7
    entry_ids: list[int]
    actor: str


@dataclass(frozen=True, slots=True)
class Routed:
    """Where an accepted message (publish, request or reply) was queued: [app, session]."""

    KIND: ClassVar[int] = 8
    msg_id: bytes
    sender: str
    topic: str
    to: list[list[str]]


@dataclass(frozen=True, slots=True)
class DeliveryAttempted:
    """One DELIVER sent to a session: [msg_id, attempt, delivery seq] of each message."""

    KIND: ClassVar[int] = 9
    app: str
    session: str
    items: list[list[Any]]


@dataclass(frozen=True, slots=True)
class Nacked:
    """A receiver refused a delivery (`requeue` False: rejected, no retry)."""

    KIND: ClassVar[int] = 10
    app: str
    session: str
    msg_id: bytes
    attempt: int
    reason: str
    requeue: bool


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """A failed delivery (nack, ack timeout, receiver gone) will be tried again."""

    KIND: ClassVar[int] = 11
    app: str
    session: str
    msg_id: bytes
    attempt: int
    due_in_ms: int
    reason: str


SESSION_CHANGES: Final = ("opened", "resumed", "taken-over", "detached", "expired", "closed")


@dataclass(frozen=True, slots=True)
class SessionChanged:
    """A session's life: `change` one of SESSION_CHANGES; `reason` says why."""

    KIND: ClassVar[int] = 12
    app: str
    session: str
    change: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """A connection the broker's ZAP handler refused, or a live connection whose
    credential was revoked or whose HELLO claimed another identity: `code` the refusal
    (unknown-key, foreign-process, expired, wrong-user, not-admitted-here,
    identity-mismatch), `claimed` the identity the credential or HELLO named, `pid` the
    connecting process as the kernel gave it (0: not known, e.g. TCP)."""

    KIND: ClassVar[int] = 13
    app: str
    address: str
    mechanism: str
    reason: str
    code: str
    claimed: str
    pid: int


@dataclass(frozen=True, slots=True)
class Denied:
    """A refused request: `action` publish|subscribe|request|serve|reply|command, the
    `target` topic, pattern or command, the error `code`, and the message's correlation id."""

    KIND: ClassVar[int] = 14
    app: str
    session: str
    action: str
    target: str
    code: int
    reason: str
    correlation_id: str


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The supervisor's report of an app or service: launch, exit, crash, restart,
    limit-kill, hang-kill, fatal, ... (`details` as the supervisor gave them)."""

    KIND: ClassVar[int] = 15
    app: str
    change: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ConsumerSkipped:
    """A consumer fell behind the broker's retention bound: events `first`..`last` are
    no longer retained for it. Recorded so the gap is never silent."""

    KIND: ClassVar[int] = 16
    consumer: str
    first: int
    last: int
    reason: str


EventRecord = (
    Published
    | Subscribed
    | Unsubscribed
    | Acked
    | DeadLettered
    | DlqReplayed
    | DlqPurged
    | Routed
    | DeliveryAttempted
    | Nacked
    | RetryScheduled
    | SessionChanged
    | AuthFailed
    | Denied
    | Lifecycle
    | ConsumerSkipped
)

RECORDS: Final[dict[int, type[Any]]] = {
    cls.KIND: cls
    for cls in (
        Published,
        Subscribed,
        Unsubscribed,
        Acked,
        DeadLettered,
        DlqReplayed,
        DlqPurged,
        Routed,
        DeliveryAttempted,
        Nacked,
        RetryScheduled,
        SessionChanged,
        AuthFailed,
        Denied,
        Lifecycle,
        ConsumerSkipped,
    )
}

_PYTYPES: Final = {"str": str, "int": int, "bool": bool, "bytes": bytes}


def _checks(cls: type[Any]) -> tuple[tuple[str, type[Any]], ...]:
    """(field name, Python type) of a record, from its annotations (lists and dicts are
    checked as list and dict)."""
    out: list[tuple[str, type[Any]]] = []
    for item in fields(cls):
        text = str(item.type)
        base = text.split("[", 1)[0]
        if base in _PYTYPES:
            out.append((item.name, _PYTYPES[base]))
        elif base in ("list", "Target") or text.startswith("list"):
            out.append((item.name, list))
        elif base == "dict":
            out.append((item.name, dict))
        else:
            raise TypeError(f"{cls.__name__}.{item.name}: unsupported type {text}")
    return tuple(out)


_FIELD_CHECKS: Final = {kind: _checks(cls) for kind, cls in RECORDS.items()}
_GETTERS: Final[dict[int, Callable[[Any], Any]]] = {
    kind: operator.attrgetter(*(name for name, _ in checks))
    for kind, checks in _FIELD_CHECKS.items()
}
"""Per kind, one C-level getter of every field (a tuple): the producer's encode stays cheap."""


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded event: its place in the stream and its typed record."""

    seq: int
    ts_ns: int
    record: EventRecord

    @property
    def kind(self) -> int:
        return self.record.KIND


def values(record: EventRecord) -> list[Any]:
    """The record's fields in declaration order (its wire form after seq, kind, ts)."""
    got = _GETTERS[record.KIND](record)
    return list(got) if isinstance(got, tuple) else [got]


def encode_event(seq: int, ts_ns: int, record: EventRecord) -> bytes:
    return _packer.pack([seq, record.KIND, ts_ns, *values(record)])  # type: ignore[no-any-return]


def encode_fields(seq: int, kind: int, ts_ns: int, field_values: tuple[Any, ...]) -> bytes:
    """The producer's fast path: one event from its record's field values in declaration
    order, without building the record (the broker's per-message kinds: Published, Routed,
    DeliveryAttempted). Encodes exactly what `encode_event` encodes for the same record."""
    return _packer.pack((seq, kind, ts_ns, *field_values))  # type: ignore[no-any-return]


def batch_head(epoch: int, first_seq: int) -> bytes:
    return _HEAD.pack(SCHEMA_VERSION, epoch, first_seq)


def decode_head(raw: bytes) -> tuple[int, int]:
    """(epoch, first seq) of a batch; ProtocolViolation if it is not a v2 head."""
    if len(raw) != _HEAD.size:
        raise ProtocolViolation(
            Code.MALFORMED_FRAME, f"event batch head must be {_HEAD.size} bytes"
        )
    version, epoch, first = _HEAD.unpack(raw)
    if version != SCHEMA_VERSION:
        raise ProtocolViolation(
            Code.UNSUPPORTED_VERSION,
            f"event schema {version}, this consumer reads {SCHEMA_VERSION}",
        )
    return int(epoch), int(first)


def decode_record(kind: Any, raw_fields: list[Any]) -> EventRecord:
    """The record of one event; ProtocolViolation on an unknown kind or a bad field."""
    checks = _FIELD_CHECKS.get(kind) if type(kind) is int else None
    if checks is None:
        raise ProtocolViolation(Code.MALFORMED_FRAME, f"unknown event kind {kind!r}")
    if len(raw_fields) != len(checks):
        raise ProtocolViolation(
            Code.MALFORMED_FRAME, f"event kind {kind} takes {len(checks)} fields"
        )
    for (name, expected), value in zip(checks, raw_fields, strict=True):
        if type(value) is not expected:
            raise ProtocolViolation(
                Code.MALFORMED_FRAME,
                f"event kind {kind} field {name!r} must be {expected.__name__}",
            )
    record: EventRecord = RECORDS[kind](*raw_fields)
    return record


def decode_events(blob: bytes) -> list[Event]:
    """The events of one batch, in order; ProtocolViolation on anything malformed."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(blob), 1024))
    unpacker.feed(blob)
    items: list[Any] = []
    end = 0
    try:
        for item in unpacker:
            items.append(item)
            end = unpacker.tell()
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolViolation(
            Code.MALFORMED_FRAME, f"event batch is not msgpack: {type(exc).__name__}"
        ) from None
    if end != len(blob):
        raise ProtocolViolation(Code.MALFORMED_FRAME, "event batch is truncated")
    events: list[Event] = []
    for item in items:
        if not (
            isinstance(item, list)
            and len(item) >= 3
            and type(item[0]) is int
            and type(item[2]) is int
        ):
            raise ProtocolViolation(Code.MALFORMED_FRAME, "an event must be [seq, kind, ts, …]")
        build = _BUILDERS.get(item[1]) if type(item[1]) is int else None
        event = build(item) if build is not None else None
        if event is None:  # the slow path names what is wrong
            event = Event(item[0], item[2], decode_record(item[1], item[3:]))
        events.append(event)
    return events


def _builder(kind: int) -> Any:
    """A function [seq, kind, ts, field…] -> Event, or None when a field's type or the
    arity is wrong: the checks of `decode_record` and both constructors fused into one
    generated function (decoding is the hot path of every consumer; the frozen
    dataclasses' own __init__ and the generic check loop cost twice as much)."""
    checks = _FIELD_CHECKS[kind]
    names = [f"f{i}" for i in range(len(checks))]
    spec: dict[str, Any] = {"new": object.__new__, "sa": object.__setattr__}
    spec |= {"Record": RECORDS[kind], "Event": Event}
    spec |= {f"T{i}": expected for i, (_, expected) in enumerate(checks)}
    lines = [
        "def build(item):",
        f"    if len(item) != {3 + len(checks)}:",
        "        return None",
        f"    seq, _kind, ts, {', '.join(names)}, = item" if names else "    seq, _kind, ts = item",
    ]
    if names:
        typed = " and ".join(f"type(f{i}) is T{i}" for i in range(len(checks)))
        lines += [f"    if not ({typed}):", "        return None"]
    lines.append("    record = new(Record)")
    lines += [f"    sa(record, {name!r}, f{i})" for i, (name, _) in enumerate(checks)]
    lines += [
        "    event = new(Event)",
        "    sa(event, 'seq', seq)",
        "    sa(event, 'ts_ns', ts)",
        "    sa(event, 'record', record)",
        "    return event",
    ]
    exec("\n".join(lines), spec)  # noqa: S102 (code built here from our own field lists)
    return spec["build"]


_BUILDERS: Final = {kind: _builder(kind) for kind in RECORDS}
