"""A fixed-memory latency histogram with log-spaced buckets (about 2 % relative error).

The broker records one value per routed message, so recording must be a few dict-free
integer operations; percentiles are computed only when someone asks (STATS).
"""

from __future__ import annotations

import math

_SUB_BUCKETS = 32  # per power of two: 2**(1/32) ≈ 2.2 % bucket width


class LatencyHistogram:
    """Counts of nanosecond durations in log buckets from 1 ns to ~18 minutes."""

    __slots__ = ("_counts", "count", "max_ns", "total_ns")

    def __init__(self) -> None:
        self._counts = [0] * (40 * _SUB_BUCKETS)
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    @staticmethod
    def _bucket(value_ns: int) -> int:
        if value_ns <= 1:
            return 0
        return min(int(math.log2(value_ns) * _SUB_BUCKETS), 40 * _SUB_BUCKETS - 1)

    def record(self, value_ns: int, times: int = 1) -> None:
        """Count `value_ns` `times` times (a PUB batch: every message took as long)."""
        self._counts[self._bucket(value_ns)] += times
        self.count += times
        self.total_ns += value_ns * times
        self.max_ns = max(self.max_ns, value_ns)

    def percentile(self, fraction: float) -> int:
        """Upper edge (ns) of the bucket holding the `fraction` quantile; 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                return min(int(2 ** ((index + 1) / _SUB_BUCKETS)), self.max_ns)
        return self.max_ns

    def summary_us(self) -> dict[str, float]:
        """p50/p99/p999/max/mean in microseconds, for STATS."""
        mean = self.total_ns / self.count / 1000 if self.count else 0.0
        return {
            "count": self.count,
            "p50_us": self.percentile(0.5) / 1000,
            "p99_us": self.percentile(0.99) / 1000,
            "p999_us": self.percentile(0.999) / 1000,
            "max_us": self.max_ns / 1000,
            "mean_us": round(mean, 3),
        }

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
