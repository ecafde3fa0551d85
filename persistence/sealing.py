"""What of a sensitive message or dead letter is sealed, and how it is opened again.

A sensitive message is stored with its header frame (correlation id, traceparent, every
header field beyond the topic and message id the row keeps for routing) sealed together
with its payload; a sensitive dead letter also with its error text (the receiver's NACK
reason, which may quote the payload). Both are version-2 records of the key ring, bound
to the message's seq (a dead letter's entry id), timestamp, id, sender and topic, so a
record moved to another row, message or sender fails its tag.

    message row      header b""    payload seal([header, payload])
    dead letter      header b""    payload seal([header, payload, error])    error ""

Rows and dead letters sealed before version 2 (payload alone, header and error in clear)
are still opened: the record's version byte says which form it is, and that byte is
covered by the tag.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgpack

from persistence.segments import StoredMessage
from security.keyring import (
    KIND_DEAD_LETTER,
    KIND_MESSAGE,
    RECORD_V1,
    RecordContext,
    TamperedRecord,
    record_version,
)


class Sealer(Protocol):
    def seal_record(self, context: RecordContext, plaintext: bytes) -> bytes: ...


class Opener(Protocol):
    def open_record(self, context: RecordContext, sealed: bytes) -> bytes: ...


def message_context(seq: int, ts_ns: int, sender: str, topic: str, msg_id: bytes) -> RecordContext:
    return RecordContext(KIND_MESSAGE, seq, ts_ns, msg_id, sender, topic)


def dead_letter_context(entry_id: int, fields: dict[str, Any]) -> RecordContext:
    return RecordContext(
        KIND_DEAD_LETTER,
        entry_id,
        fields["published_ns"],
        fields["msg_id"],
        fields["sender"],
        fields["topic"],
    )


def seal_message(
    sealer: Sealer, context: RecordContext, header: bytes, payload: bytes
) -> tuple[bytes, bytes]:
    """(stored header, stored payload) of a sensitive message."""
    bundle: bytes = msgpack.packb([header, payload], use_bin_type=True)
    return b"", sealer.seal_record(context, bundle)


def open_message(opener: Opener, stored: StoredMessage) -> tuple[bytes, bytes]:
    """(header, payload) of a stored message, opened when sealed (SealedRecordError)."""
    if not stored.sealed:
        return stored.header, stored.payload
    context = message_context(stored.seq, stored.ts_ns, stored.sender, stored.topic, stored.msg_id)
    plain = opener.open_record(context, stored.payload)
    if record_version(stored.payload) == RECORD_V1:
        return stored.header, plain
    header, payload = _unbundle(plain, 2, context)
    return header, payload


def seal_dead_letter(sealer: Sealer, entry_id: int, record: dict[str, Any]) -> None:
    """Seal a dead letter's header, payload and error in place (its other fields stay)."""
    bundle: bytes = msgpack.packb(
        [record["header"], record["payload"], record["error"]], use_bin_type=True
    )
    record["payload"] = sealer.seal_record(dead_letter_context(entry_id, record), bundle)
    record["header"] = b""
    record["error"] = ""
    record["sealed"] = True


def open_dead_letter(opener: Opener, entry_id: int, record: dict[str, Any]) -> dict[str, Any]:
    """A stored dead letter with header, payload and error in clear (SealedRecordError)."""
    if not record.get("sealed"):
        return record
    context = dead_letter_context(entry_id, record)
    plain = opener.open_record(context, record["payload"])
    if record_version(record["payload"]) == RECORD_V1:
        return {**record, "payload": plain}
    header, payload, error = _unbundle(plain, 3, context)
    if not isinstance(error, str):
        raise TamperedRecord("sealed dead letter holds a malformed error", **context.ref())
    return {**record, "header": header, "payload": payload, "error": error}


def _unbundle(plain: bytes, arity: int, context: RecordContext) -> list[Any]:
    """The fields of an opened bundle. It passed its tag, so only a bug makes it bad."""
    try:
        fields = msgpack.unpackb(plain, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        fields = None
    if (
        not isinstance(fields, list)
        or len(fields) != arity
        or not all(isinstance(item, bytes) for item in fields[:2])
    ):
        raise TamperedRecord("sealed record does not hold a message bundle", **context.ref())
    return fields
