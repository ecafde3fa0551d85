"""The persistence service's group-commit rule: no window, the load sizes the groups."""

from __future__ import annotations

from persistence.service import _BIG_BATCH, group_complete


def test_a_lone_event_is_committed_at_once() -> None:
    # the old rule held a lone event for a 5 ms window before its commit
    assert group_complete(1, drained=True)


def test_what_a_read_pass_took_is_one_group() -> None:
    # a continuous stream (always more readable) must not grow one group without end:
    # each pass that emptied the socket commits what it read
    assert group_complete(300, drained=True)
    assert not group_complete(300, drained=False)  # the read stopped at its limit
    assert group_complete(_BIG_BATCH, drained=False)


def test_nothing_pending_is_never_a_commit() -> None:
    assert not group_complete(0, drained=True)
    assert not group_complete(0, drained=False)
