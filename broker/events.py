"""The broker's event stream: numbering, batching, and retention for several consumers.

Every event (broker.event_records) gets the next broker sequence number, contiguous from 1
across restarts with persistence on (a restarted broker continues after the store's
watermark). Events leave in batches on the PUB socket as `[EV, head, blob]` and, for a
consumer that saw a gap, the same layout over its DEALER link (EVDATA).

Why retention: PUB/SUB drops under its high-water mark and a slow joiner misses the first
batches, so each consumer (persistence, audit, tracing, the gateway: platform identities)
has its own cursor, moved by EVSYNC and EVACK, and fetches missed ranges. The log keeps an
event until every registered consumer has passed it, bounded by count and bytes. A
consumer other than the confirming one (`$persistence`) that falls behind the bound is
skipped: its cursor moves past the dropped range and `trim` reports the range, so the
caller records it (ConsumerSkipped) and alerts - never silently. The confirming consumer
is never skipped: when it is `backpressure_bytes` behind, `full` makes the broker refuse
new publishes (refused, not lost), and its cursor alone releases the held CONFIRMs.

Nobody registered (and nobody expected from the start): events are numbered but never
encoded, the cheap path of `--no-persistence` without consumers.

While a starting broker waits for persistence to tell it where the stream stands
(`waiting`), events are kept unnumbered and numbered on `resume()`, right after the
store's watermark.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

from broker.event_records import (
    EV,
    RECORDS,
    EventRecord,
    batch_head,
    encode_event,
    encode_fields,
)

_EARLY_LIMIT: Final = 10_000


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Retention bounds of the event stream."""

    max_events: int = 2_000_000
    max_bytes: int = 512 * 2**20
    """Retained for consumers behind: beyond either bound the laggards are skipped."""
    backpressure_bytes: int = 512 * 2**20
    """The confirming consumer (persistence) this far behind: publishes are refused."""


@dataclass(slots=True)
class PendingConfirm:
    seq: int
    peer: bytes
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class Skip:
    """A consumer skipped past events `first`..`last` (dropped by the retention bound)."""

    consumer: str
    first: int
    last: int


class EventLog:
    """Numbers events, batches them for publishing, retains them for every consumer.

    `consumers`: expected from the start (registered before their first EVSYNC, so nothing
    is dropped before they connect); `confirm_by`: the consumer whose watermark means
    "stored and synced" (None: confirms go out at once).
    """

    def __init__(
        self,
        epoch: int,
        consumers: tuple[str, ...] = (),
        confirm_by: str | None = None,
        limits: StreamLimits | None = None,
        waiting: bool = False,
    ) -> None:
        self.epoch = epoch
        self.limits = limits or StreamLimits()
        self.confirm_by = confirm_by
        self.last_seq = 0
        self.cursors: dict[str, int] = dict.fromkeys(consumers, 0)
        """Each registered consumer's watermark: everything up to it is taken."""
        if confirm_by is not None:
            self.cursors.setdefault(confirm_by, 0)
        self.active = bool(self.cursors)
        """Some consumer is registered: events are encoded (else only numbered)."""
        self.waiting = waiting
        self._early: list[tuple[int, EventRecord]] = []
        self.early_dropped = 0
        self._batch: list[bytes] = []
        self._batch_first = 0
        self.batch_started_ns = 0
        """Monotonic time the unsent batch was first seen by `batch_due` (0: not yet)."""
        self.sent_through = 0
        """Seq of the last event handed out in a batch (`take_batch`)."""
        self._raws: list[bytes] = []
        self._ends: list[int] = []
        """Cumulative bytes up to and including each retained event (backlog in O(1))."""
        self._head = 0
        """Index in _raws of the oldest live retained event."""
        self._first_seq = 1
        """Seq of _raws[0]."""
        self._confirms: list[PendingConfirm] = []
        """Held CONFIRMs in seq order (a resend's confirm may wait on an older seq)."""

    # -- numbering ---------------------------------------------------------------------------

    def start_after(self, seq: int) -> None:
        """Continue numbering after `seq` (the store's watermark after a restart): nothing
        at or before it is this broker's to keep, for any consumer."""
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        self._raws.clear()
        self._ends.clear()
        self._head = 0
        self._first_seq = seq + 1
        for name, cursor in self.cursors.items():
            self.cursors[name] = max(cursor, seq)

    def resume(self) -> None:
        """The stream's position is known: number what was appended while waiting."""
        self.waiting = False
        early, self._early = self._early, []
        for ts_ns, record in early:
            self.append(ts_ns, record)

    def append(self, ts_ns: int, record: EventRecord) -> int:
        """Number one event (and encode and retain it when some consumer is registered)."""
        if self.waiting:
            if len(self._early) < _EARLY_LIMIT:
                self._early.append((ts_ns, record))
            else:
                self.early_dropped += 1
            return 0
        self.last_seq += 1
        if self.active:
            self._keep(encode_event(self.last_seq, ts_ns, record))
        return self.last_seq

    def append_fields(self, kind: int, ts_ns: int, field_values: tuple[object, ...]) -> int:
        """`append` for the per-message kinds, from field values in record order (the
        caller checks `active` first and builds nothing when it is False)."""
        if self.waiting:
            record: EventRecord = RECORDS[kind](*field_values)
            return self.append(ts_ns, record)
        self.last_seq += 1
        self._keep(encode_fields(self.last_seq, kind, ts_ns, field_values))
        return self.last_seq

    def _keep(self, raw: bytes) -> None:
        if not self._batch:
            self._batch_first = self.last_seq
        self._batch.append(raw)
        self._raws.append(raw)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(raw))

    # -- batches -----------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self._batch)

    def batch_due(self, now_ns: int, max_age_ns: int, max_events: int) -> bool:
        """Whether the unsent events should go now (old enough or enough of them)."""
        if not self._batch:
            return False
        if not self.batch_started_ns:
            self.batch_started_ns = now_ns
        return now_ns - self.batch_started_ns >= max_age_ns or len(self._batch) >= max_events

    def confirmer_idle(self) -> bool:
        """Unsent events hold CONFIRMs and the confirming consumer has taken everything
        sent so far: it is idle (not committing), so the batch should go now.

        This is the broker's half of group commit: a lone confirmed publish goes out at
        once, and what arrives while the consumer commits waits for its EVACK and then
        goes as one batch (the Nagle rule with an immediate acknowledgement)."""
        confirm_by = self.confirm_by
        return (
            bool(self._batch)
            and bool(self._confirms)
            and confirm_by is not None
            and self.cursors[confirm_by] >= self.sent_through
        )

    def take_batch(self) -> list[bytes] | None:
        """The frames of the events appended since the last call, or None."""
        if not self._batch:
            return None
        frames = [EV, batch_head(self.epoch, self._batch_first), b"".join(self._batch)]
        self.sent_through = self._batch_first + len(self._batch) - 1
        self._batch = []
        self.batch_started_ns = 0
        return frames

    # -- retention ---------------------------------------------------------------------------

    @property
    def retained(self) -> int:
        return len(self._raws) - self._head

    @property
    def backlog_bytes(self) -> int:
        """Bytes retained for the consumers (all of them)."""
        return self._bytes_after(self._first_seq - 1 + self._head)

    def _bytes_after(self, seq: int) -> int:
        """Retained bytes of events after `seq`."""
        ends = self._ends
        if not ends:
            return 0
        index = seq - self._first_seq
        if index < self._head:
            index = self._head - 1
        before = ends[index] if index >= 0 else 0
        return ends[-1] - before

    @property
    def watermark(self) -> int:
        """The confirming consumer's cursor (stored and synced); the last seq without one."""
        if self.confirm_by is None:
            return self.last_seq
        return self.cursors[self.confirm_by]

    @property
    def full(self) -> bool:
        """Persistence is so far behind that new publishes must wait (refused, not lost)."""
        confirm_by = self.confirm_by
        if confirm_by is None:
            return False
        return self._bytes_after(self.cursors[confirm_by]) >= self.limits.backpressure_bytes

    def oldest_available(self) -> int:
        """The first seq `since` can still send (retained, or the next one)."""
        return self._first_seq + self._head if self.retained else self.last_seq + 1

    def since(self, first: int, max_bytes: int = 4 * 2**20) -> list[bytes] | None:
        """EVDATA frames re-sending retained events from `first` (bounded, at least one
        event), None when `first` is no longer retained."""
        if first > self.last_seq:
            return [EV, batch_head(self.epoch, first), b""]
        if first < self.oldest_available():
            return None
        start = first - self._first_seq
        ends = self._ends
        base = ends[start - 1] if start > 0 else 0
        stop = bisect.bisect_left(ends, base + max_bytes, lo=start)
        stop = min(max(stop + 1, start + 1), len(ends))
        return [EV, batch_head(self.epoch, first), b"".join(self._raws[start:stop])]

    def _drop_through(self, seq: int) -> None:
        """Forget retained events up to `seq`."""
        index = min(seq - self._first_seq + 1, len(self._raws))
        if index <= self._head:
            return
        self._head = index
        if self._head >= 4096 and self._head * 2 >= len(self._raws):
            self._first_seq += self._head
            del self._raws[: self._head]
            del self._ends[: self._head]
            self._head = 0

    def _release_passed(self) -> None:
        if self.cursors:
            self._drop_through(min(self.cursors.values()))

    def trim(self) -> list[Skip]:
        """Enforce the retention bound: beyond it, drop the oldest events down to 3/4 of
        the bound (never past the confirming consumer) and skip every consumer behind."""
        limits = self.limits
        if self.retained <= limits.max_events and self.backlog_bytes <= limits.max_bytes:
            return []
        keep_events = limits.max_events * 3 // 4
        keep_bytes = limits.max_bytes * 3 // 4
        last = self.last_seq - keep_events
        ends = self._ends
        if ends:  # also drop until what remains is under 3/4 of the byte bound
            index = bisect.bisect_left(ends, ends[-1] - keep_bytes)
            last = max(last, self._first_seq + index)
        if self.confirm_by is not None:
            last = min(last, self.cursors[self.confirm_by])
        last = min(last, self.last_seq)
        skips = [
            Skip(name, cursor + 1, last)
            for name, cursor in self.cursors.items()
            if cursor < last and name != self.confirm_by
        ]
        for skip in skips:
            self.cursors[skip.consumer] = last
        self._drop_through(last)
        return skips

    # -- consumers ---------------------------------------------------------------------------

    def register(self, consumer: str, watermark: int) -> int:
        """A consumer's EVSYNC: its cursor becomes `watermark`, within what this broker
        still has (a new consumer gets everything after its EVSYNC). Returns the seq the
        broker numbers next (EVSYNCOK `next`)."""
        floor = self.oldest_available() - 1
        self.cursors[consumer] = max(min(watermark, self.last_seq), floor)
        if not self.active:
            self.active = True
            self._first_seq, self._head = self.last_seq + 1, 0
            self._raws.clear()
            self._ends.clear()
        return self.last_seq + 1

    def acknowledge(self, consumer: str, watermark: int) -> dict[bytes, list[bytes]]:
        """A consumer took everything up to `watermark` (EVACK): drop what every consumer
        passed; for the confirming consumer, release the CONFIRMs that waited for it.

        Returns the message ids to confirm, by peer.
        """
        if consumer not in self.cursors:
            self.register(consumer, watermark)
        cursor = min(watermark, self.last_seq)
        if cursor > self.cursors[consumer]:
            self.cursors[consumer] = cursor
            self._release_passed()
        if consumer != self.confirm_by or not self._confirms:
            return {}
        cursor = self.cursors[consumer]
        released: dict[bytes, list[bytes]] = {}
        due = bisect.bisect_right(self._confirms, cursor, key=lambda c: c.seq)
        for pending in self._confirms[:due]:
            released.setdefault(pending.peer, []).append(pending.msg_id)
        del self._confirms[:due]
        return released

    # -- confirms ----------------------------------------------------------------------------

    @property
    def confirms_waiting(self) -> int:
        return len(self._confirms)

    def confirm_later(self, seq: int, peer: bytes, msg_id: bytes) -> bool:
        """Hold a CONFIRM until event `seq` is stored; False when it already is (or
        nothing stores events)."""
        confirm_by = self.confirm_by
        if confirm_by is None or seq <= self.cursors[confirm_by]:
            return False
        pending = PendingConfirm(seq, peer, msg_id)
        confirms = self._confirms
        if not confirms or confirms[-1].seq <= seq:
            confirms.append(pending)  # the usual case: publishes confirm in seq order
        else:  # a resend's confirm waits on an older seq
            bisect.insort(confirms, pending, key=lambda c: c.seq)
        return True
