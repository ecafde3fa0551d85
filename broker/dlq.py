"""The dead-letter queue: messages that could not be delivered, with the reason why.

Bounded per app and in all. Each app has a quota (broker.caps: `dlq_entries`,
`dlq_bytes`, by the app whose session the dead letter was for): beyond it that app's own
oldest entry is dropped, never another app's, and the app is named in `over_quota` (the
broker reports a Denied event and a log line). Beyond the bound of the whole queue (count
or bytes) the oldest entry of the app holding the most entries is dropped. Every drop is
counted (`dropped`), listed in `evicted` and logged, never silent. The broker reports
every change on its event stream; persistence stores the entries and a restarted broker
restores them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.caps import UNCAPPED, Caps
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
    """Ordered dead letters by entry id, bounded per app (its quota) and by count and
    bytes in all."""

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 2**20,
        caps_of: Callable[[str], Caps] | None = None,
    ) -> None:
        self._entries: OrderedDict[int, DeadLetter] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._caps_of = caps_of
        self._bytes = 0
        self._by_app: dict[str, dict[int, None]] = {}
        """app -> its entry ids, oldest first."""
        self._app_bytes: dict[str, int] = {}
        self._next_id = 1
        self.dropped = 0
        self.evicted: list[int] = []
        """Ids dropped for room since the caller last cleared this list."""
        self.over_quota: dict[str, int] = {}
        """app -> its own entries dropped for its quota since the caller last cleared it."""
        self.by_reason: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def count_of(self, app_id: str) -> int:
        """How many entries the queue holds for `app_id`."""
        return len(self._by_app.get(app_id, ()))

    def add(self, delivery: Delivery, reason: str, app_id: str, session: str, now_ns: int) -> int:
        """Store a dead delivery; returns its entry id. Over the app's quota, its own
        oldest entries go (maybe this one); over the whole bound, the largest holder's."""
        assert reason in REASONS, reason
        entry = DeadLetter(self._next_id, reason, app_id, session, now_ns, delivery)
        self._next_id += 1
        self._insert(entry)
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        caps = self._caps_of(app_id) if self._caps_of is not None else UNCAPPED
        own = self._by_app[app_id]
        while own and (len(own) > caps.dlq_entries or self._app_bytes[app_id] > caps.dlq_bytes):
            self._drop(next(iter(own)))
            self.over_quota[app_id] = self.over_quota.get(app_id, 0) + 1
        while self._entries and (
            len(self._entries) > self._max_entries or self._bytes > self._max_bytes
        ):
            largest = max(self._by_app.items(), key=lambda item: len(item[1]))[1]
            self._drop(next(iter(largest)))
        return entry.entry_id

    def _insert(self, entry: DeadLetter) -> None:
        self._entries[entry.entry_id] = entry
        size = entry.delivery.size
        self._bytes += size
        self._by_app.setdefault(entry.app_id, {})[entry.entry_id] = None
        self._app_bytes[entry.app_id] = self._app_bytes.get(entry.app_id, 0) + size

    def _drop(self, entry_id: int) -> None:
        """Drop one entry for room: counted and listed in `evicted`."""
        self._remove(entry_id)
        self.dropped += 1
        self.evicted.append(entry_id)

    def _remove(self, entry_id: int) -> DeadLetter | None:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        size = entry.delivery.size
        self._bytes -= size
        app = entry.app_id
        own = self._by_app[app]
        del own[entry_id]
        if own:
            self._app_bytes[app] -= size
        else:
            del self._by_app[app]
            del self._app_bytes[app]
        return entry

    def restore(self, entry: DeadLetter) -> None:
        """Put back an entry read from the store (broker restart), keeping its id."""
        self._insert(entry)
        self._next_id = max(self._next_id, entry.entry_id + 1)
        self.by_reason[entry.reason] = self.by_reason.get(entry.reason, 0) + 1

    def entries(self) -> list[DeadLetter]:
        return list(self._entries.values())

    def take(self, entry_id: int) -> DeadLetter | None:
        """Remove and return one entry (for replay)."""
        return self._remove(entry_id)

    def ids(self) -> list[int]:
        return list(self._entries)

    def purge(self, ids: tuple[int, ...] | None = None) -> list[int]:
        """Drop the entries `ids` names (unknown ids are skipped), or all when None;
        returns the ids dropped."""
        if ids is None:
            dropped = list(self._entries)
            self._entries.clear()
            self._by_app.clear()
            self._app_bytes.clear()
            self._bytes = 0
            return dropped
        return [entry_id for entry_id in dict.fromkeys(ids) if self._remove(entry_id) is not None]
