"""Deny-by-default authorisation of SUB and PUB against an app's manifest permissions.

A publish is allowed when some `publish` pattern matches the topic; a subscription when
some `subscribe` pattern covers the whole requested pattern (every topic it can match).
`$sys.` topics are published only by platform identities (`$...`). Results of publish
checks are cached per topic (bounded), because the same app publishes to the same few
topics millions of times.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.errors import AuthFailure, Code, PermissionViolation
from broker.manifests import Permissions
from broker.protocol import RESERVED_PREFIX, SYS_TOPIC_PREFIX
from broker.topics import pattern_covers, pattern_matches

PLATFORM_PERMISSIONS = Permissions(
    publish=(">", "$sys.>"), subscribe=(">", "$sys.>"), request=(">", "$sys.>")
)
_CACHE_LIMIT = 1024


def permissions_of(app_id: str, lookup: Callable[[str], Permissions | None]) -> Permissions:
    """An authenticated app's permissions: all for platform ids (`$...`), else its
    manifest's (`lookup`); AuthFailure when there is no id or no manifest."""
    if not app_id:
        raise AuthFailure(Code.IDENTITY_UNKNOWN, "connection has no authenticated app id")
    if app_id.startswith(RESERVED_PREFIX):
        return PLATFORM_PERMISSIONS
    permissions = lookup(app_id)
    if permissions is None:
        raise AuthFailure(Code.MANIFEST_MISSING, f"no manifest for app {app_id!r}")
    return permissions


class Authorizer:
    """One app's permissions, with a bounded cache of publish decisions."""

    __slots__ = ("_cache", "app_id", "permissions", "platform")

    def __init__(self, app_id: str, permissions: Permissions) -> None:
        self.app_id = app_id
        self.permissions = permissions
        self.platform = app_id.startswith(RESERVED_PREFIX)
        self._cache: dict[str, bool] = {}

    def check_publish(self, topic: str) -> None:
        """Raise PermissionViolation unless the app may publish to `topic` (a valid topic)."""
        allowed = self._cache.get(topic)
        if allowed is None:
            allowed = self._decide_publish(topic)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = allowed
        if not allowed:
            if topic.startswith(SYS_TOPIC_PREFIX) and not self.platform:
                raise PermissionViolation(
                    Code.RESERVED_TOPIC,
                    f"app {self.app_id!r} may not publish to {topic!r}",
                    topic=topic,
                )
            raise PermissionViolation(
                Code.PUBLISH_DENIED,
                f"app {self.app_id!r} may not publish to {topic!r}; add "
                f'publish = ["{topic}"] (or a wildcard covering it) to its manifest',
                topic=topic,
            )

    def _decide_publish(self, topic: str) -> bool:
        if topic.startswith(SYS_TOPIC_PREFIX) and not self.platform:
            return False
        return any(pattern_matches(p, topic) for p in self.permissions.publish)

    def check_request(self, topic: str) -> None:
        """Raise PermissionViolation unless some `request` pattern matches `topic`."""
        if any(pattern_matches(p, topic) for p in self.permissions.request):
            return
        raise PermissionViolation(
            Code.REQUEST_DENIED,
            f"app {self.app_id!r} may not send requests to {topic!r}; add "
            f'request = ["{topic}"] (or a wildcard covering it) to its manifest',
            topic=topic,
        )

    def check_subscribe(self, pattern: str) -> None:
        """Raise PermissionViolation unless some subscribe pattern covers `pattern`."""
        if any(pattern_covers(p, pattern) for p in self.permissions.subscribe):
            return
        raise PermissionViolation(
            Code.SUBSCRIBE_DENIED,
            f"app {self.app_id!r} may not subscribe to {pattern!r}; add "
            f'subscribe = ["{pattern}"] (or a pattern covering it) to its manifest',
            pattern=pattern,
        )
