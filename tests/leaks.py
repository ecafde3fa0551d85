"""Leak checks that measure the code, not the machine.

A leak keeps something for every message it sees, so what it retains grows with every
round of the same input; allocator noise (arenas, free lists, caches filling up) jumps a
few times and then stays flat. Hence both checks here look at the *trend* over several
rounds after a warm-up, never at one absolute ceiling:

- `traced_rounds` samples, with tracemalloc, what the Python heap retains after each round
  of a pure core (unit tests: exact, no allocator in the way);
- `growth_per_round` is the median of the round-to-round increments of the series' lower
  envelope (each sample replaced by the least sample from it on), RSS included: a leak
  raises the floor in (nearly) every round, so the median is its rate; a few allocator
  jumps, fewer than half of the rounds, leave it near zero, and a transient peak (memory
  the allocator gives back a round later) is not part of the floor at all.
"""

from __future__ import annotations

import gc
import statistics
import tracemalloc
from collections.abc import Callable, Sequence
from itertools import pairwise


def growth_per_round(samples: Sequence[float]) -> float:
    """Median of the increments of the lower envelope of `samples` (one sample per round)."""
    if len(samples) < 2:
        raise ValueError("a trend needs at least two samples")
    return statistics.median(b - a for a, b in pairwise(lower_envelope(samples)))


def lower_envelope(samples: Sequence[float]) -> list[float]:
    """Each sample replaced by the least of it and every later one: what stayed retained."""
    floor = list(samples)
    for i in range(len(floor) - 2, -1, -1):
        floor[i] = min(floor[i], floor[i + 1])
    return floor


def traced_rounds(drive: Callable[[int], object], rounds: int, warmup: int = 2) -> list[int]:
    """Bytes the Python heap retains after each of `rounds` calls of `drive(round)`, relative
    to the end of `warmup` rounds (garbage collected before every sample)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for number in range(warmup):
            drive(number)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        samples = [0]
        for number in range(warmup, warmup + rounds):
            drive(number)
            gc.collect()
            samples.append(tracemalloc.get_traced_memory()[0] - base)
        return samples
    finally:
        if not was_tracing:
            tracemalloc.stop()


def assert_flat(samples: Sequence[float], per_round: float, what: str) -> None:
    """Fail when `samples` climb by more than `per_round` a round (the trend, not a peak)."""
    slope = growth_per_round(samples)
    shown = ", ".join(f"{s / 1024:.1f}" for s in samples)
    assert slope <= per_round, (
        f"{what} grows by {slope / 1024:.1f} KiB per round (bound {per_round / 1024:.1f} KiB); "
        f"retained after each round, KiB: {shown}"
    )
