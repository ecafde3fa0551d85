"""The dead-letter queue: messages that could not be delivered, with the reason why.

Bounded by count and bytes; when full, the oldest entry is dropped and counted
(`dropped`), and the broker logs it — never silently. The broker reports every change
on its event stream; persistence stores the entries and a restarted broker restores them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from broker.delivery import Delivery

REASONS = ("nacked", "ack-timeout", "expired", "queue-full", "rejected")
SEALED_ERROR = "(sealed: the message is sensitive)"
"""What listings and log lines show for the error of a sensitive dead letter: the text a
receiver gave may quote the payload, which is only ever stored sealed."""


def shown_error(delivery: Delivery) -> str:
    """A delivery's last error as it may be shown or logged (`SEALED_ERROR` if sensitive)."""
    return SEALED_ERROR if delivery.sensitive and delivery.last_error else delivery.last_error


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered delivery and why it died."""

    entry_id: int
    reason: str
    app_id: str
    session: str
    dead_at_ns: int
    delivery: Delivery

    def describe(self) -> dict[str, Any]:
        """Plain data for `plexus dlq list --json` (payload shown as bytes length, the
        error of a sensitive message redacted)."""
        d = self.delivery
        return {
            "id": self.entry_id,
            "reason": self.reason,
            "app": self.app_id,
            "session": self.session,
            "topic": d.topic,
            "sender": d.sender,
            "message_id": d.msg_id.hex(),
            "attempts": d.attempt,
            "last_error": shown_error(d),
            "published_at_ns": d.timestamp_ns,
            "dead_at_ns": self.dead_at_ns,
            "payload_bytes": len(d.payload),
        }


class DeadLetterQueue:
    """Ordered dead letters by entry id, bounded by count and bytes."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 2**20) -> None:
        self._entries: OrderedDict[int, DeadLetter] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._next_id = 1
        self.dropped = 0
        self.evicted: list[int] = []
        """Ids dropped for room since the caller last cleared this list."""
        self.by_reason: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, delivery: Delivery, reason: str, app_id: str, session: str, now_ns: int) -> int:
        """Store a dead delivery; returns its entry id."""
        assert reason in REASONS, reason
        entry = DeadLetter(self._next_id, reason, app_id, session, now_ns, delivery)
        self._next_id += 1
        self._entries[entry.entry_id] = entry
        self._bytes += delivery.size
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.delivery.size
            self.dropped += 1
            self.evicted.append(oldest.entry_id)
        return entry.entry_id

    def restore(self, entry: DeadLetter) -> None:
        """Put back an entry read from the store (broker restart), keeping its id."""
        self._entries[entry.entry_id] = entry
        self._bytes += entry.delivery.size
        self._next_id = max(self._next_id, entry.entry_id + 1)
        self.by_reason[entry.reason] = self.by_reason.get(entry.reason, 0) + 1

    def entries(self) -> list[DeadLetter]:
        return list(self._entries.values())

    def take(self, entry_id: int) -> DeadLetter | None:
        """Remove and return one entry (for replay)."""
        entry = self._entries.pop(entry_id, None)
        if entry is not None:
            self._bytes -= entry.delivery.size
        return entry

    def ids(self) -> list[int]:
        return list(self._entries)

    def purge(self, ids: tuple[int, ...] | None = None) -> list[int]:
        """Drop the entries `ids` names (unknown ids are skipped), or all when None;
        returns the ids dropped."""
        if ids is None:
            dropped = list(self._entries)
            self._entries.clear()
            self._bytes = 0
            return dropped
        dropped = []
        for entry_id in dict.fromkeys(ids):
            entry = self._entries.pop(entry_id, None)
            if entry is not None:
                self._bytes -= entry.delivery.size
                dropped.append(entry_id)
        return dropped
