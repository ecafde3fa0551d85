"""The persistence service's group-commit rule: no window, the load sizes the groups."""

from __future__ import annotations

from persistence.service import _BIG_BATCH, group_complete


def test_a_lone_event_is_committed_at_once() -> None:
    # the old rule held a lone event for a 5 ms window before its commit
    assert group_complete(1, more_readable=False)


def test_a_group_grows_while_more_is_readable_up_to_the_big_batch() -> None:
    assert not group_complete(1, more_readable=True)
    assert not group_complete(_BIG_BATCH - 1, more_readable=True)
    assert group_complete(_BIG_BATCH, more_readable=True)


def test_nothing_pending_is_never_a_commit() -> None:
    assert not group_complete(0, more_readable=False)
    assert not group_complete(0, more_readable=True)
