"""Which segments retention deletes: a pure decision over segment facts and the time.

Two limits from the config: a maximum age (default 30 days) and a maximum size. Whole
closed segments go (the active one never does): every segment whose newest message is
older than the age limit, then the oldest ones while the store is above the cleanup mark.
Cleanup starts when the store reaches `warn_ratio` of the size limit and brings it down
to `target_ratio`, so the limit is not hit under load; reaching the warn mark also raises
a warning event. A store that stays over its limit after deleting all it may (one huge
active segment) is reported, never a crash: the writer rolls the segment next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from persistence.store import SegmentInfo


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age_ns: int = 30 * 86_400 * 10**9
    max_bytes: int = 0
    """0: no size limit."""
    warn_ratio: float = 0.9
    target_ratio: float = 0.8


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    delete: list[int] = field(default_factory=list)
    """First seqs of the segments to delete, oldest first."""
    expired: int = 0
    for_size: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    warn: bool = False
    over_limit: bool = False


def plan_retention(
    segments: Sequence[SegmentInfo],
    active_first_seq: int | None,
    total_bytes: int,
    now_ns: int,
    policy: RetentionPolicy,
) -> RetentionPlan:
    """The segments to delete now and whether to warn."""
    delete: list[int] = []
    left = total_bytes
    closed = [info for info in segments if info.first_seq != active_first_seq]
    cutoff = now_ns - policy.max_age_ns
    for info in closed:
        if info.last_ts_ns < cutoff:
            delete.append(info.first_seq)
            left -= info.size_bytes
    expired = len(delete)
    warn = False
    if policy.max_bytes:
        warn = left >= policy.max_bytes * policy.warn_ratio
        if warn:
            target = policy.max_bytes * policy.target_ratio
            for info in closed:
                if left <= target:
                    break
                if info.first_seq not in delete:
                    delete.append(info.first_seq)
                    left -= info.size_bytes
    return RetentionPlan(
        delete=delete,
        expired=expired,
        for_size=len(delete) - expired,
        bytes_before=total_bytes,
        bytes_after=left,
        warn=warn,
        over_limit=bool(policy.max_bytes) and left > policy.max_bytes,
    )
