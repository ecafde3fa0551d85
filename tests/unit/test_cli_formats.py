"""The pure parts of the CLI: times a user types, figures a user reads."""

from __future__ import annotations

import math

import pytest

from clients.store import LATEST_MOMENT_S, to_ns
from plexus.status import latency, seconds
from plexus.store_commands import parse_moment


def test_epoch_zero_is_from_the_start() -> None:
    # the 1 µs widening of `since` once turned 0 into -1000 ns, refused by the store
    assert parse_moment("0") == 0.0
    assert to_ns(0.0) == 0
    assert to_ns(0.0, upper=True) == 1000  # widened up by 1 µs


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("-1", "before the epoch"),
        ("1e20", "after 2262-04-11"),
        ("nan", "not a time"),
        ("yesterday", "neither ISO 8601"),
        ("9999-01-01", "after 2262-04-11"),
    ],
)
def test_times_the_store_cannot_hold_are_refused_in_words(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_moment(text)


def test_iso_and_epoch_seconds_agree() -> None:
    assert parse_moment("2026-11-27T09:00:00+00:00") == parse_moment("1795770000")
    assert parse_moment(str(LATEST_MOMENT_S)) == LATEST_MOMENT_S


def test_client_bounds_stay_within_int64() -> None:
    assert to_ns(1e12, upper=True) == 2**63 - 1  # an `until` past the end: no upper bound
    with pytest.raises(ValueError, match="since"):
        to_ns(1e12)
    with pytest.raises(ValueError, match="NaN"):
        to_ns(math.nan, upper=True)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.4, "0 s"), (34.7, "35 s"), (600, "10 min"), (7200, "2.0 h"), (2e5, "2.3 d")],
)
def test_durations_carry_units(value: float | None, text: str) -> None:
    assert seconds(value) == text


@pytest.mark.parametrize(
    ("micros", "text"),
    [(None, "-"), (850.2, "850 µs"), (4180.439, "4.2 ms"), (1_300_000, "1.3 s")],
)
def test_latencies_carry_units(micros: float | None, text: str) -> None:
    assert latency(micros) == text
