"""Request/reply: a REQ goes to one serving subscription, its REP back to who asked.

Requests rotate over the attached serving subscriptions of the topic (round robin). The
requester's reply id (128 random bits it chose, seen only by the responder) maps to the
asking session until the request's time to live ends, on the monotonic clock; a reply to
an unknown, expired or foreign id is refused (and reported as a denial by the router).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from broker import protocol as P
from broker.errors import CapExceeded, Code, DeliveryFailure, ProtocolViolation, WireError
from broker.topics import validate_topic
from broker.wire import Reply, Request

if TYPE_CHECKING:
    from broker.router import Outbound, Router
    from broker.sessions import Session, SessionKey

_PENDING_LIMIT = 131_072


class Requests:
    """Pending replies and the REQ/REP commands."""

    def __init__(self, core: Router) -> None:
        self._core = core
        self._pending: OrderedDict[str, tuple[SessionKey, int]] = OrderedDict()
        """reply id -> (asking session, monotonic deadline), oldest first."""
        self.per_app: dict[str, int] = {}
        """app id -> its pending requests (the `pending_requests` cap)."""
        self._routed = 0

    def __len__(self) -> int:
        return len(self._pending)

    def request(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Hand a request to one serving subscription; remember who asked."""
        core = self._core
        req = Request.decode(frames)
        header = req.header
        try:
            validate_topic(header.topic)
            session.authorizer.check_request(header.topic)
            if len(req.payload) > P.MAX_PAYLOAD_BYTES:
                raise ProtocolViolation(Code.TOO_LARGE, "request payload exceeds the limit")
            servers = core.subscriptions.servers(header.topic)
            if not servers:
                raise DeliveryFailure(
                    Code.NO_RESPONDERS, f"no app serves {header.topic!r} right now"
                )
            held = self._pending.get(req.reply)
            if held is not None and held[0][0] != session.app_id:
                raise ProtocolViolation(
                    Code.BAD_HEADER, "this reply id is in use; pick 128 random bits per request"
                )
            self._forget(req.reply)  # the app reused its own: the new request replaces it
            cap = session.caps.pending_requests
            if self.per_app.get(session.app_id, 0) >= cap:
                raise CapExceeded(
                    Code.PENDING_LIMIT,
                    "pending_requests",
                    cap,
                    f"app {session.app_id!r} already waits for {cap} replies",
                )
        except WireError as exc:
            exc.ref["id"] = header.msg_id
            raise
        key, sid = servers[self._routed % len(servers)]
        self._routed += 1
        self._pending[req.reply] = (session.key, now_ns + req.ttl_ms * 1_000_000)
        self.per_app[session.app_id] = self.per_app.get(session.app_id, 0) + 1
        if len(self._pending) > _PENDING_LIMIT:
            self._count_out(self._pending.popitem(last=False)[1][0][0])
        target = core.sessions.by_key[key]
        return core.hand_to(target, sid, session, header, req.header_raw, req.payload, now_ns)

    def reply(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Deliver a responder's answer to the session that asked (reply sid 0)."""
        core = self._core
        rep = Reply.decode(frames)
        header = rep.header
        if len(rep.payload) > P.MAX_PAYLOAD_BYTES:
            raise ProtocolViolation(
                Code.TOO_LARGE, "reply payload exceeds the limit", id=header.msg_id
            )
        try:
            validate_topic(header.topic)
        except WireError as exc:
            exc.ref["id"] = header.msg_id
            raise
        pending = self._forget(rep.to) if rep.to else None
        if pending is None or pending[1] < now_ns or pending[0] not in core.sessions.by_key:
            raise DeliveryFailure(
                Code.UNKNOWN_REPLY, "no pending request for this reply", id=header.msg_id
            )
        target = core.sessions.by_key[pending[0]]
        return core.hand_to(
            target, P.REPLY_SID, session, header, rep.header_raw, rep.payload, now_ns
        )

    def expire(self, now_ns: int) -> None:
        """Forget requests whose time to live ended (deadlines are in arrival order only
        per ttl, so this drops the expired ones at the front)."""
        pending = self._pending
        while pending and next(iter(pending.values()))[1] < now_ns:
            self._count_out(pending.popitem(last=False)[1][0][0])

    def _forget(self, reply_id: str) -> tuple[SessionKey, int] | None:
        """Take one pending request out (None: there is none of that id)."""
        pending = self._pending.pop(reply_id, None)
        if pending is not None:
            self._count_out(pending[0][0])
        return pending

    def _count_out(self, app_id: str) -> None:
        left = self.per_app[app_id] - 1
        if left:
            self.per_app[app_id] = left
        else:
            del self.per_app[app_id]
