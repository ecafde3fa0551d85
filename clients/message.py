"""What an app receives: `Message` (one delivery) and `Subscription` (a stream of them)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.codec import Envelope, Stamp, pub_fields, unpack_map

Handler = Callable[["Message"], Any]


def decode_data(payload: bytes) -> Any:
    """Payloads are msgpack by convention; anything else is handed over as raw bytes."""
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception:
        return payload


def envelope_of(stamp: Stamp, header_raw: bytes, payload: bytes) -> Envelope:
    """One delivered message from its decoded stamp and the publisher's header (validated
    as docs/protocol.md §4 says); the sender comes from the stamp, never the header."""
    header = unpack_map(header_raw)
    pub = pub_fields(header)
    reply = header.get("reply")
    to = header.get("to")
    err = header.get("err")
    return Envelope(
        pub.msg_id,
        pub.topic,
        stamp.sender,
        stamp.timestamp_ns,
        stamp.seq,
        stamp.attempt,
        header.get("cid"),
        header.get("tp"),
        pub.sensitive,
        payload,
        reply if isinstance(reply, str) else None,
        to if isinstance(to, str) else None,
        err if isinstance(err, str) else None,
    )


class Receipt:
    """The acknowledgement of one delivery, shared by the messages it became.

    A message matching two subscriptions of one session is one delivery: it is acked when
    every subscription has consumed it, and nacked (retried) as soon as one fails.
    """

    __slots__ = ("_lock", "_remaining", "_settle", "done", "seq")

    def __init__(
        self, seq: int, copies: int, settle: Callable[[int, str | None, bool], None]
    ) -> None:
        self.seq = seq
        self._remaining = copies
        self._settle = settle
        self._lock = threading.Lock()
        self.done = False

    def ack(self) -> None:
        with self._lock:
            if self.done:
                return
            self._remaining -= 1
            if self._remaining > 0:
                return
            self.done = True
        self._settle(self.seq, None, True)

    def nack(self, error: str, requeue: bool = True) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        self._settle(self.seq, error or "nacked", requeue)


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message. `sender` and `timestamp` come from the broker, never the sender."""

    envelope: Envelope
    subscription_id: int
    receipt: Receipt | None = None

    def ack(self) -> None:
        """Tell the broker this message is done (automatic after a handler or `get()`)."""
        if self.receipt is not None:
            self.receipt.ack()

    def nack(self, error: str = "") -> None:
        """Ask for a redelivery later (after backoff; dead-lettered after the last retry)."""
        if self.receipt is not None:
            self.receipt.nack(error)

    def reject(self, reason: str = "") -> None:
        """This message can never be processed: dead-letter it now (reason `rejected`)."""
        if self.receipt is not None:
            self.receipt.nack(reason or "rejected by the receiver", requeue=False)

    @property
    def id(self) -> str:
        return self.envelope.msg_id.hex()

    @property
    def topic(self) -> str:
        return self.envelope.topic

    @property
    def data(self) -> Any:
        return decode_data(self.envelope.payload)

    @property
    def payload(self) -> bytes:
        return self.envelope.payload

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def timestamp(self) -> float:
        """Broker receive time, seconds since the epoch."""
        return self.envelope.timestamp_ns / 1e9

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id or self.id

    @property
    def attempt(self) -> int:
        return self.envelope.attempt

    @property
    def headers(self) -> dict[str, Any]:
        return {
            "traceparent": self.envelope.traceparent,
            "sensitive": self.envelope.sensitive,
            "seq": self.envelope.seq,
        }


@dataclass(eq=False)
class Subscription:
    """Messages matching `pattern`: read with `get()` / iteration, or pushed to `handler`.

    The local queue is bounded (`limit`); a delivery beyond it is counted in `overflowed`
    and nacked, so the broker retries it later (and dead-letters it after the last retry).
    """

    sid: int
    pattern: str
    handler: Handler | None = None
    limit: int = 100_000
    overflowed: int = 0
    durable: bool = False
    manual_ack: bool = False
    serve: bool = False
    active: bool = True
    _queue: queue.SimpleQueue[Message] = field(default_factory=queue.SimpleQueue)
    _unsubscribe: Callable[[Subscription], None] | None = None

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to `timeout` seconds (None: forever); None on timeout.

        Handing a message over acknowledges it, unless the subscription has `manual_ack`
        (then call `message.ack()` or `message.nack()`).
        """
        try:
            message = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if not self.manual_ack:
            message.ack()
        return message

    def get_nowait(self) -> Message | None:
        return self.get(timeout=0) if not self._queue.empty() else None

    def __iter__(self) -> Iterator[Message]:
        while self.active or not self._queue.empty():
            message = self.get(timeout=0.2)
            if message is not None:
                yield message

    def pending(self) -> int:
        return self._queue.qsize()

    def unsubscribe(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe(self)

    def offer(self, message: Message) -> bool:
        """Queue a delivery (I/O thread); False when the local queue is full."""
        if self._queue.qsize() >= self.limit:
            self.overflowed += 1
            message.nack("the subscriber's local queue is full")
            return False
        self._queue.put(message)
        return True
