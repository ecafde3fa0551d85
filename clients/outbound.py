"""What an app sends, encoded once for both drivers (`Bus` and `AsyncBus`).

Local checks come first, so a bad topic or an oversized message is refused with a
`ProtocolError` before anything is queued (one bad message never costs its batch).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from broker.errors import Code, WireError
from broker.topics import pattern_tokens, validate_topic
from broker.wire import Reply, Request
from clients.errors import DeliveryError, ProtocolError
from clients.message import Message


def _checked(check: Callable[[str], object], text: str) -> None:
    """Run a topic or pattern check locally; its failure as the client's ProtocolError."""
    try:
        check(text)
    except WireError as exc:
        raise ProtocolError(exc.detail, int(exc.code)) from None


def checked_pattern(pattern: str) -> None:
    _checked(pattern_tokens, pattern)


_VALID_TOPICS: set[str] = set()
_VALID_TOPICS_MAX = 4096
"""Topics already found valid: an app publishes on few topics, many times each."""


def _checked_topic(topic: str) -> None:
    if type(topic) is str and topic in _VALID_TOPICS:
        return
    _checked(validate_topic, topic)
    if len(_VALID_TOPICS) >= _VALID_TOPICS_MAX:
        _VALID_TOPICS.clear()
    _VALID_TOPICS.add(topic)


def _within_limits(header: bytes, payload: bytes) -> None:
    if len(payload) > P.MAX_PAYLOAD_BYTES or len(header) > P.MAX_HEADER_BYTES:
        raise ProtocolError(
            f"message of {len(payload)} bytes (header {len(header)}) exceeds the limits",
            int(Code.TOO_LARGE),
            f"keep payloads ≤ {P.MAX_PAYLOAD_BYTES} bytes; store big data elsewhere",
        )


def encoded_publish(
    topic: str,
    data: Any,
    correlation_id: str | None = None,
    traceparent: str | None = None,
    sensitive: bool = False,
    to: str | None = None,
) -> tuple[bytes, bytes, bytes]:
    """(msg_id, header, payload) of one publish; every publish asks for a CONFIRM."""
    _checked_topic(topic)
    msg_id = new_message_id()
    header = encode_pub_header(
        msg_id,
        topic,
        correlation_id,
        traceparent,
        sensitive,
        confirm=True,
        extra={"dest": to} if to is not None else None,
    )
    payload = pack(data)
    _within_limits(header, payload)
    return msg_id, header, payload


def request_record(
    topic: str, data: Any, timeout: float, correlation_id: str | None = None
) -> Request:
    """A REQ with a fresh unguessable reply id (128 random bits) and `ttl_ms` = timeout."""
    _checked(validate_topic, topic)
    record = Request.build(
        new_message_id(),
        topic,
        secrets.token_hex(16),
        max(1, int(timeout * 1000)),
        pack(data),
        correlation_id,
    )
    _within_limits(record.header_raw, record.payload)
    return record


def reply_record(request: Message, result: Any, error: str | None) -> Reply:
    """A responder's REP to `request`: the result, or (`error`) the failure and nil."""
    return Reply.build(
        new_message_id(),
        request.topic,
        request.envelope.reply_to or "",
        pack(result),
        error,
        request.correlation_id,
    )


def checked_reply(message: Message) -> Message:
    """The reply, or the responder's failure as a `DeliveryError`."""
    if message.envelope.error is not None:
        raise DeliveryError(
            f"the responder {message.sender!r} failed: {message.envelope.error}",
            hint="see the responder's log",
        )
    return message
