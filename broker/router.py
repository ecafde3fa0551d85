"""The broker's pure core: frames from an authenticated peer in, frames to send out.

`Router.handle(peer, app_id, frames, now_ns)` decides everything the broker does with one
inbound message and returns `Outbound` tuples; it never touches a socket or a clock, so
tests drive it directly. The server loop owns the sockets and feeds it.

Hot path (PUB): decode the header once, check the topic (cached) and the permission
(cached), stamp it, and append `[sids, stamp, header, payload]` to the DELIVER batch of
every matching peer. Header and payload are forwarded as the publisher sent them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import protocol as P
from broker.codec import (
    decode_pub_header,
    encode_sids,
    encode_stamp,
    pack,
    required_int,
    required_text,
    unpack_map,
)
from broker.errors import (
    AuthFailure,
    Code,
    PermissionViolation,
    ProtocolViolation,
    WireError,
    error_body,
)
from broker.manifests import Permissions
from broker.permissions import PLATFORM_PERMISSIONS, Authorizer
from broker.topics import TopicIndex, pattern_tokens, validate_topic

Outbound = tuple[bytes, list[bytes]]
"""(peer routing id, frames) — one multipart message to send."""

Route = tuple[bytes, bytes]
"""(peer routing id, packed subscription ids of that peer matching a topic)."""

_ROUTE_CACHE_LIMIT = 8192
_VALID_TOPIC_LIMIT = 65536


@dataclass(slots=True)
class Session:
    """One authenticated connection: who it is, what it subscribed, when it was last heard."""

    peer: bytes
    app_id: str
    authorizer: Authorizer
    version: int
    last_seen_ns: int
    subscriptions: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Settings of the routing core."""

    heartbeat_ms: int = P.DEFAULT_HEARTBEAT_MS
    peer_timeout_ms: int = P.DEFAULT_PEER_TIMEOUT_MS
    route_cache: int = 4096


@dataclass(slots=True)
class RouterStats:
    """Counters since start; `snapshot()` gives a plain dict for STATS and `plexus status`."""

    published: int = 0
    delivered: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    sessions_opened: int = 0
    sessions_expired: int = 0
    undeliverable: int = 0


PermissionsLookup = Callable[[str], Permissions | None]


class Router:
    """Sessions, subscriptions and routing decisions of one broker."""

    def __init__(
        self,
        permissions_for: PermissionsLookup,
        config: RouterConfig | None = None,
        extra_stats: Callable[[bool], dict[str, Any]] | None = None,
    ) -> None:
        self._config = config or RouterConfig()
        self._permissions_for = permissions_for
        self._extra_stats = extra_stats
        self._sessions: dict[bytes, Session] = {}
        self._index: TopicIndex[tuple[bytes, int]] = TopicIndex(self._config.route_cache)
        self._routes: dict[str, tuple[Route, ...]] = {}
        self._valid_topics: set[str] = set()
        self._seq = 0
        self.stats = RouterStats()

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Everything to send in answer to one inbound multipart message from `peer`."""
        command = frames[0]
        try:
            if command == P.PUB:
                return self._publish(self._session(peer, app_id, now_ns), frames, now_ns)
            if command == P.HELLO:
                return self._hello(peer, app_id, frames, now_ns)
            if command not in P.CLIENT_COMMANDS:
                raise ProtocolViolation(Code.UNKNOWN_COMMAND, f"unknown command {command[:16]!r}")
            session = self._session(peer, app_id, now_ns)
            if command == P.SUB:
                return self._subscribe(session, frames)
            if command == P.UNSUB:
                return self._unsubscribe(session, frames)
            if command == P.PING:
                echo = frames[1] if len(frames) == 2 and len(frames[1]) <= 64 else b"\x80"
                return [(peer, [P.PONG, echo])]
            if command == P.BYE:
                self.drop_peer(peer)
                return []
            return self._stats(session, frames, now_ns)
        except WireError as exc:
            return [self.error(peer, exc)]

    def error(self, peer: bytes, exc: WireError) -> Outbound:
        """The ERROR message for `exc`, counted."""
        self.stats.errors[int(exc.code)] = self.stats.errors.get(int(exc.code), 0) + 1
        return (peer, [P.ERROR, pack(error_body(exc.code, exc.detail, exc.ref))])

    def _session(self, peer: bytes, app_id: str, now_ns: int) -> Session:
        session = self._sessions.get(peer)
        if session is None:
            raise ProtocolViolation(Code.NOT_WELCOMED, "no session: send HELLO first")
        if session.app_id != app_id:
            raise AuthFailure(Code.IDENTITY_UNKNOWN, "connection identity changed")
        session.last_seen_ns = now_ns
        return session

    @staticmethod
    def _expect_frames(frames: list[bytes], count: int) -> None:
        if len(frames) != count:
            raise ProtocolViolation(
                Code.BAD_FRAME_COUNT,
                f"{frames[0].decode('ascii', 'replace')} takes {count} frames, got {len(frames)}",
            )

    # -- commands ---------------------------------------------------------------------------

    def _hello(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._expect_frames(frames, 2)
        header = unpack_map(frames[1])
        offered = header.get("v")
        if not isinstance(offered, list) or not all(type(v) is int for v in offered):
            raise ProtocolViolation(Code.BAD_HEADER, "HELLO field 'v' must be a list of integers")
        common = set(offered) & set(P.PROTOCOL_VERSIONS)
        if not common:
            raise ProtocolViolation(
                Code.UNSUPPORTED_VERSION,
                f"client offers versions {offered[:8]}, broker speaks {list(P.PROTOCOL_VERSIONS)}",
            )
        if not app_id:
            raise AuthFailure(Code.IDENTITY_UNKNOWN, "connection has no authenticated app id")
        if app_id.startswith(P.RESERVED_PREFIX):
            permissions: Permissions | None = PLATFORM_PERMISSIONS
        else:
            permissions = self._permissions_for(app_id)
        if permissions is None:
            raise AuthFailure(Code.MANIFEST_MISSING, f"no manifest for app {app_id!r}")
        self.drop_peer(peer)  # a repeated HELLO starts a fresh session
        self._sessions[peer] = Session(
            peer, app_id, Authorizer(app_id, permissions), max(common), now_ns
        )
        self.stats.sessions_opened += 1
        welcome = {
            "v": max(common),
            "app": app_id,
            "heartbeat_ms": self._config.heartbeat_ms,
            "timeout_ms": self._config.peer_timeout_ms,
            "max_payload": P.MAX_PAYLOAD_BYTES,
            "max_batch": P.MAX_PUB_BATCH,
        }
        return [(peer, [P.WELCOME, pack(welcome)])]

    def _subscribe(self, session: Session, frames: list[bytes]) -> list[Outbound]:
        self._expect_frames(frames, 2)
        header = unpack_map(frames[1])
        sid = required_int(header, "sid", 1, P.MAX_SID)
        pattern = required_text(header, "pattern")
        try:
            pattern_tokens(pattern)
            session.authorizer.check_subscribe(pattern)
            if sid in session.subscriptions:
                raise ProtocolViolation(Code.DUPLICATE_SID, f"subscription id {sid} is in use")
            if len(session.subscriptions) >= P.MAX_SUBSCRIPTIONS_PER_SESSION:
                raise ProtocolViolation(
                    Code.TOO_MANY_SUBSCRIPTIONS,
                    f"limit is {P.MAX_SUBSCRIPTIONS_PER_SESSION} per session",
                )
        except WireError as exc:
            exc.ref.setdefault("sid", sid)
            raise
        session.subscriptions[sid] = pattern
        self._index.insert(pattern, (session.peer, sid))
        self._routes.clear()
        return [(session.peer, [P.SUBOK, pack({"sid": sid, "pattern": pattern})])]

    def _unsubscribe(self, session: Session, frames: list[bytes]) -> list[Outbound]:
        self._expect_frames(frames, 2)
        sid = required_int(unpack_map(frames[1]), "sid", 1, P.MAX_SID)
        pattern = session.subscriptions.pop(sid, None)
        if pattern is None:
            raise ProtocolViolation(Code.UNKNOWN_SID, f"no subscription {sid}", sid=sid)
        self._index.remove(pattern, (session.peer, sid))
        self._routes.clear()
        return [(session.peer, [P.UNSUBOK, pack({"sid": sid})])]

    def _stats(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        if not session.authorizer.platform:
            raise PermissionViolation(Code.COMMAND_DENIED, "STATS is for platform identities")
        reset = len(frames) == 2 and unpack_map(frames[1]).get("reset") is True
        return [(session.peer, [P.STATSOK, pack(self.snapshot(now_ns, reset))])]

    def _publish(  # noqa: PLR0912 - the hot path stays one flat loop, no call per message
        self, session: Session, frames: list[bytes], now_ns: int
    ) -> list[Outbound]:
        count = len(frames) - 1
        if count == 0 or count % 2:
            raise ProtocolViolation(
                Code.BAD_FRAME_COUNT, f"PUB takes header/payload pairs, got {count} frames"
            )
        if count > 2 * P.MAX_PUB_BATCH:
            raise ProtocolViolation(
                Code.TOO_LARGE, f"PUB batch of {count // 2} exceeds {P.MAX_PUB_BATCH}"
            )
        batches: dict[bytes, list[bytes]] = {}
        replies: list[Outbound] = []
        stamp_base = session.app_id
        for i in range(1, count, 2):
            header_raw = frames[i]
            payload = frames[i + 1]
            try:
                header = decode_pub_header(header_raw)
            except WireError as exc:
                exc.ref["index"] = i // 2
                replies.append(self.error(session.peer, exc))
                continue
            topic = header.topic
            try:
                if topic not in self._valid_topics:
                    validate_topic(topic)
                    if len(self._valid_topics) >= _VALID_TOPIC_LIMIT:
                        self._valid_topics.clear()
                    self._valid_topics.add(topic)
                session.authorizer.check_publish(topic)
                if len(payload) > P.MAX_PAYLOAD_BYTES:
                    raise ProtocolViolation(
                        Code.TOO_LARGE, f"payload of {len(payload)} bytes exceeds the limit"
                    )
            except WireError as exc:
                exc.ref["id"] = header.msg_id
                replies.append(self.error(session.peer, exc))
                continue
            self._seq += 1
            self.stats.published += 1
            if header.confirm:
                replies.append((session.peer, [P.CONFIRM, pack({"id": header.msg_id})]))
            routes = self._routes.get(topic)
            if routes is None:
                routes = self._build_routes(topic)
            if not routes:
                continue
            stamp = encode_stamp(self._seq, stamp_base, now_ns)
            for peer, sids in routes:
                batch = batches.get(peer)
                if batch is None:
                    batches[peer] = [P.DELIVER, sids, stamp, header_raw, payload]
                else:
                    batch += (sids, stamp, header_raw, payload)
            self.stats.delivered += len(routes)
        replies.extend(batches.items())
        return replies

    def _build_routes(self, topic: str) -> tuple[Route, ...]:
        by_peer: dict[bytes, list[int]] = {}
        for peer, sid in self._index.match(topic):
            by_peer.setdefault(peer, []).append(sid)
        routes = tuple((peer, encode_sids(tuple(sorted(sids)))) for peer, sids in by_peer.items())
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[topic] = routes
        return routes

    # -- lifecycle --------------------------------------------------------------------------

    def drop_peer(self, peer: bytes) -> None:
        """Forget a peer's session and subscriptions (BYE, expiry, unreachable)."""
        session = self._sessions.pop(peer, None)
        if session is None:
            return
        for sid, pattern in session.subscriptions.items():
            self._index.remove(pattern, (peer, sid))
        if session.subscriptions:
            self._routes.clear()

    def undeliverable(self, peer: bytes, messages: int) -> None:
        """The server could not hand `messages` to `peer` (gone or its queue full)."""
        self.stats.undeliverable += messages

    def housekeeping(self, now_ns: int) -> list[str]:
        """End sessions silent past the peer timeout; returns the app ids ended."""
        deadline = now_ns - self._config.peer_timeout_ms * 1_000_000
        expired = [s for s in self._sessions.values() if s.last_seen_ns < deadline]
        for session in expired:
            self.drop_peer(session.peer)
            self.stats.sessions_expired += 1
        return [s.app_id for s in expired]

    def session_of(self, peer: bytes) -> Session | None:
        return self._sessions.get(peer)

    def snapshot(self, now_ns: int, reset: bool = False) -> dict[str, Any]:
        """Plain-data statistics for STATS replies; `reset` restarts latency measurement."""
        apps: dict[str, dict[str, Any]] = {}
        for session in self._sessions.values():
            entry = apps.setdefault(session.app_id, {"sessions": 0, "last_seen_s_ago": None})
            entry["sessions"] += 1
            age = round((now_ns - session.last_seen_ns) / 1e9, 1)
            if entry["last_seen_s_ago"] is None or age < entry["last_seen_s_ago"]:
                entry["last_seen_s_ago"] = age
        data: dict[str, Any] = {
            "sessions": len(self._sessions),
            "apps": apps,
            "subscriptions": len(self._index),
            "published": self.stats.published,
            "delivered": self.stats.delivered,
            "undeliverable": self.stats.undeliverable,
            "errors": {str(k): v for k, v in sorted(self.stats.errors.items())},
            "sessions_opened": self.stats.sessions_opened,
            "sessions_expired": self.stats.sessions_expired,
            "seq": self._seq,
        }
        if self._extra_stats is not None:
            data.update(self._extra_stats(reset))
        return data
