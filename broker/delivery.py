"""Acknowledged delivery to one session: its queue, in-flight window, retries and timeouts.

Pure and clock-free: every call takes `now_ns`. The lifecycle of one delivery is

    QUEUED --pull--> IN_FLIGHT --ack--> done
                        | nack / ack timeout / detach
                        v
                     RETRY (due after backoff) --pull--> IN_FLIGHT ...
                        | attempts > 1 + retries
                        v
                     DEAD (the caller moves it to the dead-letter queue)

`Mailbox` bounds the queue by count and bytes; `offer` refuses beyond them so the caller
can dead-letter the message with reason `queue-full` instead of losing it. Every failure
(nack, ack timeout, detach) returns an `Outcome` naming what is retried, after which delay,
and what is dead, so the caller can report each (RetryScheduled, DeadLettered events).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from broker import protocol as P


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """Delivery policy; defaults documented in README ("Delivery")."""

    window: int = 256
    ack_timeout_ms: int = 30_000
    retries: int = 3
    backoff_base_ms: int = 200
    backoff_cap_ms: int = 10_000
    queue_max: int = 10_000
    queue_max_bytes: int = 64 * 2**20
    grace_ms: int = P.DEFAULT_GRACE_MS
    credit: int = 256
    """Publish credit of every session (WELCOME `credit`; 0: no flow control)."""
    flow_high: int = 5_000
    """A receiver's queue this long (at most half of `queue_max`; or at a quarter of
    `queue_max_bytes`) holds back the credit of the publishers feeding it (broker.flow) ..."""
    flow_low: int = 1_000
    """... until it is down to this (at most a quarter of the high mark; and to a sixteenth
    of `queue_max_bytes`)."""

    def backoff_ns(self, attempt: int) -> int:
        """Delay before attempt `attempt` (2, 3, ...): base * 2^(attempt-2), capped."""
        delay = self.backoff_base_ms << max(0, attempt - 2)
        return min(delay, self.backoff_cap_ms) * 1_000_000


DELIVERY_FIELDS = (
    "window",
    "ack_timeout_ms",
    "retries",
    "backoff_base_ms",
    "backoff_cap_ms",
    "queue_max",
    "queue_max_bytes",
    "grace_ms",
    "credit",
    "flow_high",
    "flow_low",
)
"""The settings `[delivery]` of the platform config (`broker.config`) may change."""


@dataclass(slots=True)
class Delivery:
    """One message on its way to one session (all its matching subscriptions at once)."""

    seq: int
    sids: bytes
    sender: str
    timestamp_ns: int
    topic: str
    msg_id: bytes
    header: bytes
    payload: bytes
    attempt: int = 1
    due_ns: int = 0
    last_error: str = ""
    stored_seq: int = 0
    """Event seq of the stored message (0: not stored, e.g. a request)."""
    durable_sids: bytes = b""
    """Packed ids of the durable subscriptions among `sids`: the store tracks the delivery
    as pending until it is acknowledged or dead-lettered (empty: not tracked)."""
    sensitive: bool = False
    size: int = field(init=False)
    """Bytes it holds in a queue (header and payload), computed once: the queue bound
    is checked on offer and pull, per message."""

    def __post_init__(self) -> None:
        self.size = len(self.header) + len(self.payload)


@dataclass(slots=True)
class Outcome:
    """Failed deliveries sorted out: retried (with the delay in ns before the next attempt,
    0 for "on resume") or dead (out of attempts: for the dead-letter queue)."""

    retried: list[tuple[Delivery, int]] = field(default_factory=list)
    dead: list[Delivery] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.retried or self.dead)


@dataclass(slots=True)
class Mailbox:
    """Queue, in-flight window and retry schedule of one session."""

    config: DeliveryConfig
    queue: deque[Delivery] = field(default_factory=deque)
    inflight: dict[int, Delivery] = field(default_factory=dict)
    retry: list[tuple[int, int, Delivery]] = field(default_factory=list)
    queued_bytes: int = 0
    auto_ack: bool = False
    """At-most-once session (HELLO `ack: false`): a delivery is done once it is sent."""

    def __len__(self) -> int:
        return len(self.queue) + len(self.inflight) + len(self.retry)

    def offer(self, delivery: Delivery) -> bool:
        """Queue a new delivery; False when the queue is full (count or bytes)."""
        if (
            len(self.queue) >= self.config.queue_max
            or self.queued_bytes + delivery.size > self.config.queue_max_bytes
        ):
            return False
        self.queue.append(delivery)
        self.queued_bytes += delivery.size
        return True

    def restore(self, delivery: Delivery) -> None:
        """Queue a delivery rebuilt from the store after a restart: it was accepted
        before the crash, so the queue bound (meant for new messages) does not apply."""
        self.queue.append(delivery)
        self.queued_bytes += delivery.size

    def pull(self, now_ns: int) -> list[Delivery]:
        """Deliveries to send now: due retries first, then the queue, up to the window."""
        room = len(self.queue) if self.auto_ack else self.config.window - len(self.inflight)
        out: list[Delivery] = []
        retry = self.retry
        while room > 0 and retry and retry[0][0] <= now_ns:
            out.append(heapq.heappop(retry)[2])
            room -= 1
        queue = self.queue
        while room > 0 and queue:
            delivery = queue.popleft()
            self.queued_bytes -= delivery.size
            out.append(delivery)
            room -= 1
        if self.auto_ack:
            return out
        deadline = now_ns + self.config.ack_timeout_ms * 1_000_000
        for delivery in out:
            delivery.due_ns = deadline
            self.inflight[delivery.seq] = delivery
        return out

    def ack(self, seq: int) -> Delivery | None:
        """The acknowledged in-flight delivery, None for an unknown seq."""
        return self.inflight.pop(seq, None)

    def nack(self, seq: int, now_ns: int, error: str) -> Outcome | None:
        """Schedule a retry of an in-flight delivery (or find it out of attempts); None
        for an unknown seq."""
        delivery = self.inflight.pop(seq, None)
        if delivery is None:
            return None
        outcome = Outcome()
        self._retry_or_dead(delivery, now_ns, error, outcome)
        return outcome

    def reject(self, seq: int, error: str) -> Delivery | None:
        """Take an in-flight delivery out for good (the receiver can never process it)."""
        delivery = self.inflight.pop(seq, None)
        if delivery is not None:
            delivery.last_error = error
        return delivery

    def expire(self, now_ns: int) -> Outcome:
        """Treat in-flight deliveries past their ack deadline as failed."""
        outcome = Outcome()
        if not self.inflight:
            return outcome
        late = [d for d in self.inflight.values() if d.due_ns <= now_ns]
        for delivery in late:
            del self.inflight[delivery.seq]
            self._retry_or_dead(delivery, now_ns, "no ack within the ack timeout", outcome)
        return outcome

    def detach(self) -> Outcome:
        """The receiver went away: in-flight deliveries are redelivered on resume, in order
        (retried with delay 0).

        That redelivery counts as an attempt (the receiver may have died of the message);
        deliveries out of attempts are dead, for the dead-letter queue.
        """
        outcome = Outcome()
        for delivery in sorted(self.inflight.values(), key=lambda d: d.seq, reverse=True):
            if delivery.attempt >= 1 + self.config.retries:
                delivery.last_error = "its receiver disconnected before acknowledging it"
                outcome.dead.append(delivery)
                continue
            delivery.attempt += 1
            self.queue.appendleft(delivery)
            self.queued_bytes += delivery.size
            outcome.retried.append((delivery, 0))
        self.inflight.clear()
        outcome.dead.reverse()
        outcome.retried.reverse()
        return outcome

    def drain(self) -> list[Delivery]:
        """Everything still held (for dead-lettering at expiry), oldest first."""
        held = sorted(
            [*self.inflight.values(), *(entry[2] for entry in self.retry), *self.queue],
            key=lambda d: d.seq,
        )
        self.inflight.clear()
        self.retry.clear()
        self.queue.clear()
        self.queued_bytes = 0
        return held

    def next_due_ns(self) -> int | None:
        """Earliest retry or ack deadline (for the caller's timer)."""
        candidates = [self.retry[0][0]] if self.retry else []
        candidates.extend(d.due_ns for d in self.inflight.values())
        return min(candidates) if candidates else None

    def _retry_or_dead(self, delivery: Delivery, now_ns: int, error: str, outcome: Outcome) -> None:
        delivery.last_error = error
        if delivery.attempt >= 1 + self.config.retries:
            outcome.dead.append(delivery)
            return
        delivery.attempt += 1
        delay = self.config.backoff_ns(delivery.attempt)
        heapq.heappush(self.retry, (now_ns + delay, delivery.seq, delivery))
        outcome.retried.append((delivery, delay))
