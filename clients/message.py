"""What an app receives: `Message` (one delivery) and `Subscription` (a stream of them)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.codec import Envelope

Handler = Callable[["Message"], Any]


def decode_data(payload: bytes) -> Any:
    """Payloads are msgpack by convention; anything else is handed over as raw bytes."""
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception:
        return payload


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message. `sender` and `timestamp` come from the broker, never the sender."""

    envelope: Envelope
    subscription_id: int

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

    The local queue is bounded (`limit`); deliveries beyond it are counted in `overflowed`
    and logged, never dropped silently.
    """

    sid: int
    pattern: str
    handler: Handler | None = None
    limit: int = 100_000
    overflowed: int = 0
    active: bool = True
    _queue: queue.SimpleQueue[Message] = field(default_factory=queue.SimpleQueue)
    _unsubscribe: Callable[[Subscription], None] | None = None

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to `timeout` seconds (None: forever); None on timeout."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Message | None:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return None

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
            return False
        self._queue.put(message)
        return True
