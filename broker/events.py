"""The broker's event stream: what persistence and audit consume, and what the broker keeps
until they have it.

Every accepted publish, subscription change and delivery outcome becomes one event with a
broker sequence number (contiguous from 1 across restarts: a restarted broker continues
after the store's watermark). An event is one msgpack array `[seq, kind, ts_ns, ...]`;
the fields after the kind are listed in `FIELDS`. Events leave the broker in batches on
the PUB socket as `[b"EV", epoch(8) + first_seq(8), concatenated events]` and, for a
consumer that saw a gap, the same layout over its DEALER connection (EVDATA).

`EventLog` numbers events and retains them, encoded, until the persistence watermark
passes them: a consumer that lost a batch (PUB/SUB drops under its high-water mark, and a
slow joiner misses the first ones) fetches the range again, so nothing is lost silently.
It also holds the CONFIRMs that wait for "stored and synced".
"""

from __future__ import annotations

import bisect
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from broker.errors import Code, ProtocolViolation

EV: Final = b"EV"
"""PUB topic frame (and EVDATA frame) of an event batch."""

MSG: Final = 1
SUB: Final = 2
UNSUB: Final = 3
ACK: Final = 4
DEAD: Final = 5
DLQ_REPLAY: Final = 6
DLQ_PURGE: Final = 7

FIELDS: Final = {
    MSG: ("sender", "topic", "msg_id", "sensitive", "header", "payload", "targets"),
    SUB: ("app", "session", "sid", "pattern", "durable"),
    UNSUB: ("app", "session", "sid"),
    ACK: ("app", "session", "stored_seqs"),
    DEAD: (
        "entry_id",
        "app",
        "session",
        "reason",
        "attempts",
        "error",
        "stored_seq",
        "sender",
        "published_ns",
        "topic",
        "msg_id",
        "sensitive",
        "header",
        "payload",
        "sids",
    ),
    DLQ_REPLAY: ("entry_id", "app", "session", "stored_seq", "sids"),
    DLQ_PURGE: ("entry_ids",),
}
"""Fields after [seq, kind, ts_ns], in order. MSG `targets` lists [app, session, sids]
of the durable subscriptions the message was queued for: their pending deliveries."""

_HEAD = struct.Struct(">QQ")
_packer = msgpack.Packer(use_bin_type=True)


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded event (consumer side)."""

    seq: int
    kind: int
    ts_ns: int
    fields: tuple[Any, ...]

    def get(self, name: str) -> Any:
        return self.fields[FIELDS[self.kind].index(name)]


def encode_event(seq: int, kind: int, ts_ns: int, *fields: Any) -> bytes:
    return _packer.pack([seq, kind, ts_ns, *fields])  # type: ignore[no-any-return]


def batch_head(epoch: int, first_seq: int) -> bytes:
    return _HEAD.pack(epoch, first_seq)


def decode_head(raw: bytes) -> tuple[int, int]:
    """(epoch, first seq) of a batch; ProtocolViolation if the frame is not one."""
    if len(raw) != _HEAD.size:
        raise ProtocolViolation(Code.MALFORMED_FRAME, "event batch head must be 16 bytes")
    epoch, first = _HEAD.unpack(raw)
    return int(epoch), int(first)


def decode_events(blob: bytes) -> Iterator[Event]:
    """The events of one batch, in order; ProtocolViolation on anything malformed."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(blob), 1024))
    unpacker.feed(blob)
    items: list[Any] = []
    end = 0
    try:
        for item in unpacker:
            items.append(item)
            end = unpacker.tell()
    except Exception as exc:
        raise ProtocolViolation(
            Code.MALFORMED_FRAME, f"event batch is not msgpack: {type(exc).__name__}"
        ) from None
    if end != len(blob):
        raise ProtocolViolation(Code.MALFORMED_FRAME, "event batch is truncated")
    events: list[Event] = []
    for item in items:
        if not (isinstance(item, list) and len(item) >= 3 and type(item[0]) is int):
            raise ProtocolViolation(Code.MALFORMED_FRAME, "an event must be [seq, kind, ts]")
        seq, kind, ts = item[0], item[1], item[2]
        names = FIELDS.get(kind) if type(kind) is int else None
        if names is None or len(item) != 3 + len(names) or type(ts) is not int:
            raise ProtocolViolation(Code.MALFORMED_FRAME, f"event {seq}: bad kind or fields")
        events.append(Event(seq, kind, ts, tuple(item[3:])))
    return iter(events)


@dataclass(slots=True)
class PendingConfirm:
    seq: int
    peer: bytes
    msg_id: bytes


class EventLog:
    """Numbers events, batches them for publishing, retains them until acknowledged.

    `retain` is False with persistence off: nothing waits for a watermark, confirms go out
    at once, and (`publish` False) no event is even encoded: nobody stores them.
    """

    def __init__(
        self,
        epoch: int,
        retain: bool,
        max_retained_bytes: int = 512 * 2**20,
        publish: bool | None = None,
    ) -> None:
        self.epoch = epoch
        self.retain = retain
        self.publish = retain if publish is None else publish
        self.max_retained_bytes = max_retained_bytes
        self.last_seq = 0
        self.watermark = 0
        self._batch: list[bytes] = []
        self._batch_first = 0
        self.batch_started_ns = 0
        """Monotonic time the oldest unsent event was appended (0: none waiting)."""
        self._retained: deque[tuple[int, bytes]] = deque()
        self._retained_bytes = 0
        self._confirms: list[PendingConfirm] = []
        """Held CONFIRMs in seq order (a resend's confirm may wait on an older seq)."""

    def start_after(self, seq: int) -> None:
        """Continue numbering after `seq` (the store's watermark after a restart)."""
        self.last_seq = max(self.last_seq, seq)
        self.watermark = max(self.watermark, seq)

    @property
    def backlog_bytes(self) -> int:
        return self._retained_bytes

    @property
    def confirms_waiting(self) -> int:
        return len(self._confirms)

    @property
    def full(self) -> bool:
        """Persistence is so far behind that new publishes must wait (refused, not lost)."""
        return self.retain and self._retained_bytes >= self.max_retained_bytes

    def append(self, kind: int, ts_ns: int, *fields: Any) -> int:
        self.last_seq += 1
        seq = self.last_seq
        if not self.publish:
            return seq
        raw = _packer.pack([seq, kind, ts_ns, *fields])
        if not self._batch:
            self._batch_first = seq
            self.batch_started_ns = time.monotonic_ns()
        self._batch.append(raw)
        if self.retain:
            self._retained.append((seq, raw))
            self._retained_bytes += len(raw)
        return seq

    def batch_due(self, now_ns: int, max_age_ns: int, max_events: int) -> bool:
        """Whether the unsent events should go now (old enough or enough of them)."""
        return bool(self._batch) and (
            now_ns - self.batch_started_ns >= max_age_ns or len(self._batch) >= max_events
        )

    def take_batch(self) -> list[bytes] | None:
        """The frames of the events appended since the last call, or None."""
        if not self._batch:
            return None
        frames = [EV, batch_head(self.epoch, self._batch_first), b"".join(self._batch)]
        self._batch = []
        self.batch_started_ns = 0
        return frames

    def since(self, first: int, max_bytes: int = 4 * 2**20) -> list[bytes] | None:
        """EVDATA frames re-sending retained events from `first` (bounded), None when
        `first` is no longer retained."""
        if first > self.last_seq:
            return [EV, batch_head(self.epoch, first), b""]
        if not self._retained or self._retained[0][0] > first:
            return None
        offset = first - self._retained[0][0]
        chunk: list[bytes] = []
        size = 0
        for index in range(offset, len(self._retained)):
            raw = self._retained[index][1]
            chunk.append(raw)
            size += len(raw)
            if size >= max_bytes:
                break
        return [EV, batch_head(self.epoch, first), b"".join(chunk)]

    def oldest_available(self) -> int:
        """The first seq `since` can still send (retained, or the next one)."""
        return self._retained[0][0] if self._retained else self.last_seq + 1

    def confirm_later(self, seq: int, peer: bytes, msg_id: bytes) -> bool:
        """Hold a CONFIRM until event `seq` is stored; False when it already is."""
        if not self.retain or seq <= self.watermark:
            return False
        bisect.insort(self._confirms, PendingConfirm(seq, peer, msg_id), key=lambda c: c.seq)
        return True

    def acknowledge(self, watermark: int) -> dict[bytes, list[bytes]]:
        """Persistence stored everything up to `watermark`: drop it, release confirms.

        Returns the message ids to confirm, by peer.
        """
        if watermark <= self.watermark:
            return {}
        self.watermark = min(watermark, self.last_seq)
        retained = self._retained
        while retained and retained[0][0] <= self.watermark:
            self._retained_bytes -= len(retained.popleft()[1])
        released: dict[bytes, list[bytes]] = {}
        due = bisect.bisect_right(self._confirms, self.watermark, key=lambda c: c.seq)
        for pending in self._confirms[:due]:
            released.setdefault(pending.peer, []).append(pending.msg_id)
        del self._confirms[:due]
        return released
