"""The chaos tests' checker must itself be right."""

from __future__ import annotations

from tests.e2e.queue_checker import check_queue


def test_clean_run() -> None:
    report = check_queue(range(5), [0, 1, 2, 3, 4])
    assert not report.lost and report.duplicates == 0 and report.out_of_order == 0


def test_counts_lost_duplicated_out_of_order_unexpected() -> None:
    report = check_queue(range(6), [0, 2, 1, 2, 2, 4, 9])
    assert report.lost == {3, 5}
    assert report.duplicated == {2: 2} and report.duplicates == 2
    assert report.out_of_order == 1  # 1 arrived after 2
    assert report.unexpected == {9}
