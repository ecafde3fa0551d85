"""Limit checks on sampled usage: memory at once, CPU only when sustained."""

from __future__ import annotations

from broker.manifests import Limits
from supervisor.monitor import Usage, check_limits


def test_memory_over_the_limit_is_a_breach_at_once() -> None:
    usage = Usage(cpu_percent=1.0, rss_mb=120.0)
    breach = check_limits(usage, Limits(memory_mb=100), now=0.0, cpu_window_s=5.0)
    assert breach is not None and (breach.kind, breach.measured, breach.limit) == (
        "memory",
        120.0,
        100,
    )
    assert "120 MiB over the limit of 100 MiB" in breach.describe()
    assert check_limits(Usage(rss_mb=99.0), Limits(memory_mb=100), 0.0, 5.0) is None


def test_cpu_must_stay_over_the_limit_for_the_whole_window() -> None:
    limits = Limits(cpu_percent=50)
    usage = Usage(cpu_percent=95.0)
    assert check_limits(usage, limits, now=10.0, cpu_window_s=5.0) is None  # window starts
    assert check_limits(usage, limits, now=14.9, cpu_window_s=5.0) is None
    usage.cpu_percent = 10.0
    assert check_limits(usage, limits, now=15.0, cpu_window_s=5.0) is None  # dipped: reset
    usage.cpu_percent = 95.0
    assert check_limits(usage, limits, now=16.0, cpu_window_s=5.0) is None
    breach = check_limits(usage, limits, now=21.0, cpu_window_s=5.0)
    assert breach is not None and breach.kind == "cpu" and breach.limit == 50


def test_no_limits_no_breach() -> None:
    assert check_limits(Usage(cpu_percent=400.0, rss_mb=9999.0), Limits(), 0.0, 1.0) is None
