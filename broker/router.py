"""The broker's pure core: frames from an authenticated peer in, frames to send out.

`Router.handle(peer, app_id, frames, now_ns)` decides everything the broker does with one
inbound message and returns `Outbound` tuples; it never touches a socket or a clock, so
tests drive it directly. The server loop owns the sockets and feeds it.

Sessions are keyed by (app id, session name), not by connection: a client that reconnects
with the same name resumes its subscriptions and everything queued meanwhile. Each
session's `Mailbox` (broker.delivery) holds its queue, in-flight window and retries;
failures end in the dead-letter queue (broker.dlq), never silently.

Hot path (PUB): decode the header once, check the topic (cached) and the permission
(cached), drop duplicates by message id, queue a `Delivery` for every matching session,
and send each attached session what its window allows as `[sids, stamp, header, payload]`
groups of one DELIVER. Header and payload are forwarded as the publisher sent them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import events as E
from broker import protocol as P
from broker.codec import (
    PubHeader,
    decode_pub_header,
    decode_sids,
    encode_pub_header,
    encode_sids,
    encode_stamp,
    new_message_id,
    pack,
    required_int,
    required_text,
    unpack_map,
)
from broker.delivery import Delivery, DeliveryConfig, Mailbox
from broker.dlq import DeadLetter, DeadLetterQueue
from broker.errors import (
    AuthFailure,
    Code,
    DeliveryFailure,
    PermissionViolation,
    ProtocolViolation,
    StorageFailure,
    WireError,
    error_body,
)
from broker.events import EventLog
from broker.manifests import Permissions
from broker.permissions import Authorizer, permissions_of
from broker.topics import TopicIndex, pattern_tokens, validate_topic

Outbound = tuple[bytes, list[bytes]]
"""(peer routing id, frames) — one multipart message to send."""

SessionKey = tuple[str, str]
"""(app id, session name)."""

Route = tuple[SessionKey, bytes, bytes]
"""(session, packed ids of its subscriptions matching a topic, the durable ones among
them or b"" when none is durable)."""

_ROUTE_CACHE_LIMIT = 8192
_VALID_TOPIC_LIMIT = 65536
_DEDUPE_LIMIT = 131_072
_SESSION_NAME_LIMIT = 64


@dataclass(slots=True)
class Session:
    """One app session: its connection (if attached), subscriptions and mailbox."""

    key: SessionKey
    authorizer: Authorizer
    version: int
    last_seen_ns: int
    mailbox: Mailbox
    peer: bytes | None = None
    detached_at_ns: int = 0
    subscriptions: dict[int, str] = field(default_factory=dict)
    durable: set[int] = field(default_factory=set)
    serving: set[int] = field(default_factory=set)
    """Subscriptions that answer requests (each request goes to one serving subscription)."""

    @property
    def app_id(self) -> str:
        return self.key[0]


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Settings of the routing core."""

    heartbeat_ms: int = P.DEFAULT_HEARTBEAT_MS
    peer_timeout_ms: int = P.DEFAULT_PEER_TIMEOUT_MS
    route_cache: int = 4096
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dlq_max: int = 10_000
    store_endpoint: str | None = None
    """The persistence query socket, told to clients in WELCOME (None: persistence off)."""


@dataclass(slots=True)
class RouterStats:
    """Counters since start; `snapshot()` gives a plain dict for STATS and `plexus status`."""

    published: int = 0
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    duplicates: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    sessions_opened: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    unresponsive: int = 0
    undeliverable: int = 0


PermissionsLookup = Callable[[str], Permissions | None]
Event = dict[str, Any]


def confirm_messages(peer: bytes, ids: list[bytes]) -> list[Outbound]:
    """CONFIRMs for `ids`, split so each header stays under the protocol's 8 KiB."""
    step = P.MAX_CONFIRM_IDS
    return [(peer, [P.CONFIRM, pack({"ids": ids[i : i + step]})]) for i in range(0, len(ids), step)]


class Router:
    """Sessions, subscriptions, deliveries and routing decisions of one broker."""

    def __init__(
        self,
        permissions_for: PermissionsLookup,
        config: RouterConfig | None = None,
        extra_stats: Callable[[bool], dict[str, Any]] | None = None,
        event_log: EventLog | None = None,
        first_delivery_seq: int = 0,
    ) -> None:
        self._config = config or RouterConfig()
        self._permissions_for = permissions_for
        self._extra_stats = extra_stats
        self._sessions: dict[SessionKey, Session] = {}
        self._peers: dict[bytes, Session] = {}
        self._index: TopicIndex[tuple[SessionKey, int]] = TopicIndex(self._config.route_cache)
        self._services: TopicIndex[tuple[SessionKey, int]] = TopicIndex(self._config.route_cache)
        self._pending_replies: OrderedDict[str, tuple[SessionKey, int]] = OrderedDict()
        self._requests_routed = 0
        self._routes: dict[str, tuple[Route, ...]] = {}
        self._valid_topics: set[str] = set()
        self._seen_ids: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        """(sender, message id) -> event seq of recent publishes, to drop resends."""
        self._seq = first_delivery_seq
        """Delivery seqs: a restarted broker starts above the last one (wall-clock µs), so
        a late ACK meant for its predecessor can never acknowledge a new delivery."""
        self._last_ts = 0
        self.log = event_log or EventLog(epoch=0, retain=False)
        """The event stream (persistence and audit consume it)."""
        self.dlq = DeadLetterQueue(self._config.dlq_max)
        self.stats = RouterStats()
        self._handlers: dict[bytes, Callable[[Session, list[bytes], int], list[Outbound]]] = {
            P.NACK: self._nack,
            P.SUB: self._subscribe,
            P.UNSUB: self._unsubscribe,
            P.PING: self._ping,
            P.BYE: self._bye,
            P.REQ: self._request,
            P.REP: self._reply,
            P.DLQ: self._dead_letters,
            P.STATS: self._stats,
        }
        """Commands of a welcomed session (PUB, ACK and HELLO are dispatched before)."""
        self.events: list[Event] = []
        """Things worth a log line (expiry, unresponsive, dead letters); the server drains it."""

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Everything to send in answer to one inbound multipart message from `peer`."""
        command = frames[0]
        try:
            if command == P.PUB:
                return self._publish(self._session(peer, app_id, now_ns), frames, now_ns)
            if command == P.ACK:
                return self._ack(self._session(peer, app_id, now_ns), frames, now_ns)
            if command == P.HELLO:
                return self._hello(peer, app_id, frames, now_ns)
            if command not in P.CLIENT_COMMANDS:
                raise ProtocolViolation(Code.UNKNOWN_COMMAND, f"unknown command {command[:16]!r}")
            session = self._session(peer, app_id, now_ns)
            return self._handlers[command](session, frames, now_ns)
        except WireError as exc:
            return [self.error(peer, exc)]

    def _ping(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        assert session.peer is not None
        echo = frames[1] if len(frames) == 2 and len(frames[1]) <= 64 else b"\x80"
        return [(session.peer, [P.PONG, echo])]

    def _bye(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._end(session, now_ns, "bye")
        return []

    def error(self, peer: bytes, exc: WireError) -> Outbound:
        """The ERROR message for `exc`, counted."""
        self.stats.errors[int(exc.code)] = self.stats.errors.get(int(exc.code), 0) + 1
        return (peer, [P.ERROR, pack(error_body(exc.code, exc.detail, exc.ref))])

    def _session(self, peer: bytes, app_id: str, now_ns: int) -> Session:
        session = self._peers.get(peer)
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

    # -- sessions ---------------------------------------------------------------------------

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
        acked = header.get("ack", True)
        if not isinstance(acked, bool):
            raise ProtocolViolation(Code.BAD_HEADER, "HELLO field 'ack' must be a boolean")
        name = header.get("session", P.DEFAULT_SESSION)
        if not isinstance(name, str) or not 0 < len(name) <= _SESSION_NAME_LIMIT:
            raise ProtocolViolation(Code.BAD_HEADER, "HELLO field 'session' must be 1-64 chars")
        permissions = permissions_of(app_id, self._permissions_for)
        out: list[Outbound] = []
        previous = self._peers.pop(peer, None)
        if previous is not None and previous.key != (app_id, name):
            self._detach(previous, now_ns)
        key = (app_id, name)
        session = self._sessions.get(key)
        resumed = session is not None
        if session is None:
            session = Session(
                key,
                Authorizer(app_id, permissions),
                max(common),
                now_ns,
                Mailbox(self._config.delivery),
            )
            self._sessions[key] = session
            self.stats.sessions_opened += 1
        else:
            self.stats.sessions_resumed += 1
            session.authorizer = Authorizer(app_id, permissions)  # the manifest may have changed
            if session.peer != peer:  # a new connection: what the old one held comes again
                if session.peer is not None:
                    taken = AuthFailure(
                        Code.SESSION_TAKEN_OVER,
                        f"session {name!r} of {app_id!r} was resumed by another connection",
                    )
                    out.append(self.error(session.peer, taken))
                    self._peers.pop(session.peer, None)
                self._requeue_in_flight(session, now_ns)
        session.peer = peer
        session.last_seen_ns = now_ns
        session.mailbox.auto_ack = not acked
        self._peers[peer] = session
        welcome = {
            "v": max(common),
            "app": app_id,
            "session": name,
            "resumed": resumed,
            "subs": [[sid, pattern] for sid, pattern in sorted(session.subscriptions.items())],
            "heartbeat_ms": self._config.heartbeat_ms,
            "timeout_ms": self._config.peer_timeout_ms,
            "grace_ms": self._config.delivery.grace_ms,
            "max_payload": P.MAX_PAYLOAD_BYTES,
            "max_batch": P.MAX_PUB_BATCH,
            "window": self._config.delivery.window,
            "store": self._config.store_endpoint,
        }
        out.append((peer, [P.WELCOME, pack(welcome)]))
        out.extend(self._pump(session, now_ns))
        return out

    def _detach(self, session: Session, now_ns: int) -> None:
        """The connection is gone; the session waits for a resume until its grace ends."""
        if session.peer is not None:
            self._peers.pop(session.peer, None)
        session.peer = None
        session.detached_at_ns = now_ns
        self._requeue_in_flight(session, now_ns)

    def _requeue_in_flight(self, session: Session, now_ns: int) -> None:
        """Unacknowledged deliveries go back to the queue front; out of attempts: dead."""
        for dead in session.mailbox.detach():
            self._dead(session, dead, "ack-timeout", now_ns)

    def _end(self, session: Session, now_ns: int, why: str) -> None:
        """End a session: non-durable subscriptions go, what they held is dead-lettered."""
        self._detach(session, now_ns)
        for sid in [sid for sid in session.subscriptions if sid not in session.durable]:
            self._forget_subscription(session, sid, session.subscriptions.pop(sid))
        if session.durable:  # the session lives on for its durable subscriptions, queue kept
            return
        del self._sessions[session.key]
        for delivery in session.mailbox.drain():
            delivery.last_error = f"session ended ({why})"
            self._dead(session, delivery, "expired", now_ns)

    def drop_peer(self, peer: bytes, now_ns: int = 0) -> None:
        """The server found `peer` unreachable: detach its session (grace period starts)."""
        session = self._peers.get(peer)
        if session is not None:
            self._detach(session, now_ns or session.last_seen_ns)

    # -- subscriptions ----------------------------------------------------------------------

    def _subscribe(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._expect_frames(frames, 2)
        header = unpack_map(frames[1])
        sid = required_int(header, "sid", 1, P.MAX_SID)
        pattern = required_text(header, "pattern")
        durable = header.get("durable", False) is True
        serve = header.get("serve", False) is True
        peer = session.peer
        assert peer is not None
        try:
            pattern_tokens(pattern)
            session.authorizer.check_subscribe(pattern)
            existing = session.subscriptions.get(sid)
            if existing == pattern:  # a resumed session re-sending its SUBs
                kept = {"sid": sid, "pattern": pattern, "durable": sid in session.durable}
                return [(peer, [P.SUBOK, pack(kept)])]
            if existing is not None:
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
        if durable:
            session.durable.add(sid)
        self.log.append(E.SUB, now_ns, session.app_id, session.key[1], sid, pattern, durable)
        if serve:
            session.serving.add(sid)
            self._services.insert(pattern, (session.key, sid))
        else:
            self._index.insert(pattern, (session.key, sid))
            self._routes.clear()
        return [(peer, [P.SUBOK, pack({"sid": sid, "pattern": pattern, "durable": durable})])]

    def _forget_subscription(self, session: Session, sid: int, pattern: str) -> None:
        if sid in session.serving:
            session.serving.discard(sid)
            self._services.remove(pattern, (session.key, sid))
        else:
            self._index.remove(pattern, (session.key, sid))
            self._routes.clear()

    def _unsubscribe(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._expect_frames(frames, 2)
        sid = required_int(unpack_map(frames[1]), "sid", 1, P.MAX_SID)
        pattern = session.subscriptions.pop(sid, None)
        if pattern is None:
            raise ProtocolViolation(Code.UNKNOWN_SID, f"no subscription {sid}", sid=sid)
        if sid in session.durable:
            session.durable.discard(sid)
            self.log.append(E.UNSUB, now_ns, session.app_id, session.key[1], sid)
        self._forget_subscription(session, sid, pattern)
        assert session.peer is not None
        return [(session.peer, [P.UNSUBOK, pack({"sid": sid})])]

    # -- publishing -------------------------------------------------------------------------

    def _publish(  # noqa: PLR0912, PLR0915 - the hot path stays one flat loop
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
        peer = session.peer
        assert peer is not None
        replies: list[Outbound] = []
        confirmed: list[bytes] = []
        touched: dict[SessionKey, Session] = {}
        sender = session.app_id
        seen = self._seen_ids
        log = self.log
        now_ns = self._stamp_time(now_ns)
        for i in range(1, count, 2):
            header_raw = frames[i]
            payload = frames[i + 1]
            try:
                header = decode_pub_header(header_raw)
            except WireError as exc:
                exc.ref["index"] = i // 2
                replies.append(self.error(peer, exc))
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
                if log.full:
                    raise StorageFailure(
                        Code.STORAGE_UNAVAILABLE,
                        "persistence is behind; the publish was not accepted, retry it",
                    )
            except WireError as exc:
                exc.ref["id"] = header.msg_id
                replies.append(self.error(peer, exc))
                continue
            seen_key = (sender, header.msg_id)
            stored = seen.get(seen_key)
            if stored is None:
                stored = self._route(
                    topic,
                    header.msg_id,
                    header_raw,
                    payload,
                    sender,
                    now_ns,
                    touched,
                    header.dest,
                    header.sensitive,
                )
                seen[seen_key] = stored
                if len(seen) > _DEDUPE_LIMIT:
                    seen.popitem(last=False)
            else:  # a resend after reconnect: confirm again (once stored), route once
                self.stats.duplicates += 1
            if header.confirm and not log.confirm_later(stored, peer, header.msg_id):
                confirmed.append(header.msg_id)
        if confirmed:
            replies.extend(confirm_messages(peer, confirmed))
        for target in touched.values():
            replies.extend(self._pump(target, now_ns))
        return replies

    def _stamp_time(self, now_ns: int) -> int:
        """Broker timestamps never go backwards, so stored seq order is time order."""
        self._last_ts = max(self._last_ts, now_ns)
        return self._last_ts

    def confirm_stored(self, watermark: int) -> list[Outbound]:
        """Persistence stored events up to `watermark`: the CONFIRMs that waited for it."""
        released = self.log.acknowledge(watermark)
        return [out for peer, ids in released.items() for out in confirm_messages(peer, ids)]

    def _route(
        self,
        topic: str,
        msg_id: bytes,
        header_raw: bytes,
        payload: bytes,
        sender: str,
        now_ns: int,
        touched: dict[SessionKey, Session],
        dest: str | None = None,
        sensitive: bool = False,
        store: bool = True,
    ) -> int:
        """Queue one accepted message for every session with a matching subscription
        (only sessions of app `dest` for a direct send); returns its event seq."""
        self._seq += 1
        self.stats.published += 1
        routes = self._routes.get(topic)
        if routes is None:
            routes = self._build_routes(topic)
        sessions = self._sessions
        stored_seq = self.log.last_seq + 1 if store else 0
        targets: list[list[Any]] = []
        deliveries: list[tuple[Session, Delivery]] = []
        for key, sids, durable in routes:
            if dest is not None and key[0] != dest:
                continue
            target = sessions[key]
            delivery = Delivery(
                self._seq,
                sids,
                sender,
                now_ns,
                topic,
                msg_id,
                header_raw,
                payload,
                stored_seq=stored_seq,
                sensitive=sensitive,
            )
            if durable and store and not target.mailbox.auto_ack:
                delivery.durable_sids = durable
                targets.append([key[0], key[1], durable])
            deliveries.append((target, delivery))
        if store:  # the MSG event first: a dead letter below must refer to a stored message
            self.log.append(
                E.MSG, now_ns, sender, topic, msg_id, sensitive, header_raw, payload, targets
            )
        for target, delivery in deliveries:
            if target.mailbox.offer(delivery):
                touched[target.key] = target
            else:
                delivery.last_error = "the receiver's queue is full"
                self._dead(target, delivery, "queue-full", now_ns)
        return stored_seq

    def _pump(self, session: Session, now_ns: int) -> list[Outbound]:
        """Send an attached session what its window allows, in DELIVERs of ≤ window each."""
        peer = session.peer
        if peer is None:
            return []
        deliveries = session.mailbox.pull(now_ns)
        if not deliveries:
            return []
        out: list[Outbound] = []
        chunk = self._config.delivery.window
        for start in range(0, len(deliveries), chunk):
            frames = [P.DELIVER]
            for d in deliveries[start : start + chunk]:
                frames += (
                    d.sids,
                    encode_stamp(d.seq, d.sender, d.timestamp_ns, d.attempt),
                    d.header,
                    d.payload,
                )
                if d.attempt > 1:
                    self.stats.retried += 1
            out.append((peer, frames))
        self.stats.delivered += len(deliveries)
        return out

    def _build_routes(self, topic: str) -> tuple[Route, ...]:
        by_session: dict[SessionKey, list[int]] = {}
        for key, sid in self._index.match(topic):
            by_session.setdefault(key, []).append(sid)
        routes = tuple(
            (key, encode_sids(tuple(sorted(sids))), self._durable_sids(key, sids))
            for key, sids in by_session.items()
        )
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[topic] = routes
        return routes

    def _durable_sids(self, key: SessionKey, sids: list[int]) -> bytes:
        durable = self._sessions[key].durable
        kept = tuple(sorted(sid for sid in sids if sid in durable))
        return encode_sids(kept) if kept else b""

    def publish_internal(self, topic: str, data: Any, now_ns: int) -> list[Outbound]:
        """Publish a platform notice (e.g. `$sys.apps.unresponsive`) as `$broker`."""
        touched: dict[SessionKey, Session] = {}
        now_ns = self._stamp_time(now_ns)
        msg_id = new_message_id()
        header = encode_pub_header(msg_id, topic, client_ts_ns=now_ns)
        self._route(topic, msg_id, header, pack(data), P.BROKER_ID, now_ns, touched)
        out: list[Outbound] = []
        for target in touched.values():
            out.extend(self._pump(target, now_ns))
        return out

    # -- request / reply --------------------------------------------------------------------

    def _request(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Hand a request to one serving subscription (round robin); remember who asked."""
        self._expect_frames(frames, 3)
        header_raw, payload = frames[1], frames[2]
        fields = unpack_map(header_raw)
        header = decode_pub_header(header_raw)
        try:
            validate_topic(header.topic)
            session.authorizer.check_request(header.topic)
            reply = fields.get("reply")
            if not isinstance(reply, str) or not 0 < len(reply) <= 64:
                raise ProtocolViolation(Code.BAD_HEADER, "REQ field 'reply' must be 1-64 chars")
            if len(payload) > P.MAX_PAYLOAD_BYTES:
                raise ProtocolViolation(Code.TOO_LARGE, "request payload exceeds the limit")
            servers = sorted(
                (key, sid)
                for key, sid in self._services.match(header.topic)
                if self._sessions[key].peer is not None  # a gone responder cannot answer
            )
            if not servers:
                raise DeliveryFailure(
                    Code.NO_RESPONDERS, f"no app serves {header.topic!r} right now"
                )
        except WireError as exc:
            exc.ref["id"] = header.msg_id
            raise
        key, sid = servers[self._requests_routed % len(servers)]
        self._requests_routed += 1
        ttl = fields.get("ttl_ms", P.DEFAULT_REQUEST_TTL_MS)
        ttl = ttl if type(ttl) is int and 0 < ttl <= 3_600_000 else P.DEFAULT_REQUEST_TTL_MS
        # the reply id is 128 random bits chosen by the requester: only the responder sees it
        self._pending_replies[reply] = (session.key, now_ns + ttl * 1_000_000)
        if len(self._pending_replies) > _DEDUPE_LIMIT:
            self._pending_replies.popitem(last=False)
        return self._hand_to(self._sessions[key], sid, session, header, header_raw, payload, now_ns)

    def _reply(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Deliver a responder's answer to the session that asked (reply sid 0)."""
        self._expect_frames(frames, 3)
        header_raw, payload = frames[1], frames[2]
        fields = unpack_map(header_raw)
        header = decode_pub_header(header_raw)
        if len(payload) > P.MAX_PAYLOAD_BYTES:
            raise ProtocolViolation(
                Code.TOO_LARGE, "reply payload exceeds the limit", id=header.msg_id
            )
        try:
            validate_topic(header.topic)
        except WireError as exc:
            exc.ref["id"] = header.msg_id
            raise
        token = fields.get("to")
        pending = self._pending_replies.pop(token, None) if isinstance(token, str) else None
        if pending is None or pending[1] < now_ns or pending[0] not in self._sessions:
            raise DeliveryFailure(
                Code.UNKNOWN_REPLY, "no pending request for this reply", id=header.msg_id
            )
        target = self._sessions[pending[0]]
        return self._hand_to(target, P.REPLY_SID, session, header, header_raw, payload, now_ns)

    def _hand_to(
        self,
        target: Session,
        sid: int,
        sender: Session,
        header: PubHeader,
        header_raw: bytes,
        payload: bytes,
        now_ns: int,
    ) -> list[Outbound]:
        """Queue a request (to one serving sid) or a reply (to REPLY_SID) for `target`."""
        self._seq += 1
        delivery = Delivery(
            self._seq,
            encode_sids((sid,)),
            sender.app_id,
            now_ns,
            header.topic,
            header.msg_id,
            header_raw,
            payload,
        )
        return self._enqueue(target, delivery, now_ns)

    def _enqueue(self, target: Session, delivery: Delivery, now_ns: int) -> list[Outbound]:
        if not target.mailbox.offer(delivery):
            delivery.last_error = "the receiver's queue is full"
            self._dead(target, delivery, "queue-full", now_ns)
            return []
        return self._pump(target, now_ns)

    # -- acknowledgements -------------------------------------------------------------------

    def _ack(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._expect_frames(frames, 2)
        seqs = unpack_map(frames[1]).get("seqs")
        if not isinstance(seqs, list) or not all(type(s) is int for s in seqs):
            raise ProtocolViolation(Code.BAD_HEADER, "ACK field 'seqs' must be a list of ints")
        mailbox = session.mailbox
        stored: list[int] = []
        for seq in seqs:
            delivery = mailbox.ack(seq)
            if delivery is not None:
                self.stats.acked += 1
                if delivery.durable_sids:
                    stored.append(delivery.stored_seq)
        if stored:
            self.log.append(E.ACK, now_ns, session.app_id, session.key[1], stored)
        return self._pump(session, now_ns)

    def _nack(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self._expect_frames(frames, 2)
        header = unpack_map(frames[1])
        seq = required_int(header, "seq", 0, 2**63)
        error = header.get("error", "")
        error = error[:512] if isinstance(error, str) else ""
        if header.get("requeue", True) is False:
            rejected = session.mailbox.reject(seq, error or "rejected by the receiver")
            if rejected is not None:
                self._dead(session, rejected, "rejected", now_ns)
            return self._pump(session, now_ns)
        dead = session.mailbox.nack(seq, now_ns, error or "nacked by the receiver")
        if dead is not None:
            self._dead(session, dead, "nacked", now_ns)
        return self._pump(session, now_ns)

    def _dead(self, session: Session, delivery: Delivery, reason: str, now_ns: int) -> None:
        dropped = self.dlq.dropped
        entry = self.dlq.add(delivery, reason, session.app_id, session.key[1], now_ns)
        d = delivery
        self.log.append(
            E.DEAD,
            now_ns,
            entry,
            session.app_id,
            session.key[1],
            reason,
            d.attempt,
            d.last_error,
            d.stored_seq if d.durable_sids else 0,
            d.sender,
            d.timestamp_ns,
            d.topic,
            d.msg_id,
            d.sensitive,
            d.header,
            d.payload,
            d.sids,
        )
        if self.dlq.evicted:
            self.log.append(E.DLQ_PURGE, now_ns, self.dlq.evicted[:])
            self.dlq.evicted.clear()
        if self.dlq.dropped > dropped:
            self.events.append(
                {
                    "event": "dlq-full",
                    "dropped_total": self.dlq.dropped,
                    "hint": "purge or replay dead letters (plexus dlq)",
                }
            )
        self.events.append(
            {
                "event": "dead-letter",
                "id": entry,
                "reason": reason,
                "app": session.app_id,
                "topic": delivery.topic,
                "attempts": delivery.attempt,
                "error": delivery.last_error,
            }
        )

    # -- dead letters -----------------------------------------------------------------------

    def _dead_letters(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        if not session.authorizer.platform:
            raise PermissionViolation(Code.COMMAND_DENIED, "DLQ is for platform identities")
        self._expect_frames(frames, 2)
        header = unpack_map(frames[1])
        op = header.get("op")
        peer = session.peer
        assert peer is not None
        if op == "list":
            body: dict[str, Any] = {
                "entries": [entry.describe() for entry in self.dlq.entries()],
                "dropped": self.dlq.dropped,
            }
            return [(peer, [P.DLQOK, pack(body)])]
        if op == "purge":
            ids = self.dlq.ids()
            if ids:
                self.log.append(E.DLQ_PURGE, now_ns, ids)
            return [(peer, [P.DLQOK, pack({"purged": self.dlq.purge()})])]
        if op == "replay":
            entry_id = required_int(header, "id", 1, 2**63)
            entry = self.dlq.take(entry_id)
            if entry is None:
                raise ProtocolViolation(Code.UNKNOWN_DLQ_ENTRY, f"no dead letter {entry_id}")
            return [(peer, [P.DLQOK, pack({"replayed": entry_id})]), *self._replay(entry, now_ns)]
        raise ProtocolViolation(Code.BAD_HEADER, "DLQ field 'op' must be list, replay or purge")

    def _replay(self, entry: DeadLetter, now_ns: int) -> list[Outbound]:
        """Deliver a dead letter again: to its session if it still exists, else by topic."""
        d = entry.delivery
        target = self._sessions.get((entry.app_id, entry.session))
        if target is None:
            self.log.append(
                E.DLQ_REPLAY, now_ns, entry.entry_id, entry.app_id, entry.session, 0, b""
            )
            touched: dict[SessionKey, Session] = {}
            self._route(
                d.topic,
                d.msg_id,
                d.header,
                d.payload,
                d.sender,
                now_ns,
                touched,
                sensitive=d.sensitive,
                store=False,
            )
            return [out for t in touched.values() for out in self._pump(t, now_ns)]
        self._seq += 1
        fresh = Delivery(
            self._seq,
            d.sids,
            d.sender,
            d.timestamp_ns,
            d.topic,
            d.msg_id,
            d.header,
            d.payload,
            stored_seq=d.stored_seq,
            sensitive=d.sensitive,
        )
        if d.stored_seq and not target.mailbox.auto_ack:
            fresh.durable_sids = self._durable_sids(target.key, decode_sids(d.sids))
        self.log.append(
            E.DLQ_REPLAY,
            now_ns,
            entry.entry_id,
            entry.app_id,
            entry.session,
            d.stored_seq if fresh.durable_sids else 0,
            fresh.durable_sids,
        )
        return self._enqueue(target, fresh, now_ns)

    # -- recovery ---------------------------------------------------------------------------

    def restore_session(
        self,
        key: SessionKey,
        subscriptions: dict[int, str],
        deliveries: list[Delivery],
        now_ns: int,
    ) -> bool:
        """Rebuild a durable session from the store (broker restart): detached, its
        durable subscriptions in the index, its unacknowledged deliveries queued in order.
        False when the app has no manifest any more (the caller logs it)."""
        try:
            permissions = permissions_of(key[0], self._permissions_for)
        except AuthFailure:
            return False
        session = Session(
            key, Authorizer(key[0], permissions), 1, now_ns, Mailbox(self._config.delivery)
        )
        session.detached_at_ns = now_ns
        self._sessions[key] = session
        for sid, pattern in subscriptions.items():
            session.subscriptions[sid] = pattern
            session.durable.add(sid)
            self._index.insert(pattern, (key, sid))
        self._routes.clear()
        for delivery in deliveries:
            self._seq += 1
            delivery.seq = self._seq
            session.mailbox.restore(delivery)
        return True

    def remember_published(
        self, sender: str, msg_id: bytes, stored_seq: int, stored_ts_ns: int
    ) -> None:
        """A stored message: a resend of it is confirmed, never routed again; and the
        broker's clock never stamps earlier than it (replay's search needs monotonic time)."""
        self._last_ts = max(self._last_ts, stored_ts_ns)
        self._seen_ids[(sender, msg_id)] = stored_seq
        if len(self._seen_ids) > _DEDUPE_LIMIT:
            self._seen_ids.popitem(last=False)

    # -- statistics -------------------------------------------------------------------------

    def _stats(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        if not session.authorizer.platform:
            raise PermissionViolation(Code.COMMAND_DENIED, "STATS is for platform identities")
        reset = len(frames) == 2 and unpack_map(frames[1]).get("reset") is True
        assert session.peer is not None
        return [(session.peer, [P.STATSOK, pack(self.snapshot(now_ns, reset))])]

    def undeliverable(self, peer: bytes, messages: int) -> None:
        """The server could not hand `messages` to `peer` (gone or its queue full)."""
        self.stats.undeliverable += messages

    # -- time -------------------------------------------------------------------------------

    def housekeeping(self, now_ns: int) -> list[Outbound]:
        """Timers: unresponsive peers, expired grace periods, ack timeouts and due retries."""
        out: list[Outbound] = []
        pending = self._pending_replies
        while pending and next(iter(pending.values()))[1] < now_ns:
            pending.popitem(last=False)
        timeout = self._config.peer_timeout_ms * 1_000_000
        grace = self._config.delivery.grace_ms * 1_000_000
        for session in list(self._sessions.values()):
            if session.peer is not None and now_ns - session.last_seen_ns > timeout:
                self.stats.unresponsive += 1
                notice = {
                    "app": session.app_id,
                    "session": session.key[1],
                    "silent_ms": (now_ns - session.last_seen_ns) // 1_000_000,
                }
                self.events.append({"event": "unresponsive", **notice})
                self._detach(session, now_ns)
                out.extend(self.publish_internal(P.UNRESPONSIVE_TOPIC, notice, now_ns))
                continue
            if session.peer is None:
                transient = any(sid not in session.durable for sid in session.subscriptions)
                if now_ns - session.detached_at_ns > grace and (transient or not session.durable):
                    self.stats.sessions_expired += 1
                    self.events.append(
                        {
                            "event": "session-expired",
                            "app": session.app_id,
                            "session": session.key[1],
                        }
                    )
                    self._end(session, now_ns, "grace period over")
                continue
            for dead in session.mailbox.expire(now_ns):
                self._dead(session, dead, "ack-timeout", now_ns)
            out.extend(self._pump(session, now_ns))
        return out

    def session_of(self, peer: bytes) -> Session | None:
        return self._peers.get(peer)

    def snapshot(self, now_ns: int, reset: bool = False) -> dict[str, Any]:
        """Plain-data statistics for STATS replies; `reset` restarts latency measurement."""
        apps: dict[str, dict[str, Any]] = {}
        queued = 0
        for session in self._sessions.values():
            entry = apps.setdefault(
                session.app_id, {"sessions": 0, "last_seen_s_ago": None, "queued": 0}
            )
            entry["queued"] += len(session.mailbox)
            queued += len(session.mailbox)
            if session.peer is None:
                continue
            entry["sessions"] += 1
            age = round((now_ns - session.last_seen_ns) / 1e9, 1)
            if entry["last_seen_s_ago"] is None or age < entry["last_seen_s_ago"]:
                entry["last_seen_s_ago"] = age
        stats = self.stats
        data: dict[str, Any] = {
            "sessions": len(self._peers),
            "sessions_detached": len(self._sessions) - len(self._peers),
            "apps": apps,
            "subscriptions": len(self._index),
            "published": stats.published,
            "delivered": stats.delivered,
            "acked": stats.acked,
            "retried": stats.retried,
            "duplicates": stats.duplicates,
            "queued": queued,
            "dlq_size": len(self.dlq),
            "dlq_dropped": self.dlq.dropped,
            "dlq_by_reason": dict(self.dlq.by_reason),
            "undeliverable": stats.undeliverable,
            "errors": {str(k): v for k, v in sorted(stats.errors.items())},
            "sessions_opened": stats.sessions_opened,
            "sessions_resumed": stats.sessions_resumed,
            "sessions_expired": stats.sessions_expired,
            "unresponsive": stats.unresponsive,
            "seq": self._seq,
            "events": {
                "last_seq": self.log.last_seq,
                "stored_watermark": self.log.watermark,
                "backlog_bytes": self.log.backlog_bytes,
                "confirms_waiting": self.log.confirms_waiting,
            },
        }
        if self._extra_stats is not None:
            data.update(self._extra_stats(reset))
        return data
