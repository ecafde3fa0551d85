"""The persistence service's group-commit rule: no window, the load sizes the groups."""

from __future__ import annotations

from persistence.service import _BIG_BATCH, JournalPolicy, apply_due, group_complete, journal_takes


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


# -- the journal's share ---------------------------------------------------------------------

POLICY = JournalPolicy(capacity=1 << 20, max_group=64, apply_events=1024, apply_ns=50_000_000)


def test_small_groups_are_journaled_big_ones_go_to_lmdb() -> None:
    # a lone confirm pays one flush; a big group amortises LMDB's two already
    assert journal_takes(POLICY, 1)
    assert journal_takes(POLICY, 64)
    assert not journal_takes(POLICY, 65)
    assert not journal_takes(POLICY, 0)
    assert not journal_takes(JournalPolicy(capacity=0), 1)  # journal off


def test_journaled_events_wait_for_company_or_for_time() -> None:
    now = 1_000_000_000
    assert not apply_due(POLICY, 0, now, now)
    assert not apply_due(POLICY, 10, now, now + 49_999_999)
    assert apply_due(POLICY, 10, now, now + 50_000_000)  # the oldest waited long enough
    assert apply_due(POLICY, 1024, now, now)  # enough for one LMDB commit
