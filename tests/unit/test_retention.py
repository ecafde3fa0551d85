"""plan_retention: which whole segments go, by age and by size, and what is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from persistence.retention import RetentionPlan, RetentionPolicy, plan_retention
from persistence.store import SegmentInfo

DAY = 86_400 * 10**9
NOW = 1_000 * DAY


def seg(first: int, size: int, last_ts: int, first_ts: int | None = None) -> SegmentInfo:
    return SegmentInfo(
        first_seq=first,
        path=Path(f"/store/seg-{first:020d}.mdb"),
        size_bytes=size,
        last_seq=first + 9,
        first_ts_ns=last_ts - DAY if first_ts is None else first_ts,
        last_ts_ns=last_ts,
    )


def plan(
    segments: list[SegmentInfo],
    active: int | None,
    policy: RetentionPolicy,
    total: int | None = None,
) -> RetentionPlan:
    total_bytes = sum(s.size_bytes for s in segments) if total is None else total
    return plan_retention(segments, active, total_bytes, NOW, policy)


AGE_ONLY = RetentionPolicy(max_age_ns=30 * DAY)


def test_nothing_to_do() -> None:
    result = plan([seg(1, 100, NOW - DAY), seg(11, 100, NOW)], 11, AGE_ONLY)
    assert result == RetentionPlan(delete=[], bytes_before=200, bytes_after=200)
    assert plan([], None, AGE_ONLY, total=0) == RetentionPlan()


def test_age_deletes_closed_segments_older_than_the_max_age_only() -> None:
    segments = [
        seg(1, 100, NOW - 40 * DAY),
        seg(11, 100, NOW - 30 * DAY - 1),
        seg(21, 100, NOW - 30 * DAY),  # exactly at the limit: kept
        seg(31, 100, NOW - 29 * DAY),
        seg(41, 100, NOW),
    ]
    result = plan(segments, 41, AGE_ONLY)
    assert result.delete == [1, 11]
    assert (result.expired, result.for_size) == (2, 0)
    assert (result.bytes_before, result.bytes_after) == (500, 300)
    assert not result.warn
    assert not result.over_limit


def test_age_never_deletes_the_active_segment() -> None:
    segments = [seg(1, 100, NOW - 90 * DAY), seg(11, 100, NOW - 60 * DAY)]
    result = plan(segments, 11, AGE_ONLY)
    assert result.delete == [1]
    assert result.expired == 1
    assert result.bytes_after == 100
    # with no active segment every old one may go
    assert plan(segments, None, AGE_ONLY).delete == [1, 11]


SIZED = RetentionPolicy(max_age_ns=365 * DAY, max_bytes=1_000, warn_ratio=0.9, target_ratio=0.8)


def test_below_the_warn_mark_size_deletes_nothing() -> None:
    segments = [seg(first, 200, NOW) for first in (1, 11, 21, 31)] + [seg(41, 99, NOW)]
    result = plan(segments, 41, SIZED)  # 899 bytes < 900
    assert result.delete == []
    assert not result.warn
    assert not result.over_limit
    assert result.bytes_after == 899


def test_size_cleanup_from_the_warn_mark_down_to_the_target_oldest_first() -> None:
    segments = [seg(first, 150, NOW) for first in (1, 11, 21, 31, 41, 51)]  # 900 bytes
    result = plan(segments, 51, SIZED)
    assert result.warn
    assert result.delete == [1]  # 750 <= 800
    assert (result.expired, result.for_size) == (0, 1)
    assert (result.bytes_before, result.bytes_after) == (900, 750)
    assert not result.over_limit

    over = [seg(first, 300, NOW) for first in (1, 11, 21, 31)]  # 1200 bytes, above the limit
    result = plan(over, 31, SIZED)
    assert result.delete == [1, 11]  # 600 <= 800 (900 would not do)
    assert result.bytes_after == 600
    assert result.warn
    assert not result.over_limit


def test_size_stops_exactly_at_the_target() -> None:
    segments = [seg(1, 100, NOW), seg(11, 100, NOW), seg(21, 800, NOW)]  # 1000 bytes
    result = plan(segments, 21, SIZED)
    assert result.delete == [1, 11]
    assert result.bytes_after == 800


def test_age_first_then_size_and_no_segment_twice() -> None:
    segments = [
        seg(1, 300, NOW - 400 * DAY),
        seg(11, 300, NOW - 10 * DAY),
        seg(21, 300, NOW - 5 * DAY),
        seg(31, 300, NOW),
    ]
    result = plan(segments, 31, SIZED)  # 1200; age takes 1 -> 900: still at the warn mark
    assert result.delete == [1, 11]
    assert (result.expired, result.for_size) == (1, 1)
    assert result.bytes_after == 600
    assert len(set(result.delete)) == len(result.delete)


def test_expiry_alone_can_bring_the_store_below_the_warn_mark() -> None:
    segments = [seg(1, 500, NOW - 400 * DAY), seg(11, 300, NOW), seg(21, 300, NOW)]
    result = plan(segments, 21, SIZED)  # 1100 -> 600 by age
    assert result.delete == [1]
    assert (result.expired, result.for_size) == (1, 0)
    assert not result.warn
    assert not result.over_limit


def test_the_active_segment_alone_over_the_limit_is_reported() -> None:
    result = plan([seg(1, 5_000, NOW)], 1, SIZED)
    assert result.delete == []
    assert result.warn
    assert result.over_limit
    assert result.bytes_after == 5_000

    segments = [seg(1, 100, NOW), seg(11, 2_000, NOW)]
    result = plan(segments, 11, SIZED)
    assert result.delete == [1]  # all it may delete, still over
    assert result.over_limit
    assert result.bytes_after == 2_000


def test_total_bytes_counts_files_outside_the_listing() -> None:
    """An empty active segment is not listed but its file counts in the total."""
    segments = [seg(1, 300, NOW), seg(11, 300, NOW)]
    result = plan(segments, 21, SIZED, total=950)
    assert result.delete == [1]
    assert result.bytes_after == 650


def test_without_a_size_limit_size_never_matters() -> None:
    result = plan([seg(1, 10**12, NOW), seg(11, 10**12, NOW)], 11, AGE_ONLY)
    assert result.delete == []
    assert not result.warn
    assert not result.over_limit


@pytest.mark.parametrize("active", [None, 1, 51])
@given(
    sizes=st.lists(st.integers(0, 500), min_size=1, max_size=8),
    ages=st.lists(st.integers(0, 60), min_size=8, max_size=8),
    max_bytes=st.sampled_from([0, 500, 1_000, 3_000]),
    extra=st.integers(0, 300),
)
def test_plan_invariants(
    active: int | None, sizes: list[int], ages: list[int], max_bytes: int, extra: int
) -> None:
    # oldest first: newest-message ages non-increasing along the list
    days = sorted(ages[: len(sizes)], reverse=True)
    segments = [
        seg(1 + 10 * i, size, NOW - age * DAY)
        for i, (size, age) in enumerate(zip(sizes, days, strict=True))
    ]
    total = sum(sizes) + extra
    policy = RetentionPolicy(max_age_ns=30 * DAY, max_bytes=max_bytes)
    result = plan(segments, active, policy, total=total)

    closed = [s for s in segments if s.first_seq != active]
    by_first = {s.first_seq: s for s in segments}
    assert active not in result.delete
    assert len(set(result.delete)) == len(result.delete)
    # oldest first, and always a prefix of the closed segments
    assert result.delete == [s.first_seq for s in closed[: len(result.delete)]]
    expired = [s.first_seq for s in closed if s.last_ts_ns < NOW - 30 * DAY]
    assert result.delete[: result.expired] == expired
    assert result.for_size == len(result.delete) - result.expired
    assert result.bytes_before == total
    assert result.bytes_after == total - sum(by_first[f].size_bytes for f in result.delete)
    if not max_bytes:
        assert result.for_size == 0
        assert not result.warn
        assert not result.over_limit
        return
    after_age = total - sum(by_first[f].size_bytes for f in expired)
    assert result.warn == (after_age >= max_bytes * policy.warn_ratio)
    if result.warn:
        # down to the target, or nothing closed left to delete
        assert result.bytes_after <= max_bytes * policy.target_ratio or len(result.delete) == len(
            closed
        )
        # and not one segment more than needed
        if result.for_size:
            before_last = result.bytes_after + by_first[result.delete[-1]].size_bytes
            assert before_last > max_bytes * policy.target_ratio
    else:
        assert result.for_size == 0
    assert result.over_limit == (result.bytes_after > max_bytes)
