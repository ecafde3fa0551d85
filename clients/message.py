"""What an app receives: `Message` (one delivery) and `Subscription` (a stream of them)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from broker.codec import Envelope, Stamp, decode_stamp, pub_fields, unpack_map
from broker.protocol import MAX_HEADER_BYTES, MESSAGE_ID_BYTES

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


_PLAIN_DELIVERED_KEYS: Final = frozenset(
    {"id", "topic", "ts", "cf", "reply", "ttl_ms", "to", "err"}
)
"""Header keys the fast path takes: a plain publish, a request, a reply. Anything else
(`cid`, `tp`, `sens`, `dest`, unknown keys) needs the checks of `pub_fields`."""
_unpackb = msgpack.unpackb


def delivered_envelope(stamp_raw: bytes, header_raw: bytes, payload: bytes) -> Envelope:
    """`envelope_of(decode_stamp(stamp_raw), header_raw, payload)`, inline for the common case.

    The client's receive hot path: a well-typed stamp and a header with only the keys of
    `_PLAIN_DELIVERED_KEYS`, each well typed, decode straight into the `Envelope` (no
    `Stamp`, no `PubHeader`). Anything else, and every error, takes the slow path, so the
    result and the errors are the same either way (tests/unit/test_client_decode.py)."""
    try:
        seq, sender, timestamp_ns, attempt = _unpackb(stamp_raw, raw=False)
        if type(header_raw) is not bytes or len(header_raw) > MAX_HEADER_BYTES:
            raise ValueError
        header = _unpackb(header_raw, raw=False, max_ext_len=0, max_map_len=64, max_array_len=1024)
    except Exception:  # the slow path names the error
        header = None
    if type(header) is dict and header.keys() <= _PLAIN_DELIVERED_KEYS:
        msg_id = header.get("id")
        topic = header.get("topic")
        confirm = header.get("cf", False)
        if (
            type(seq) is int
            and type(sender) is str
            and type(timestamp_ns) is int
            and type(attempt) is int
            and attempt >= 1
            and type(msg_id) is bytes
            and len(msg_id) == MESSAGE_ID_BYTES
            and type(topic) is str
            and type(header.get("ts", 0)) is int
            and (confirm is False or confirm is True)
        ):
            reply = header.get("reply")
            to = header.get("to")
            err = header.get("err")
            return Envelope(
                msg_id,
                topic,
                sender,
                timestamp_ns,
                seq,
                attempt,
                None,
                None,
                False,
                payload,
                reply if type(reply) is str else None,
                to if type(to) is str else None,
                err if type(err) is str else None,
            )
    return envelope_of(decode_stamp(stamp_raw), header_raw, payload)


_receipts_lock: Final = threading.Lock()
"""One lock for every `Receipt` (held for a counter update: one per receipt cost a lock
allocation per delivered message)."""


class Receipt:
    """The acknowledgement of one delivery, shared by the messages it became.

    A message matching two subscriptions of one session is one delivery: it is acked when
    every subscription has consumed it, and nacked (retried) as soon as one fails.
    """

    __slots__ = ("_remaining", "_settle", "done", "seq")

    def __init__(
        self, seq: int, copies: int, settle: Callable[[int, str | None, bool], None]
    ) -> None:
        self.seq = seq
        self._remaining = copies
        self._settle = settle
        self.done = False

    def ack(self) -> None:
        with _receipts_lock:
            if self.done:
                return
            self._remaining -= 1
            if self._remaining > 0:
                return
            self.done = True
        self._settle(self.seq, None, True)

    def nack(self, error: str, requeue: bool = True) -> None:
        with _receipts_lock:
            if self.done:
                return
            self.done = True
        self._settle(self.seq, error or "nacked", requeue)


@dataclass(slots=True)
class Message:
    """One delivered message. `sender` and `timestamp` come from the broker, never the sender.

    Not frozen: one is made per delivery, and a frozen dataclass's __init__ (an
    object.__setattr__ per field) costs several times a plain one; nothing mutates it."""

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
    The I/O thread appends each loop turn's deliveries as one batch (`offer_all`: one
    notify per batch, not a wake-up per message); readers take them one at a time.
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
    _queue: deque[Message] = field(default_factory=deque)
    """Appended by the I/O thread, popped by readers (deque appends and pops are atomic);
    `_ready` is only for waiting on an empty queue."""
    _ready: threading.Condition = field(
        default_factory=lambda: threading.Condition(threading.Lock())
    )
    _unsubscribe: Callable[[Subscription], None] | None = None

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to `timeout` seconds (None: forever); None on timeout.

        Handing a message over acknowledges it, unless the subscription has `manual_ack`
        (then call `message.ack()` or `message.nack()`).
        """
        queue = self._queue
        deadline: float | None = None
        while True:
            try:
                message = queue.popleft()
            except IndexError:
                pass
            else:
                if not self.manual_ack:
                    message.ack()
                return message
            if deadline is None:
                deadline = float("inf") if timeout is None else time.monotonic() + timeout
            with self._ready:
                while not queue:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._ready.wait(None if timeout is None else left)

    def get_nowait(self) -> Message | None:
        return self.get(timeout=0) if self._queue else None

    def __iter__(self) -> Iterator[Message]:
        while self.active or self._queue:
            message = self.get(timeout=0.2)
            if message is not None:
                yield message

    def pending(self) -> int:
        return len(self._queue)

    def unsubscribe(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe(self)

    def offer(self, message: Message) -> bool:
        """Queue one delivery (I/O thread); False when the local queue is full."""
        return self.offer_all((message,)) == 0

    def offer_all(self, messages: Iterable[Message]) -> int:
        """Queue a batch of deliveries in order (I/O thread) and wake the readers once;
        each one beyond `limit` is counted in `overflowed` and nacked. Returns how many
        overflowed."""
        queue, limit = self._queue, self.limit
        overflowed = 0
        for message in messages:
            if len(queue) >= limit:
                overflowed += 1
                message.nack("the subscriber's local queue is full")
            else:
                queue.append(message)
        self.overflowed += overflowed
        with self._ready:
            self._ready.notify_all()
        return overflowed
