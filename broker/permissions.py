"""Deny-by-default authorisation of SUB and PUB against an app's manifest permissions.

A publish is allowed when some `publish` pattern matches the topic; a subscription when
some `subscribe` pattern covers the whole requested pattern (every topic it can match).
`$sys.` topics are published only by the platform identity that owns them
(SYS_TOPIC_OWNERS): no app, and no other platform identity (`$cli` included), may forge a
platform event. Results of publish checks are cached per topic (bounded), because the same
app publishes to the same few topics millions of times.
"""

from __future__ import annotations

from collections.abc import Callable

from broker.errors import AuthFailure, Code, PermissionViolation
from broker.manifests import Permissions
from broker.protocol import (
    BROKER_ID,
    EVENTS_ALERT_TOPIC,
    LIFECYCLE_TOPIC_PREFIX,
    METRICS_TOPIC,
    PERSISTENCE_ID,
    RESERVED_PREFIX,
    STORAGE_ALERT_TOPIC,
    SUPERVISOR_CONTROL_TOPIC,
    SUPERVISOR_ID,
    SYS_TOPIC_PREFIX,
    UNRESPONSIVE_TOPIC,
)
from broker.topics import pattern_covers, pattern_matches

SYS_TOPIC_OWNERS: tuple[tuple[str, str], ...] = (
    (f"{LIFECYCLE_TOPIC_PREFIX}>", SUPERVISOR_ID),
    (METRICS_TOPIC, SUPERVISOR_ID),
    (SUPERVISOR_CONTROL_TOPIC, SUPERVISOR_ID),
    (UNRESPONSIVE_TOPIC, BROKER_ID),
    (EVENTS_ALERT_TOPIC, BROKER_ID),
    (STORAGE_ALERT_TOPIC, PERSISTENCE_ID),
)
"""Who may publish each platform topic: (pattern, owning identity). A `$sys.` topic no
pattern here matches is published by no one. Requests to `$sys.supervisor.apps` (the
CLI's app commands) are REQ, checked by `request` permissions, not by this table."""

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


def sys_topic_owner(topic: str) -> str | None:
    """The platform identity that alone may publish `$sys.` topic `topic` (None: nobody)."""
    for pattern, owner in SYS_TOPIC_OWNERS:
        if pattern_matches(pattern, topic):
            return owner
    return None


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
            if topic.startswith(SYS_TOPIC_PREFIX):
                owner = sys_topic_owner(topic)
                whose = f"published by {owner} only" if owner else "published by no one"
                raise PermissionViolation(
                    Code.RESERVED_TOPIC,
                    f"{self.app_id!r} may not publish to {topic!r}: a platform topic, {whose}",
                    topic=topic,
                )
            raise PermissionViolation(
                Code.PUBLISH_DENIED,
                f"app {self.app_id!r} may not publish to {topic!r}",
                fix=f'add publish = ["{topic}"] (or a wildcard covering it) to [permissions] '
                f"in {self.app_id}'s manifest",
                topic=topic,
            )

    def _decide_publish(self, topic: str) -> bool:
        if topic.startswith(SYS_TOPIC_PREFIX):
            return self.platform and sys_topic_owner(topic) == self.app_id
        return any(pattern_matches(p, topic) for p in self.permissions.publish)

    def check_request(self, topic: str) -> None:
        """Raise PermissionViolation unless some `request` pattern matches `topic`."""
        if any(pattern_matches(p, topic) for p in self.permissions.request):
            return
        raise PermissionViolation(
            Code.REQUEST_DENIED,
            f"app {self.app_id!r} may not send requests to {topic!r}",
            fix=f'add request = ["{topic}"] (or a wildcard covering it) to [permissions] '
            f"in {self.app_id}'s manifest",
            topic=topic,
        )

    def check_subscribe(self, pattern: str) -> None:
        """Raise PermissionViolation unless some subscribe pattern covers `pattern`."""
        if any(pattern_covers(p, pattern) for p in self.permissions.subscribe):
            return
        raise PermissionViolation(
            Code.SUBSCRIBE_DENIED,
            f"app {self.app_id!r} may not subscribe to {pattern!r}",
            fix=f'add subscribe = ["{pattern}"] (or a pattern covering it) to [permissions] '
            f"in {self.app_id}'s manifest",
            pattern=pattern,
        )
