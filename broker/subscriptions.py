"""Subscriptions: SUB and UNSUB, the topic indexes, and the cached routes of each topic.

Two indexes (broker.topics): one of subscriptions that receive publishes, one of serving
subscriptions that answer requests. In front of the first sits a cache from a literal topic
to its routes, one per session with the packed ids of its matching subscriptions (and the
durable ones among them), cleared on every change, so the hot path does one dict lookup.
Every subscription that starts or ends is an event (Subscribed, Unsubscribed), durable
or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker import protocol as P
from broker.codec import encode_sids
from broker.errors import CapExceeded, Code, ProtocolViolation, WireError
from broker.event_records import Subscribed, Unsubscribed
from broker.topics import TopicIndex, pattern_tokens
from broker.wire import Subscribe, SubscribeOk, Unsubscribe, UnsubscribeOk

if TYPE_CHECKING:
    from broker.router import Outbound, Router
    from broker.sessions import Session, SessionKey

Route = tuple["SessionKey", bytes, bytes]
"""(session, packed ids of its subscriptions matching a topic, the durable ones among
them or b"" when none is durable)."""

_ROUTE_CACHE_LIMIT = 8192


class Subscriptions:
    """The subscription indexes of one broker and the SUB/UNSUB commands."""

    def __init__(self, core: Router, route_cache: int) -> None:
        self._core = core
        self._index: TopicIndex[tuple[SessionKey, int]] = TopicIndex(route_cache)
        self._services: TopicIndex[tuple[SessionKey, int]] = TopicIndex(route_cache)
        self.routes: dict[str, tuple[Route, ...]] = {}
        """Literal topic -> its routes (the hot path reads this dict directly)."""
        self.durable_per_app: dict[str, int] = {}
        """app id -> its durable subscriptions over all its sessions (the cap)."""

    def __len__(self) -> int:
        return len(self._index)

    def subscribe(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        sub = Subscribe.decode(frames)
        sid, pattern = sub.sid, sub.pattern
        peer = session.peer
        assert peer is not None
        try:
            pattern_tokens(pattern)
            session.authorizer.check_subscribe(pattern)
            existing = session.subscriptions.get(sid)
            if existing == pattern:  # a resumed session re-sending its SUBs
                kept = SubscribeOk(sid, pattern, sid in session.durable)
                return [(peer, kept.frames())]
            if existing is not None:
                raise ProtocolViolation(Code.DUPLICATE_SID, f"subscription id {sid} is in use")
            if len(session.subscriptions) >= P.MAX_SUBSCRIPTIONS_PER_SESSION:
                raise ProtocolViolation(
                    Code.TOO_MANY_SUBSCRIPTIONS,
                    f"limit is {P.MAX_SUBSCRIPTIONS_PER_SESSION} per session",
                )
            cap = session.caps.durable_subscriptions
            if sub.durable and self.durable_per_app.get(session.app_id, 0) >= cap:
                raise CapExceeded(
                    Code.DURABLE_LIMIT,
                    "durable_subscriptions",
                    cap,
                    f"app {session.app_id!r} already has {cap} durable subscriptions",
                )
        except WireError as exc:
            exc.ref.setdefault("sid", sid)
            raise
        session.subscriptions[sid] = pattern
        if sub.durable:
            self._add_durable(session, sid)
        self._core.emit(
            Subscribed(session.app_id, session.name, sid, pattern, sub.durable, sub.serve)
        )
        if sub.serve:
            session.serving.add(sid)
            self._services.insert(pattern, (session.key, sid))
        else:
            self._index.insert(pattern, (session.key, sid))
            self.routes.clear()
        return [(peer, SubscribeOk(sid, pattern, sub.durable).frames())]

    def unsubscribe(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        sid = Unsubscribe.decode(frames).sid
        if sid not in session.subscriptions:
            raise ProtocolViolation(Code.UNKNOWN_SID, f"no subscription {sid}", sid=sid)
        self._end(session, sid, "unsubscribe")
        assert session.peer is not None
        return [(session.peer, UnsubscribeOk(sid).frames())]

    def end_transient(self, session: Session, reason: str) -> None:
        """A session ended: its non-durable subscriptions go (`reason` in the events)."""
        for sid in [sid for sid in session.subscriptions if sid not in session.durable]:
            self._end(session, sid, reason)

    def _end(self, session: Session, sid: int, reason: str) -> None:
        pattern = session.subscriptions.pop(sid)
        durable = sid in session.durable
        if durable:
            session.durable.discard(sid)
            app = session.app_id
            left = self.durable_per_app[app] - 1
            if left:
                self.durable_per_app[app] = left
            else:
                del self.durable_per_app[app]
        self._core.emit(Unsubscribed(session.app_id, session.name, sid, durable, reason))
        if sid in session.serving:
            session.serving.discard(sid)
            self._services.remove(pattern, (session.key, sid))
        else:
            self._index.remove(pattern, (session.key, sid))
            self.routes.clear()

    def restore(self, session: Session, subscriptions: dict[int, str]) -> None:
        """Durable subscriptions rebuilt from the store (no events: they are stored)."""
        for sid, pattern in subscriptions.items():
            session.subscriptions[sid] = pattern
            self._add_durable(session, sid)
            self._index.insert(pattern, (session.key, sid))
        self.routes.clear()

    def _add_durable(self, session: Session, sid: int) -> None:
        if sid not in session.durable:
            session.durable.add(sid)
            app = session.app_id
            self.durable_per_app[app] = self.durable_per_app.get(app, 0) + 1

    # -- lookups ----------------------------------------------------------------------------

    def build_routes(self, topic: str) -> tuple[Route, ...]:
        """The routes of `topic` (cached until the next subscription change)."""
        by_session: dict[SessionKey, list[int]] = {}
        for key, sid in self._index.match(topic):
            by_session.setdefault(key, []).append(sid)
        routes = tuple(
            (key, encode_sids(tuple(sorted(sids))), self.durable_sids(key, sids))
            for key, sids in by_session.items()
        )
        if len(self.routes) >= _ROUTE_CACHE_LIMIT:
            self.routes.clear()
        self.routes[topic] = routes
        return routes

    def durable_sids(self, key: SessionKey, sids: list[int]) -> bytes:
        durable = self._core.sessions.by_key[key].durable
        kept = tuple(sorted(sid for sid in sids if sid in durable))
        return encode_sids(kept) if kept else b""

    def servers(self, topic: str) -> list[tuple[SessionKey, int]]:
        """Attached serving subscriptions matching `topic`, in a stable order."""
        sessions = self._core.sessions.by_key
        return sorted(
            (key, sid)
            for key, sid in self._services.match(topic)
            if sessions[key].peer is not None  # a gone responder cannot answer
        )
