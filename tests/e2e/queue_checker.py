"""A total-queue checker in the manner of the RabbitMQ Jepsen tests: given what was sent and
what arrived (in arrival order), count lost, duplicated and out-of-order messages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QueueReport:
    lost: frozenset[int]
    duplicated: dict[int, int]
    """Message -> extra copies received."""
    out_of_order: int
    """First arrivals that came after a larger first arrival."""
    unexpected: frozenset[int]

    @property
    def duplicates(self) -> int:
        return sum(self.duplicated.values())


def check_queue(sent: Iterable[int], received: Sequence[int]) -> QueueReport:
    expected = set(sent)
    counts = Counter(received)
    out_of_order = 0
    highest = None
    seen: set[int] = set()
    for value in received:
        if value in seen:
            continue
        seen.add(value)
        if highest is not None and value < highest:
            out_of_order += 1
        highest = value if highest is None else max(highest, value)
    return QueueReport(
        lost=frozenset(expected - seen),
        duplicated={v: c - 1 for v, c in counts.items() if c > 1},
        out_of_order=out_of_order,
        unexpected=frozenset(seen - expected),
    )
