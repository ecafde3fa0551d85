"""Topic names, subscription patterns and the index that maps a topic to its subscribers.

Modelled on nats-server's sublist: exact patterns live in a dict (one lookup), wildcard
patterns in a trie of tokens where each level has literal children, a `*` child and a `>`
leaf. In front sits a bounded cache from topic to result, cleared on every change.

Rules (docs/protocol.md, "Topics"): dot-separated non-empty tokens, at most 255 bytes of
UTF-8, no whitespace. `*` matches exactly one token, `>` one or more trailing tokens and
only in last position; wildcards are whole tokens only and never appear in a published
topic. A wildcard in first position does not match a token starting with `$`, so `>` never
receives the platform's `$sys.` traffic (as MQTT's `#` never matches `$SYS`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from broker.errors import Code, ProtocolViolation
from broker.protocol import MAX_TOPIC_BYTES

V = TypeVar("V", bound=Hashable)

STAR = "*"
TAIL = ">"
_FORBIDDEN = frozenset(" \t\r\n\x00\x0b\x0c")


def _tokens(text: str, what: str, code: Code) -> list[str]:
    if not isinstance(text, str):
        raise ProtocolViolation(code, f"{what} must be a string")
    if not text:
        raise ProtocolViolation(code, f"{what} is empty")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise ProtocolViolation(code, f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    if not _FORBIDDEN.isdisjoint(text) or not text.isprintable():
        raise ProtocolViolation(code, f"{what} {text!r} contains whitespace or NUL")
    tokens = text.split(".")
    if "" in tokens:
        raise ProtocolViolation(code, f"{what} {text!r} has an empty token")
    return tokens


def validate_topic(topic: str) -> None:
    """Raise ProtocolViolation(BAD_TOPIC) unless `topic` may be published to."""
    for token in _tokens(topic, "topic", Code.BAD_TOPIC):
        if STAR in token or TAIL in token:
            raise ProtocolViolation(Code.BAD_TOPIC, f"topic {topic!r} contains a wildcard")


def pattern_tokens(pattern: str) -> list[str]:
    """The tokens of a valid subscription pattern; ProtocolViolation(BAD_PATTERN) otherwise."""
    tokens = _tokens(pattern, "pattern", Code.BAD_PATTERN)
    last = len(tokens) - 1
    for position, token in enumerate(tokens):
        if token == TAIL:
            if position != last:
                raise ProtocolViolation(Code.BAD_PATTERN, f"'>' must be last in {pattern!r}")
        elif token != STAR and (STAR in token or TAIL in token):
            raise ProtocolViolation(
                Code.BAD_PATTERN, f"wildcard inside token {token!r} of {pattern!r}"
            )
    return tokens


def is_literal(pattern: str) -> bool:
    """True when `pattern` has no wildcard token (it matches exactly one topic)."""
    return STAR not in pattern and TAIL not in pattern


def pattern_matches(pattern: str, topic: str) -> bool:
    """Whether one valid pattern matches one valid topic (no index; used for permissions)."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, token in enumerate(p):
        if token == TAIL:
            return len(t) > i and not (i == 0 and t[0].startswith("$"))
        if i >= len(t):
            return False
        if token == STAR:
            if i == 0 and t[0].startswith("$"):
                return False
        elif token != t[i]:
            return False
    return len(p) == len(t)


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every topic matched by pattern `inner` is also matched by pattern `outer`."""
    o = outer.split(".")
    n = inner.split(".")
    for i, token in enumerate(o):
        if i >= len(n):
            return False
        if token == TAIL:
            return not (i == 0 and n[0].startswith("$"))
        if token == STAR:
            if n[i] == TAIL or (i == 0 and n[0].startswith("$")):
                return False
        elif token != n[i]:
            return False
    return len(o) == len(n)


@dataclass(slots=True)
class _Level(Generic[V]):
    """One trie level: literal children, the `*` child, and values of a `>` ending here."""

    nodes: dict[str, _Node[V]] = field(default_factory=dict)
    star: _Node[V] | None = None
    tail: set[V] = field(default_factory=set)

    def empty(self) -> bool:
        return not self.nodes and self.star is None and not self.tail


@dataclass(slots=True)
class _Node(Generic[V]):
    """A trie node: values of patterns ending exactly here, and the next level."""

    values: set[V] = field(default_factory=set)
    next: _Level[V] = field(default_factory=_Level)

    def empty(self) -> bool:
        return not self.values and self.next.empty()


class TopicIndex(Generic[V]):
    """Maps subscription patterns to values and finds every value whose pattern matches a topic.

    Not thread-safe: the broker's poll loop is its only user. `cache_size=0` disables the
    result cache (tests run every case both ways).
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._exact: dict[str, set[V]] = {}
        self._root: _Level[V] = _Level()
        self._wildcards = 0
        self._cache: dict[str, tuple[V, ...]] = {}
        self._cache_size = cache_size
        self._count = 0

    def __len__(self) -> int:
        """Number of (pattern, value) entries."""
        return self._count

    def insert(self, pattern: str, value: V) -> bool:
        """Add `value` under `pattern` (validated); False if it was already there."""
        tokens = pattern_tokens(pattern)
        if is_literal(pattern):
            bucket = self._exact.setdefault(pattern, set())
        else:
            bucket = self._wild_bucket(tokens, create=True)
        if value in bucket:
            return False
        bucket.add(value)
        self._count += 1
        if not is_literal(pattern):
            self._wildcards += 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Remove `value` from `pattern`; False if it was not there. Prunes empty trie nodes."""
        tokens = pattern_tokens(pattern)
        if is_literal(pattern):
            bucket = self._exact.get(pattern)
            if bucket is None or value not in bucket:
                return False
            bucket.discard(value)
            if not bucket:
                del self._exact[pattern]
        else:
            if not self._remove_wild(self._root, tokens, value):
                return False
            self._wildcards -= 1
        self._count -= 1
        self._cache.clear()
        return True

    def match(self, topic: str) -> tuple[V, ...]:
        """Every value whose pattern matches `topic` (a valid published topic), in no order."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: set[V] = set()
        exact = self._exact.get(topic)
        if exact:
            found.update(exact)
        if self._wildcards:
            self._collect(self._root, topic.split("."), 0, found)
        result = tuple(found)
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[topic] = result
        return result

    def has_interest(self, topic: str) -> bool:
        """Whether any pattern matches `topic`."""
        return bool(self.match(topic))

    def patterns(self) -> Iterable[str]:
        """The literal patterns held (for diagnostics)."""
        return self._exact.keys()

    def _wild_bucket(self, tokens: list[str], create: bool) -> set[V]:
        level = self._root
        last = len(tokens) - 1
        for position, token in enumerate(tokens):
            if token == TAIL:
                return level.tail
            if token == STAR:
                if level.star is None:
                    level.star = _Node()
                node = level.star
            else:
                node = level.nodes.setdefault(token, _Node())
            if position == last:
                return node.values
            level = node.next
        raise AssertionError("unreachable: tokens is never empty")

    def _remove_wild(self, level: _Level[V], tokens: list[str], value: V) -> bool:
        """Recursive removal that prunes nodes left empty behind it."""
        token = tokens[0]
        if token == TAIL:
            if value not in level.tail:
                return False
            level.tail.discard(value)
            return True
        node = level.star if token == STAR else level.nodes.get(token)
        if node is None:
            return False
        if len(tokens) == 1:
            if value not in node.values:
                return False
            node.values.discard(value)
        elif not self._remove_wild(node.next, tokens[1:], value):
            return False
        if node.empty():
            if token == STAR:
                level.star = None
            else:
                del level.nodes[token]
        return True

    def _collect(self, level: _Level[V], tokens: list[str], position: int, found: set[V]) -> None:
        guard = position == 0 and tokens[0].startswith("$")
        if level.tail and not guard:
            found.update(level.tail)
        last = position == len(tokens) - 1
        literal = level.nodes.get(tokens[position])
        if literal is not None:
            if last:
                found.update(literal.values)
            else:
                self._collect(literal.next, tokens, position + 1, found)
        star = level.star
        if star is not None and not guard:
            if last:
                found.update(star.values)
            else:
                self._collect(star.next, tokens, position + 1, found)
