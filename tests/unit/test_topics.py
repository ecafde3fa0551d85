"""Topic rules and the topic index, checked against a slow, obviously correct reference.

Every TopicIndex test runs with the result cache on (large, and tiny to force eviction)
and off, as nats-server runs every sublist test with and without its cache.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from broker.errors import Code, ProtocolViolation
from broker.topics import (
    TopicIndex,
    pattern_covers,
    pattern_matches,
    pattern_tokens,
    validate_topic,
)

CACHE_SIZES = [4096, 2, 0]

# -- the reference ----------------------------------------------------------------------------


def reference_match(pattern: list[str], topic: list[str], first: bool = True) -> bool:
    """`*` is exactly one token, `>` one or more trailing tokens (last only); neither
    wildcard matches a first topic token that starts with `$`."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    dollar_guard = first and bool(topic) and topic[0].startswith("$")
    if head == ">":
        assert not rest, "'>' must be last"
        return len(topic) >= 1 and not dollar_guard
    if not topic:
        return False
    if head == "*":
        return not dollar_guard and reference_match(rest, topic[1:], first=False)
    return head == topic[0] and reference_match(rest, topic[1:], first=False)


def ref(pattern: str, topic: str) -> bool:
    return reference_match(pattern.split("."), topic.split("."))


def test_reference_itself() -> None:
    assert ref("a.*", "a.b")
    assert not ref("a.*", "a.b.c")
    assert ref("a.>", "a.b.c")
    assert not ref("a.>", "a")
    assert not ref(">", "$sys.x")
    assert not ref("*.x", "$sys.x")
    assert ref("$sys.>", "$sys.x")
    assert ref("a.*", "a.$b")


# -- strategies -------------------------------------------------------------------------------

PATTERN_TOKENS = ["a", "b", "c", "$sys"]
TOPIC_TOKENS = ["a", "b", "c", "d", "$sys", "$x"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.sampled_from([*PATTERN_TOKENS, "*"]), min_size=0, max_size=3))
    if draw(st.booleans()) or not body:
        body.append(draw(st.sampled_from([*PATTERN_TOKENS, "*", ">"])))
    return ".".join(body)


topics = st.lists(st.sampled_from(TOPIC_TOKENS), min_size=1, max_size=5).map(".".join)
values = st.integers(0, 3)


# -- TopicIndex against the reference ---------------------------------------------------------


class IndexMachine(RuleBasedStateMachine):
    """Random insert/remove/match sequences; the model is a plain set of (pattern, value)."""

    entries = Bundle("entries")

    CACHE_SIZE = 4096

    def __init__(self) -> None:
        super().__init__()
        self.index: TopicIndex[int] = TopicIndex(cache_size=self.CACHE_SIZE)
        self.model: set[tuple[str, int]] = set()

    @rule(target=entries, pattern=patterns(), value=values)
    def insert(self, pattern: str, value: int) -> tuple[str, int]:
        added = self.index.insert(pattern, value)
        assert added == ((pattern, value) not in self.model)
        self.model.add((pattern, value))
        return (pattern, value)

    @rule(entry=consumes(entries))
    def remove_known(self, entry: tuple[str, int]) -> None:
        pattern, value = entry
        removed = self.index.remove(pattern, value)
        assert removed == (entry in self.model)
        self.model.discard(entry)

    @rule(pattern=patterns(), value=values)
    def remove_any(self, pattern: str, value: int) -> None:
        removed = self.index.remove(pattern, value)
        assert removed == ((pattern, value) in self.model)
        self.model.discard((pattern, value))

    @rule(topic=topics)
    def match(self, topic: str) -> None:
        expected = {v for p, v in self.model if ref(p, topic)}
        for _ in range(2):  # the second call may come from the cache
            got = self.index.match(topic)
            assert len(got) == len(set(got)), f"duplicates in {got}"
            assert set(got) == expected, (topic, sorted(self.model))
            assert self.index.has_interest(topic) == bool(expected)

    @rule(topics_=st.lists(topics, min_size=1, max_size=6))
    def match_many(self, topics_: list[str]) -> None:
        for topic in topics_ + topics_[::-1]:
            expected = {v for p, v in self.model if ref(p, topic)}
            assert set(self.index.match(topic)) == expected, topic

    @invariant()
    def length(self) -> None:
        assert len(self.index) == len(self.model)

    @invariant()
    def literal_patterns(self) -> None:
        literals = {p for p, _ in self.model if "*" not in p and ">" not in p}
        assert set(self.index.patterns()) == literals


class TinyCacheMachine(IndexMachine):
    CACHE_SIZE = 2


class NoCacheMachine(IndexMachine):
    CACHE_SIZE = 0


@pytest.mark.parametrize("machine", [IndexMachine, TinyCacheMachine, NoCacheMachine])
def test_index_state_machine(machine: type[IndexMachine]) -> None:
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=150, stateful_step_count=40, deadline=None),
    )


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
@settings(max_examples=150, deadline=None)
@given(
    entries=st.lists(st.tuples(patterns(), values), max_size=25),
    probes=st.lists(topics, min_size=1, max_size=20),
)
def test_index_matches_reference(
    cache_size: int, entries: list[tuple[str, int]], probes: list[str]
) -> None:
    index: TopicIndex[int] = TopicIndex(cache_size=cache_size)
    for pattern, value in entries:
        index.insert(pattern, value)
    for topic in probes + probes:
        expected = {v for p, v in entries if ref(p, topic)}
        assert set(index.match(topic)) == expected


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
def test_cache_sees_changes(cache_size: int) -> None:
    index: TopicIndex[str] = TopicIndex(cache_size=cache_size)
    assert index.match("a.b") == ()
    index.insert("a.*", "x")
    assert set(index.match("a.b")) == {"x"}
    index.insert("a.b", "y")
    index.insert(">", "z")
    assert set(index.match("a.b")) == {"x", "y", "z"}
    assert index.remove("a.*", "x")
    assert set(index.match("a.b")) == {"y", "z"}
    assert not index.remove("a.*", "x")
    assert index.remove(">", "z")
    assert index.remove("a.b", "y")
    assert index.match("a.b") == ()
    assert len(index) == 0


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
def test_remove_prunes_and_reinsert_works(cache_size: int) -> None:
    index: TopicIndex[int] = TopicIndex(cache_size=cache_size)
    for pattern in ["a.*.c.>", "a.*.c", "a.b.*", "*.*", ">"]:
        index.insert(pattern, 1)
    for pattern in ["a.*.c.>", "a.*.c", "a.b.*", "*.*", ">"]:
        assert index.remove(pattern, 1)
    assert index._root.empty()
    assert index.match("a.b.c.d") == ()
    index.insert("a.*.c.>", 2)
    assert index.match("a.b.c.d") == (2,)


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
def test_index_rejects_bad_patterns(cache_size: int) -> None:
    index: TopicIndex[int] = TopicIndex(cache_size=cache_size)
    for bad in ["", "a..b", "a.>.b", "a*"]:
        with pytest.raises(ProtocolViolation):
            index.insert(bad, 1)
        with pytest.raises(ProtocolViolation):
            index.remove(bad, 1)
    assert len(index) == 0


@pytest.mark.parametrize("cache_size", CACHE_SIZES)
def test_index_exhaustive_against_pattern_matches(cache_size: int) -> None:
    index: TopicIndex[str] = TopicIndex(cache_size=cache_size)
    for pattern in ALL_PATTERNS:
        index.insert(pattern, pattern)
    for topic in UNIVERSE:
        assert set(index.match(topic)) == set(MATCHED_BY_TOPIC[topic]), topic


# -- validate_topic / pattern_tokens tables ---------------------------------------------------

TOPIC_OK = [
    "a",
    "market.AAPL.prices",
    "$sys.alerts",
    "a.$b",
    "a-b_c.d:e/f",
    "é.ü",
    "a" * 255,
    "é" * 127 + "a",  # 255 bytes of UTF-8
    ".".join(["x"] * 128),  # 255 bytes
]
TOPIC_BAD: list[Any] = [
    "",
    ".",
    ".a",
    "a.",
    "a..b",
    "*",
    ">",
    "a.*",
    "a.>",
    "a.>.b",
    "a*",
    "a>",
    "a.b*c",
    "a b",
    " a",
    "a\t",
    "a\nb",
    "a\rb",
    "a\x00b",
    "a\x0bb",
    "a\x0cb",
    "a" * 256,
    "é" * 128,  # 256 bytes
    None,
    b"a.b",
    1,
    ["a"],
]


@pytest.mark.parametrize("topic", TOPIC_OK)
def test_validate_topic_accepts(topic: str) -> None:
    validate_topic(topic)


@pytest.mark.parametrize("topic", TOPIC_BAD, ids=repr)
def test_validate_topic_rejects(topic: Any) -> None:
    with pytest.raises(ProtocolViolation) as info:
        validate_topic(topic)
    assert info.value.code == Code.BAD_TOPIC


PATTERN_OK = {
    "a": ["a"],
    "a.b": ["a", "b"],
    "*": ["*"],
    ">": [">"],
    "a.*": ["a", "*"],
    "a.>": ["a", ">"],
    "*.*.>": ["*", "*", ">"],
    "$sys.>": ["$sys", ">"],
    "a.*.c": ["a", "*", "c"],
    "a" * 255: ["a" * 255],
}
PATTERN_BAD: list[Any] = [
    "",
    ".",
    ".a",
    "a.",
    "a..b",
    "a.>.b",
    ">.a",
    ">.>",
    "a*",
    "*a",
    "a>",
    ">a",
    "a.b*.c",
    "**",
    "a b",
    "a\t*",
    "a.\n",
    "a\x00",
    "a" * 256,
    "é" * 128,
    None,
    b"a.*",
    3.5,
]


@pytest.mark.parametrize(("pattern", "tokens"), PATTERN_OK.items())
def test_pattern_tokens_accepts(pattern: str, tokens: list[str]) -> None:
    assert pattern_tokens(pattern) == tokens


@pytest.mark.parametrize("pattern", PATTERN_BAD, ids=repr)
def test_pattern_tokens_rejects(pattern: Any) -> None:
    with pytest.raises(ProtocolViolation) as info:
        pattern_tokens(pattern)
    assert info.value.code == Code.BAD_PATTERN


@given(st.text(max_size=20))
def test_validate_topic_only_raises_protocol_violation(text: str) -> None:
    try:
        validate_topic(text)
    except ProtocolViolation:
        return
    assert text and all(t and "*" not in t and ">" not in t for t in text.split("."))


@given(st.text(alphabet="ab.*> $\t", max_size=12))
def test_pattern_tokens_only_raises_protocol_violation(text: str) -> None:
    try:
        tokens = pattern_tokens(text)
    except ProtocolViolation:
        return
    assert tokens == text.split(".")
    assert all(t and (t in ("*", ">") or ("*" not in t and ">" not in t)) for t in tokens)
    assert ">" not in tokens[:-1]


# -- pattern_matches / pattern_covers by brute force ------------------------------------------
#
# Patterns: every pattern of 1..3 tokens over {a, b, $sys, *} with an optional final '>'.
# Universe: every topic of 1..4 tokens over {a, b, $sys, z, $z}. It is sound for covers: a
# witness that `inner` matches more than `outer` needs at most one token per pattern position
# plus one more (to outlast a fixed-length pattern against '>'), and each position needs only
# a token named in a pattern, a fresh plain token (z) or a fresh `$` token ($z).

_P_TOKENS = ["a", "b", "$sys", "*"]
ALL_PATTERNS = [
    ".".join((*body, last))
    for size in range(1, 4)
    for body in itertools.product(_P_TOKENS, repeat=size - 1)
    for last in [*_P_TOKENS, ">"]
]
_U_TOKENS = ["a", "b", "$sys", "z", "$z"]
UNIVERSE = [".".join(t) for size in range(1, 5) for t in itertools.product(_U_TOKENS, repeat=size)]
MATCHED: dict[str, frozenset[str]] = {
    p: frozenset(t for t in UNIVERSE if ref(p, t)) for p in ALL_PATTERNS
}
MATCHED_BY_TOPIC: dict[str, list[str]] = {
    t: [p for p in ALL_PATTERNS if t in MATCHED[p]] for t in UNIVERSE
}


def test_universe_is_the_expected_size() -> None:
    assert len(ALL_PATTERNS) == 5 + 20 + 80
    assert len(UNIVERSE) == 5 + 25 + 125 + 625
    for pattern in ALL_PATTERNS:
        pattern_tokens(pattern)
    for topic in UNIVERSE:
        validate_topic(topic)


def test_pattern_matches_brute_force() -> None:
    wrong = [
        (p, t) for p in ALL_PATTERNS for t in UNIVERSE if pattern_matches(p, t) != (t in MATCHED[p])
    ]
    assert not wrong, wrong[:10]


def test_pattern_covers_brute_force() -> None:
    wrong = [
        (outer, inner, pattern_covers(outer, inner))
        for outer in ALL_PATTERNS
        for inner in ALL_PATTERNS
        if pattern_covers(outer, inner) != (MATCHED[inner] <= MATCHED[outer])
    ]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        (">", "a.b", True),
        (">", "*.>", True),
        (">", "$sys.a", False),
        (">", "$sys.>", False),
        ("$sys.>", "$sys.*", True),
        ("a.>", "a.*", True),
        ("a.*", "a.>", False),
        ("a.*", "a.b", True),
        ("a.b", "a.*", False),
        ("*.>", ">", False),
        ("*", "$sys", False),
        ("a.b", "a.b", True),
    ],
)
def test_pattern_covers_examples(outer: str, inner: str, covers: bool) -> None:
    assert pattern_covers(outer, inner) is covers


@pytest.mark.parametrize("topic", ["a\u00a0b", "a\u2028b", "a.\u200bb", "a.b\x7f"])
def test_unicode_whitespace_and_control_characters_are_rejected(topic: str) -> None:
    with pytest.raises(ProtocolViolation):
        validate_topic(topic)
    with pytest.raises(ProtocolViolation):
        pattern_tokens(topic)
