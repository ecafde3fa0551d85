"""Authorizer decisions, the credential store, and the latency histogram."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.errors import Code, PermissionViolation
from broker.histogram import LatencyHistogram
from broker.manifests import Permissions
from broker.permissions import PLATFORM_PERMISSIONS, Authorizer, sys_topic_owner

# -- Authorizer -------------------------------------------------------------------------------

APP = Permissions(
    publish=("market.>", "orders.new", "prices.*.last"),
    subscribe=("orders.*", "news.>", "prices.*.last"),
)


def denied(action: str, authorizer: Authorizer, target: str) -> Code | None:
    checks = {
        "pub": authorizer.check_publish,
        "sub": authorizer.check_subscribe,
        "req": authorizer.check_request,
    }
    check = checks[action]
    try:
        check(target)
    except PermissionViolation as exc:
        return exc.code
    return None


@pytest.mark.parametrize(
    ("topic", "code"),
    [
        ("market.AAPL", None),
        ("market.AAPL.prices", None),
        ("market", Code.PUBLISH_DENIED),  # '>' needs at least one more token
        ("orders.new", None),
        ("orders.old", Code.PUBLISH_DENIED),
        ("orders.new.x", Code.PUBLISH_DENIED),
        ("prices.AAPL.last", None),
        ("prices.AAPL.first", Code.PUBLISH_DENIED),
        ("other", Code.PUBLISH_DENIED),
        ("$sys.alerts", Code.RESERVED_TOPIC),
        ("$sys.x.y", Code.RESERVED_TOPIC),
    ],
)
def test_publish_decisions(topic: str, code: Code | None) -> None:
    authorizer = Authorizer("app", APP)
    assert not authorizer.platform
    for _ in range(2):  # the second answer comes from the cache
        assert denied("pub", authorizer, topic) == code


@pytest.mark.parametrize(
    ("pattern", "code"),
    [
        ("orders.*", None),
        ("orders.new", None),
        ("orders.>", Code.SUBSCRIBE_DENIED),
        ("orders", Code.SUBSCRIBE_DENIED),
        ("news.>", None),
        ("news.*.x", None),
        ("news.a.b.c", None),
        ("news", Code.SUBSCRIBE_DENIED),
        (">", Code.SUBSCRIBE_DENIED),
        ("*.new", Code.SUBSCRIBE_DENIED),
        ("prices.*.last", None),
        ("prices.AAPL.last", None),
        ("prices.>", Code.SUBSCRIBE_DENIED),
        ("$sys.>", Code.SUBSCRIBE_DENIED),
        ("market.x", Code.SUBSCRIBE_DENIED),  # publish rights give no subscribe rights
    ],
)
def test_subscribe_decisions(pattern: str, code: Code | None) -> None:
    assert denied("sub", Authorizer("app", APP), pattern) == code


def test_deny_by_default() -> None:
    authorizer = Authorizer("empty", Permissions())
    assert denied("pub", authorizer, "a") == Code.PUBLISH_DENIED
    assert denied("sub", authorizer, "a") == Code.SUBSCRIBE_DENIED


def test_wildcard_everything_still_excludes_sys() -> None:
    authorizer = Authorizer("all", Permissions(publish=(">",), subscribe=(">",)))
    assert denied("pub", authorizer, "anything.at.all") is None
    assert denied("pub", authorizer, "$sys.alerts") == Code.RESERVED_TOPIC
    assert denied("sub", authorizer, "*.x") is None
    assert denied("sub", authorizer, "$sys.>") == Code.SUBSCRIBE_DENIED
    assert denied("sub", authorizer, "$sys.alerts") == Code.SUBSCRIBE_DENIED


def test_sys_in_manifest_does_not_make_an_app_platform() -> None:
    authorizer = Authorizer("sneaky", Permissions(publish=("$sys.>",)))
    assert denied("pub", authorizer, "$sys.alerts") == Code.RESERVED_TOPIC


@pytest.mark.parametrize("app_id", ["$cli", "$supervisor", "$persistence"])
def test_platform_identities(app_id: str) -> None:
    authorizer = Authorizer(app_id, PLATFORM_PERMISSIONS)
    assert authorizer.platform
    for topic in ["market.AAPL", "a"]:
        assert denied("pub", authorizer, topic) is None
    for topic in ["$sys.alerts", "$sys.audit.x", "$sys.unowned.y"]:
        assert denied("pub", authorizer, topic) == Code.RESERVED_TOPIC
    for pattern in ["$sys.>", "$sys.*", ">", "*.x", "a.b"]:
        assert denied("sub", authorizer, pattern) is None


SYS_OWNERS = [
    ("$sys.audit.apps.fatal", "$supervisor"),
    ("$sys.audit.apps.launch", "$supervisor"),
    ("$sys.metrics.apps", "$supervisor"),
    ("$sys.supervisor.apps", "$supervisor"),
    ("$sys.apps.unresponsive", "$broker"),
    ("$sys.alerts.events", "$broker"),
    ("$sys.alerts.storage", "$persistence"),
]


@pytest.mark.parametrize(("topic", "owner"), SYS_OWNERS)
def test_sys_topics_are_published_by_their_owner_only(topic: str, owner: str) -> None:
    assert sys_topic_owner(topic) == owner
    for app_id in ["$cli", "$supervisor", "$persistence", "$broker", "$audit", "app"]:
        permissions = PLATFORM_PERMISSIONS if app_id.startswith("$") else APP
        expected = None if app_id == owner else Code.RESERVED_TOPIC
        assert denied("pub", Authorizer(app_id, permissions), topic) == expected, app_id


def test_unowned_sys_topics_have_no_publisher() -> None:
    for topic in ["$sys.audit.other", "$sys.alerts", "$sys.apps.launched", "$sys.x"]:
        assert sys_topic_owner(topic) is None
    with pytest.raises(PermissionViolation) as error:
        Authorizer("$cli", PLATFORM_PERMISSIONS).check_publish("$sys.audit.apps.fatal")
    assert "$supervisor only" in str(error.value)


def test_cli_may_still_request_the_supervisor() -> None:
    assert denied("req", Authorizer("$cli", PLATFORM_PERMISSIONS), "$sys.supervisor.apps") is None


def test_error_names_the_fix() -> None:
    with pytest.raises(PermissionViolation) as info:
        Authorizer("app", APP).check_publish("orders.old")
    assert info.value.ref == {"topic": "orders.old"}
    assert 'publish = ["orders.old"]' in info.value.hint
    with pytest.raises(PermissionViolation) as info:
        Authorizer("app", APP).check_subscribe("orders.>")
    assert info.value.ref == {"pattern": "orders.>"}
    assert 'subscribe = ["orders.>"]' in info.value.hint


def test_publish_cache_stays_correct_past_its_limit() -> None:
    authorizer = Authorizer("app", APP)
    for i in range(3000):
        assert denied("pub", authorizer, f"market.{i}") is None
        assert denied("pub", authorizer, f"orders.{i}") == Code.PUBLISH_DENIED
    assert denied("pub", authorizer, "market.0") is None


# -- LatencyHistogram -------------------------------------------------------------------------

FRACTIONS = [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0]


def exact_percentile(values: list[int], fraction: float) -> int:
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def assert_close(histogram: LatencyHistogram, values: list[int], fraction: float) -> None:
    exact = exact_percentile(values, fraction)
    got = histogram.percentile(fraction)
    assert abs(got - exact) <= 0.03 * exact, (fraction, got, exact)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.integers(1, 10**11), min_size=1, max_size=300),
    fraction=st.floats(0.0, 1.0),
)
def test_percentiles_within_3_percent(values: list[int], fraction: float) -> None:
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    for f in [*FRACTIONS, fraction]:
        assert_close(histogram, values, f)
    assert histogram.count == len(values)
    assert histogram.max_ns == max(values)
    assert histogram.total_ns == sum(values)


@pytest.mark.parametrize("seed", range(5))
def test_percentiles_on_latency_like_data(seed: int) -> None:
    rng = random.Random(seed)
    values = [max(1, int(rng.lognormvariate(10, 1.5))) for _ in range(20_000)]
    values += [rng.randrange(1, 50) for _ in range(500)]  # some tiny values
    histogram = LatencyHistogram()
    for value in values:
        histogram.record(value)
    for fraction in FRACTIONS:
        assert_close(histogram, values, fraction)


def test_empty_histogram_and_reset() -> None:
    histogram = LatencyHistogram()
    assert histogram.percentile(0.5) == 0
    assert histogram.summary_us()["count"] == 0
    assert histogram.summary_us()["mean_us"] == 0.0
    for value in [1_000, 2_000, 3_000]:
        histogram.record(value)
    summary = histogram.summary_us()
    assert summary["count"] == 3
    assert summary["max_us"] == 3.0
    assert summary["mean_us"] == 2.0
    assert abs(summary["p50_us"] - 2.0) <= 0.06
    histogram.reset()
    assert histogram.count == 0 and histogram.max_ns == 0 and histogram.percentile(0.99) == 0


def test_percentile_never_exceeds_max() -> None:
    histogram = LatencyHistogram()
    for value in [0, 1, 5_000]:
        histogram.record(value)
    assert histogram.percentile(1.0) == 5_000
    assert histogram.percentile(0.0) <= 1
    # beyond the last bucket (2**40 ns, ~18 min) values are clamped, as documented
    histogram.record(2**45)
    assert 2**39 < histogram.percentile(1.0) <= histogram.max_ns == 2**45


@pytest.mark.parametrize(
    ("action", "target", "line"),
    [
        ("pub", "orders.old", 'publish = ["orders.old"]'),
        ("sub", "orders.>", 'subscribe = ["orders.>"]'),
        ("req", "pricing.quote", 'request = ["pricing.quote"]'),
    ],
)
def test_a_refusal_says_the_fix_once_in_its_hint(action: str, target: str, line: str) -> None:
    """The message says what was refused, the hint the exact manifest line: the ERROR a
    user sees carries the fix once, not a specific and a generic copy of it."""
    checks = {
        "pub": Authorizer("app", APP).check_publish,
        "sub": Authorizer("app", APP).check_subscribe,
        "req": Authorizer("app", APP).check_request,
    }
    with pytest.raises(PermissionViolation) as info:
        checks[action](target)
    error = info.value
    assert target in error.detail and "add" not in error.detail
    assert line in error.hint and "app's manifest" in error.hint
    text = f"{error.detail} — {error.hint}"
    assert text.lower().count("manifest") == 1


def test_a_value_recorded_for_a_whole_batch_counts_once_per_message() -> None:
    batch, single = LatencyHistogram(), LatencyHistogram()
    batch.record(5_000, times=64)
    for _ in range(64):
        single.record(5_000)
    assert (batch.count, batch.total_ns, batch.max_ns) == (64, 64 * 5_000, 5_000)
    assert batch.percentile(0.99) == single.percentile(0.99)
