"""The routing core: publish, route, pump - and the dispatch to the broker's other parts.

`Router.handle(peer, app_id, frames, now_ns)` decides everything the broker does with one
inbound message of a welcomed (or welcoming) session and returns `Outbound` tuples; it
never touches a socket. `now_ns` is the monotonic clock, which every timer runs on; the
wall clock (injected, `wall_clock`) only stamps messages and events, and broker stamps
never go backwards so stored seq order is time order.

Beside the core sit pure parts, one job each: `Sessions` (broker.sessions: HELLO, detach,
end, expiry, takeover), `Subscriptions` (SUB/UNSUB, the indexes, cached routes),
`Requests` (REQ/REP), `DeadLetterCommands` (DLQ) and the statistics (broker.statistics).
The event-stream link and what the server used to decide live in broker.core.

Hot path (PUB): decode the header once, check the topic (cached) and the permission
(cached), drop duplicates by message id, queue a `Delivery` for every matching session,
and send each attached session what its window allows as `[sids, stamp, header, payload]`
groups of one DELIVER. Header and payload are forwarded as the publisher sent them. The
per-message events (Published, Routed, DeliveryAttempted) are built only when a consumer
follows the stream (`stream.active`).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker import protocol as P
from broker.caps import UNCAPPED, Caps
from broker.codec import (
    PubHeader,
    decode_pub_header,
    encode_pub_header,
    encode_sids,
    encode_stamp,
    new_message_id,
    pack,
)
from broker.delivery import Delivery, DeliveryConfig, Mailbox
from broker.dlq import DeadLetterQueue, shown_error
from broker.dlq_commands import DeadLetterCommands
from broker.errors import (
    ERRORS,
    AuthFailure,
    CapExceeded,
    Code,
    PermissionViolation,
    ProtocolViolation,
    StorageFailure,
    WireError,
)
from broker.event_records import (
    Acked,
    DeadLettered,
    DeliveryAttempted,
    Denied,
    DlqPurged,
    EventRecord,
    Lifecycle,
    Nacked,
    Published,
    Routed,
)
from broker.events import EventLog
from broker.flow import FlowControl
from broker.manifests import Limits, Permissions
from broker.permissions import Authorizer, permissions_of
from broker.requests import Requests
from broker.sessions import Session, SessionKey, Sessions
from broker.statistics import ExtraStats, RouterStats, snapshot, stats_command
from broker.subscriptions import Subscriptions
from broker.topics import validate_topic
from broker.wire import (
    PACKED_BATCH_BYTES,
    Ack,
    Confirm,
    Error,
    Hello,
    Nack,
    Ping,
    Pong,
    Subscribe,
    pack_batch,
    request_id,
)

__all__ = ["Outbound", "Router", "RouterConfig", "RouterStats", "Session", "SessionKey"]

Outbound = tuple[bytes, list[bytes]]
"""(peer routing id, frames) - one multipart message to send."""

PermissionsLookup = Callable[[str], Permissions | None]
LimitsLookup = Callable[[str], Limits | None]
Notice = dict[str, Any]
"""A log line for the server to write: {"event": name, ...fields}."""

_VALID_TOPIC_LIMIT = 65536
_DEDUPE_LIMIT = 131_072
_PUBLISHED = Published.KIND
_ROUTED = Routed.KIND
_ATTEMPTED = DeliveryAttempted.KIND
_DEAD = DeadLettered.KIND
_CAP_CODES = {
    "sessions": Code.SESSION_LIMIT,
    "durable_subscriptions": Code.DURABLE_LIMIT,
    "pending_requests": Code.PENDING_LIMIT,
    "held_messages": Code.HOLD_LIMIT,
    "held_bytes": Code.HOLD_LIMIT,
    "dlq_entries": Code.DLQ_QUOTA,
}
"""The code of each cap's overflow (pub_bytes and pub_bytes_max: 413), for its log line."""
_DENIAL_ACTIONS = {
    P.PUB: "publish",
    P.SUB: "subscribe",
    P.REQ: "request",
    P.REP: "reply",
}


@dataclass(slots=True)
class _DeadTally:
    """Dead letters of one (reason, session) since the last log line."""

    first_id: int
    topic: str
    attempts: int
    error: str
    count: int = 1
    last_id: int = 0

    def __post_init__(self) -> None:
        self.last_id = self.first_id


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Settings of the routing core."""

    heartbeat_ms: int = P.DEFAULT_HEARTBEAT_MS
    peer_timeout_ms: int = P.DEFAULT_PEER_TIMEOUT_MS
    route_cache: int = 4096
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dlq_max: int = 10_000
    caps: Caps = field(default_factory=Caps)
    """Per-app caps (platform `[limits]`; a manifest's `[limits]` changes its own)."""
    store_endpoint: str | None = None
    """The persistence query socket, told to clients in WELCOME (None: persistence off)."""


def confirm_messages(peer: bytes, ids: list[bytes]) -> list[Outbound]:
    """CONFIRMs for `ids`, split so each header stays under the protocol's 8 KiB."""
    return [(peer, confirm.frames()) for confirm in Confirm.split(ids)]


class Router:
    """Routing decisions of one broker, over its sessions, subscriptions and queues."""

    def __init__(
        self,
        permissions_for: PermissionsLookup,
        config: RouterConfig | None = None,
        extra_stats: ExtraStats | None = None,
        stream: EventLog | None = None,
        first_delivery_seq: int = 0,
        wall_clock: Callable[[], int] = time.time_ns,
        limits_for: LimitsLookup | None = None,
    ) -> None:
        self.config = config or RouterConfig()
        self.permissions_for = permissions_for
        self.limits_for = limits_for
        """An app's manifest `[limits]` (None: the platform's caps for every app)."""
        self.extra_stats = extra_stats
        self._wall_clock = wall_clock
        self.stream = stream or EventLog(epoch=0)
        """The event stream (persistence, audit, tracing, the gateway consume it)."""
        self.notices: list[Notice] = []
        """Things worth a log line (expiry, unresponsive, ...); the server drains it with
        `take_notices`, which adds the dead letters, counted."""
        self._dead_tally: dict[tuple[str, str, str], _DeadTally] = {}
        self._limit_tally: dict[tuple[str, str, str], list[Any]] = {}
        """(app, session, cap) -> [count, limit, detail] of cap overflows since the last
        log line (`take_notices`)."""
        self._dlq_dropped_told = 0
        self.stats = RouterStats()
        self.dlq = DeadLetterQueue(self.config.dlq_max, caps_of=self.caps_of)
        self.sessions = Sessions(self)
        self.flow = FlowControl(self.config.delivery, self.sessions.by_key)
        """Publish credit: who may send how much, and which congested receiver holds whom."""
        self.subscriptions = Subscriptions(self, self.config.route_cache)
        self.requests = Requests(self)
        self.dead_letters = DeadLetterCommands(self)
        self._valid_topics: set[str] = set()
        self._seen_ids: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        """(sender, message id) -> event seq of recent publishes, to drop resends."""
        self.delivery_seq = first_delivery_seq
        """Delivery seqs: a restarted broker starts above the last one (wall-clock µs), so
        a late ACK meant for its predecessor can never acknowledge a new delivery."""
        self._last_ts = 0
        self._ts = 0
        """The wall stamp of the message being handled (events carry it)."""
        self._handlers: dict[bytes, Callable[[Session, list[bytes], int], list[Outbound]]] = {
            P.NACK: self._nack,
            P.SUB: self.subscriptions.subscribe,
            P.UNSUB: self.subscriptions.unsubscribe,
            P.PING: self._ping,
            P.BYE: self._bye,
            P.REQ: self.requests.request,
            P.REP: self.requests.reply,
            P.DLQ: self.dead_letters.handle,
            P.STATS: lambda s, f, n: stats_command(self, s, f, n),
        }
        """Commands of a welcomed session (PUB, ACK and HELLO are dispatched before)."""

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """Everything to send in answer to one inbound multipart message from `peer`."""
        command = frames[0]
        wall = self._wall_clock()  # stamp() inlined: this runs for every inbound message
        if wall > self._last_ts:  # noqa: PLR1730 - max() is a call, this is not
            self._last_ts = wall
        self._ts = self._last_ts
        try:
            if command == P.PUB:
                return self._publish(self.sessions.of(peer, app_id, now_ns), frames, now_ns)
            if command == P.ACK:
                return self._ack(self.sessions.of(peer, app_id, now_ns), frames, now_ns)
            if command == P.HELLO:
                return self.sessions.hello(peer, app_id, frames, now_ns)
            if command not in P.CLIENT_COMMANDS:
                raise ProtocolViolation(Code.UNKNOWN_COMMAND, f"unknown command {command[:16]!r}")
            session = self.sessions.of(peer, app_id, now_ns)
            return self._handlers[command](session, frames, now_ns)
        except WireError as exc:
            if command in (P.STATS, P.DLQ):
                exc.ref.setdefault("rid", request_id(frames))
            if isinstance(exc, CapExceeded):
                self.report_limit(app_id, *self._limit_context(peer, frames), exc)
            elif isinstance(exc, (PermissionViolation, AuthFailure)) or (
                exc.code == Code.UNKNOWN_REPLY
            ):
                self._report_denial(peer, app_id, frames, exc)
            return [self.error(peer, exc)]

    def caps_of(self, app_id: str) -> Caps:
        """The caps of `app_id`: the platform's, changed by its manifest's `[limits]`;
        none of its own for a platform identity (`$...`)."""
        if app_id.startswith(P.RESERVED_PREFIX):
            return UNCAPPED
        limits = self.limits_for(app_id) if self.limits_for is not None else None
        return self.config.caps.for_app(limits)

    def _limit_context(self, peer: bytes, frames: list[bytes]) -> tuple[str, str]:
        """(session name, correlation id) of a message refused for a cap."""
        known = self.sessions.by_peer.get(peer)
        name, cid = (known.name if known is not None else ""), ""
        with contextlib.suppress(ProtocolViolation):  # the refusal stands, context or not
            if frames[0] == P.HELLO:
                name = Hello.decode(frames).session
            elif frames[0] == P.REQ and len(frames) == 3:
                cid = decode_pub_header(frames[1]).correlation_id
        return name, cid

    def report_limit(self, app_id: str, session: str, cid: str, exc: CapExceeded) -> None:
        """An app went over one of its caps: a Denied event (action "limit", the cap as
        target) and, counted, one `limit-exceeded` log line per pass (`take_notices`)."""
        self.stats.denied += 1
        self.emit(Denied(app_id, session, "limit", exc.cap, int(exc.code), exc.detail, cid))
        key = (app_id, session, exc.cap)
        tally = self._limit_tally.get(key)
        if tally is None:
            self._limit_tally[key] = [1, exc.limit, exc.detail]
        else:
            tally[0] += 1
            tally[2] = exc.detail

    def error(self, peer: bytes, exc: WireError) -> Outbound:
        """The ERROR message for `exc`, counted."""
        self.stats.errors[int(exc.code)] = self.stats.errors.get(int(exc.code), 0) + 1
        return (peer, Error.of(exc).frames())

    def emit(self, record: EventRecord) -> int:
        """Append one event, stamped with the wall time of the message being handled."""
        return self.stream.append(self._ts, record)

    def stamp(self) -> int:
        """The broker's wall-clock stamp: never earlier than the last one (so stored seq
        order is time order, which replay's search needs)."""
        now = self._wall_clock()
        self._last_ts = max(self._last_ts, now)
        return self._last_ts

    def refresh_stamp(self) -> None:
        """Stamp the events that follow with the wall clock now (outside `handle`)."""
        self._ts = self.stamp()

    def session_of(self, peer: bytes) -> Session | None:
        return self.sessions.by_peer.get(peer)

    def _ping(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        assert session.peer is not None
        return [(session.peer, Pong(Ping.decode(frames).echo).frames())]

    def _bye(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        self.sessions.end(session, now_ns, "closed", "bye")
        return []

    def _report_denial(self, peer: bytes, app_id: str, frames: list[bytes], exc: WireError) -> None:
        """A Denied event with the context of a refused command (error path only)."""
        self.stats.denied += 1
        command = frames[0]
        session = self.sessions.by_peer.get(peer)
        name = session.name if session is not None else ""
        action = _DENIAL_ACTIONS.get(command, "command")
        target = command[:16].decode("ascii", "replace")
        cid = ""
        with contextlib.suppress(ProtocolViolation):  # the refusal stands, context or not
            if command == P.HELLO:
                name = Hello.decode(frames).session
            elif command == P.SUB:
                sub = Subscribe.decode(frames)
                target, action = sub.pattern[:255], "serve" if sub.serve else action
            elif command in (P.REQ, P.REP) and len(frames) == 3:
                header = decode_pub_header(frames[1])
                target, cid = header.topic[:255], header.correlation_id
        self.emit(Denied(app_id, name, action, target, int(exc.code), exc.detail, cid))

    # -- publishing -------------------------------------------------------------------------

    def _publish(  # noqa: PLR0912, PLR0915 - the hot path stays one flat loop
        self, session: Session, frames: list[bytes], now_ns: int
    ) -> list[Outbound]:
        count = len(frames) - 1
        if count == 0 or count % 2:
            raise ProtocolViolation(
                Code.BAD_FRAME_COUNT, f"PUB takes header/payload pairs, got {count} frames"
            )
        if count > 2 * P.MAX_PUB_BATCH:  # whole-batch refusals give no credit back (§3.17)
            raise ProtocolViolation(
                Code.TOO_LARGE, f"PUB batch of {count // 2} exceeds {P.MAX_PUB_BATCH}"
            )
        peer = session.peer
        assert peer is not None
        limit = session.caps.pub_bytes
        if limit < P.MAX_FRAMES * P.MAX_FRAME_BYTES and (size := sum(map(len, frames))) > limit:
            return self._refuse_pub(session, size, limit, count // 2)
        replies: list[Outbound] = []
        confirmed: list[bytes] = []
        touched: dict[SessionKey, Session] = {}
        sender = session.app_id
        seen = self._seen_ids
        stream = self.stream
        lifecycle = sender == P.SUPERVISOR_ID
        ts = self._ts
        checked = ""
        """The topic the previous message of this batch was allowed on (a batch is
        mostly one topic: its validity and permission are checked once)."""
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
                if topic != checked:
                    if topic not in self._valid_topics:
                        validate_topic(topic)
                        if len(self._valid_topics) >= _VALID_TOPIC_LIMIT:
                            self._valid_topics.clear()
                        self._valid_topics.add(topic)
                    session.authorizer.check_publish(topic)
                    checked = topic
                if len(payload) > P.MAX_PAYLOAD_BYTES:
                    raise ProtocolViolation(
                        Code.TOO_LARGE, f"payload of {len(payload)} bytes exceeds the limit"
                    )
                if stream.full:
                    raise StorageFailure(
                        Code.STORAGE_UNAVAILABLE,
                        "persistence is behind; the publish was not accepted, retry it",
                    )
            except WireError as exc:
                exc.ref["id"] = header.msg_id
                if isinstance(exc, PermissionViolation):
                    self.stats.denied += 1
                    self.emit(
                        Denied(
                            sender,
                            session.name,
                            "publish",
                            topic[:255],
                            int(exc.code),
                            exc.detail,
                            header.correlation_id,
                        )
                    )
                replies.append(self.error(peer, exc))
                continue
            seen_key = (sender, header.msg_id)
            stored = seen.get(seen_key)
            if stored is None:
                stored = self._route(header, header_raw, payload, sender, ts, touched, session)
                seen[seen_key] = stored
                if len(seen) > _DEDUPE_LIMIT:
                    seen.popitem(last=False)
                if lifecycle and topic.startswith(P.LIFECYCLE_TOPIC_PREFIX):
                    self._lifecycle(topic, payload)
            else:  # a resend after reconnect: confirm again (once stored), route once
                self.stats.duplicates += 1
            if header.confirm and not stream.confirm_later(stored, peer, header.msg_id):
                confirmed.append(header.msg_id)
        if confirmed:
            replies.extend(confirm_messages(peer, confirmed))
        credit = self.flow.used(session, count // 2)
        if credit is not None:
            replies.append(credit)
        for target in touched.values():
            replies.extend(self.pump(target, now_ns))
        return replies

    def _refuse_pub(self, session: Session, size: int, limit: int, count: int) -> list[Outbound]:
        """A PUB over the app's `pub_bytes`: one ERROR for the whole batch, reported;
        its credit comes back (the messages were read, none was routed)."""
        assert session.peer is not None
        exc = CapExceeded(
            Code.PUB_TOO_LARGE,
            "pub_bytes",
            limit,
            f"PUB of {size} bytes exceeds this app's limit of {limit} bytes",
        )
        self.report_limit(session.app_id, session.name, "", exc)
        replies = [self.error(session.peer, exc)]
        credit = self.flow.used(session, count)
        if credit is not None:
            replies.append(credit)
        return replies

    def _route(
        self,
        header: PubHeader,
        header_raw: bytes,
        payload: bytes,
        sender: str,
        ts: int,
        touched: dict[SessionKey, Session],
        publisher: Session | None = None,
        store: bool = True,
    ) -> int:
        """Queue one accepted message for every session with a matching subscription
        (only sessions of app `dest` for a direct send); returns its event seq. A
        `publisher` whose message reaches a congested attached receiver has its credit
        held (broker.flow)."""
        self.delivery_seq += 1
        self.stats.published += 1
        topic = header.topic
        msg_id = header.msg_id
        dest = header.dest
        sensitive = header.sensitive
        routes = self.subscriptions.routes.get(topic)
        if routes is None:
            routes = self.subscriptions.build_routes(topic)
        sessions = self.sessions.by_key
        stream = self.stream
        stored_seq = stream.last_seq + 1 if store else 0
        targets: list[list[Any]] = []
        deliveries: list[tuple[Session, Delivery]] = []
        for key, sids, durable in routes:
            if dest is not None and key[0] != dest:
                continue
            target = sessions[key]
            delivery = Delivery(
                self.delivery_seq,
                sids,
                sender,
                ts,
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
        active = stream.active
        if store and active:  # Published first: a dead letter below must name a stored message
            stream.append_fields(
                _PUBLISHED,
                ts,
                (
                    sender,
                    publisher.name if publisher is not None else "",
                    topic,
                    msg_id,
                    header.correlation_id,
                    header.traceparent,
                    sensitive,
                    header_raw,
                    payload,
                    targets,
                ),
            )
        elif store:
            stream.last_seq += 1
        to: list[list[str]] | None = [] if active else None
        flow = self.flow
        for target, delivery in deliveries:
            mailbox = target.mailbox
            if mailbox.offer(delivery):
                touched[target.key] = target
                if to is not None:
                    to.append(list(target.key))
            else:
                delivery.last_error = "the receiver's queue is full"
                self.dead(target, delivery, "queue-full")
            if (
                publisher is not None
                and (len(mailbox.queue) >= flow.high or mailbox.queued_bytes >= flow.high_bytes)
                and target.peer is not None  # a detached receiver holds nobody back
            ):
                flow.hold(publisher, target)
        if to:
            stream.append_fields(_ROUTED, ts, (msg_id, sender, topic, to))
        return stored_seq

    def pump(self, session: Session, now_ns: int) -> list[Outbound]:
        """Send an attached session what its window allows, in DELIVERs of ≤ window each."""
        peer = session.peer
        if peer is None:
            return []
        deliveries = session.mailbox.pull(now_ns)
        out: list[Outbound] = self.flow.drained(session) if session.holding else []
        if not deliveries:
            return out
        chunk = self.config.delivery.window
        packed = session.version >= P.PACKED_VERSION
        stream = self.stream
        start, end = 0, len(deliveries)
        while start < end:
            frames = [P.DELIVER]
            items: list[list[Any]] | None = [] if stream.active else None
            stop = min(start + chunk, end)
            size = 0
            for index in range(start, stop):
                d = deliveries[index]
                size += d.size
                if packed and size > PACKED_BATCH_BYTES and index > start:
                    stop = index  # the rest goes in the next DELIVER
                    break
                frames += (
                    d.sids,
                    encode_stamp(d.seq, d.sender, d.timestamp_ns, d.attempt),
                    d.header,
                    d.payload,
                )
                if d.attempt > 1:
                    self.stats.retried += 1
                if items is not None:
                    items.append([d.msg_id, d.attempt, d.seq])
            if items:
                stream.append_fields(_ATTEMPTED, self._ts, (session.app_id, session.name, items))
            out.append((peer, [P.DELIVER, pack_batch(frames[1:])] if packed else frames))
            start = stop
        self.stats.delivered += len(deliveries)
        return out

    def enqueue(self, target: Session, delivery: Delivery, now_ns: int) -> list[Outbound]:
        """Queue one delivery for `target` (full queue: dead-lettered) and pump."""
        if not target.mailbox.offer(delivery):
            delivery.last_error = "the receiver's queue is full"
            self.dead(target, delivery, "queue-full")
            return []
        if self.stream.active:
            self.stream.append_fields(
                _ROUTED,
                self._ts,
                (delivery.msg_id, delivery.sender, delivery.topic, [list(target.key)]),
            )
        return self.pump(target, now_ns)

    def hand_to(
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
        delivery = Delivery(
            self.next_delivery_seq(),
            encode_sids((sid,)),
            sender.app_id,
            self._ts,
            header.topic,
            header.msg_id,
            header_raw,
            payload,
        )
        return self.enqueue(target, delivery, now_ns)

    def route_again(self, delivery: Delivery, now_ns: int) -> list[Outbound]:
        """Route a stored message again by its topic (a replayed dead letter whose
        session is gone): not a new publish, so no Published event."""
        touched: dict[SessionKey, Session] = {}
        header = PubHeader(delivery.msg_id, delivery.topic, sensitive=delivery.sensitive)
        self._route(
            header,
            delivery.header,
            delivery.payload,
            delivery.sender,
            self._ts,
            touched,
            store=False,
        )
        return [out for t in touched.values() for out in self.pump(t, now_ns)]

    def next_delivery_seq(self) -> int:
        self.delivery_seq += 1
        return self.delivery_seq

    def publish_internal(self, topic: str, data: Any, now_ns: int) -> list[Outbound]:
        """Publish a platform notice (e.g. `$sys.apps.unresponsive`) as `$broker`."""
        touched: dict[SessionKey, Session] = {}
        self._ts = ts = self.stamp()
        msg_id = new_message_id()
        header_raw = encode_pub_header(msg_id, topic, client_ts_ns=ts)
        self._route(PubHeader(msg_id, topic), header_raw, pack(data), P.BROKER_ID, ts, touched)
        return [out for target in touched.values() for out in self.pump(target, now_ns)]

    def confirm_stored(self, watermark: int) -> list[Outbound]:
        """Persistence stored events up to `watermark`: the CONFIRMs that waited for it."""
        released = self.stream.acknowledge(P.PERSISTENCE_ID, watermark)
        return [out for peer, ids in released.items() for out in confirm_messages(peer, ids)]

    def _lifecycle(self, topic: str, payload: bytes) -> None:
        """The supervisor's report of an app (`$sys.audit.apps.<kind>`) as a Lifecycle."""
        try:
            details = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:  # msgpack raises many types; a bad report is still a publish
            details = {}
        if not isinstance(details, dict):
            details = {"value": details}
        details = {str(k): v for k, v in details.items()}
        app = details.get("app")
        change = topic[len(P.LIFECYCLE_TOPIC_PREFIX) :]
        self.emit(Lifecycle(app if isinstance(app, str) else "", change, details))

    # -- acknowledgements -------------------------------------------------------------------

    def _ack(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        seqs = Ack.seqs_of(frames)
        mailbox = session.mailbox
        stored: list[int] = []
        ids: list[bytes] = []
        for seq in seqs:
            delivery = mailbox.ack(seq)
            if delivery is not None:
                ids.append(delivery.msg_id)
                if delivery.durable_sids:
                    stored.append(delivery.stored_seq)
        if ids:
            self.stats.acked += len(ids)
            if stored or self.stream.active:
                self.emit(Acked(session.app_id, session.name, stored, ids))
        return self.pump(session, now_ns)

    def _nack(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        nack = Nack.decode(frames)
        mailbox = session.mailbox
        inflight = mailbox.inflight.get(nack.seq)
        if inflight is None:
            return self.pump(session, now_ns)
        error = nack.error or (
            "nacked by the receiver" if nack.requeue else "rejected by the receiver"
        )
        self.emit(
            Nacked(
                session.app_id, session.name, inflight.msg_id, inflight.attempt, error, nack.requeue
            )
        )
        if not nack.requeue:
            rejected = mailbox.reject(nack.seq, error)
            if rejected is not None:
                self.dead(session, rejected, "rejected")
            return self.pump(session, now_ns)
        outcome = mailbox.nack(nack.seq, now_ns, error)
        if outcome is not None:
            self.sessions.report(session, outcome, "nacked", "nacked")
        return self.pump(session, now_ns)

    def dead(self, session: Session, delivery: Delivery, reason: str) -> None:
        """Move one delivery to the dead-letter queue: its DeadLettered event (what the
        store keeps), counted for one log line per reason and session (`take_notices`).

        This is the overflow path too (`queue-full` under a flood), so it costs about
        what a delivery does: no record object, no log line per message."""
        dlq = self.dlq
        entry = dlq.add(delivery, reason, session.app_id, session.name, self._ts)
        d = delivery
        stream = self.stream
        if stream.active or stream.waiting:
            stream.append_fields(
                _DEAD,
                self._ts,
                (
                    entry,
                    session.app_id,
                    session.name,
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
                ),
            )
        else:
            stream.last_seq += 1
        if dlq.evicted:
            self.emit(DlqPurged(dlq.evicted[:], P.BROKER_ID))
            dlq.evicted.clear()
        if dlq.over_quota:
            self._dlq_over_quota(session, dlq.over_quota)
        key = (reason, session.app_id, session.name)
        tally = self._dead_tally.get(key)
        if tally is None:
            self._dead_tally[key] = _DeadTally(entry, d.topic, d.attempt, shown_error(d))
        else:
            tally.count += 1
            tally.last_id = entry
            tally.topic = d.topic
            tally.attempts = d.attempt
            tally.error = shown_error(d)

    def _dlq_over_quota(self, session: Session, over: dict[str, int]) -> None:
        """Apps whose own oldest dead letters were dropped for their quota: one Denied
        each the first time in a pass (the log line counts the rest)."""
        caps = session.caps
        for app_id, dropped in over.items():
            if app_id != session.app_id:
                caps = self.caps_of(app_id)
            exc = CapExceeded(
                Code.DLQ_QUOTA,
                "dlq_entries",
                caps.dlq_entries,
                f"{dropped} of this app's oldest dead letters dropped: over its quota of "
                f"{caps.dlq_entries} entries or {caps.dlq_bytes} bytes",
            )
            key = (app_id, "", "dlq_entries")
            if key in self._limit_tally:
                self._limit_tally[key][0] += dropped
            else:
                self.report_limit(app_id, "", "", exc)
                self._limit_tally[key][0] = dropped
        over.clear()

    def take_notices(self) -> list[Notice]:
        """The log lines due (the server writes them, once per pass): what `notices`
        holds, then one `dead-letter` line per (reason, session) with the count and the
        entry id range since the last call, then `dlq-full` when entries were dropped."""
        tallies = self._dead_tally
        if tallies:
            for (reason, app, session), tally in tallies.items():
                self.notices.append(
                    {
                        "event": "dead-letter",
                        "reason": reason,
                        "app": app,
                        "session": session,
                        "count": tally.count,
                        "id": tally.first_id,
                        "last_id": tally.last_id,
                        "topic": tally.topic,
                        "attempts": tally.attempts,
                        "error": tally.error,
                    }
                )
            tallies.clear()
        if self._limit_tally:
            for (app, session, cap), (count, limit, detail) in self._limit_tally.items():
                self.notices.append(
                    {
                        "event": "limit-exceeded",
                        "app": app,
                        "session": session,
                        "cap": cap,
                        "limit": limit,
                        "count": count,
                        "detail": detail,
                        "hint": ERRORS[_CAP_CODES.get(cap, Code.PUB_TOO_LARGE)].hint,
                    }
                )
            self._limit_tally.clear()
        if self.dlq.dropped > self._dlq_dropped_told:
            self.notices.append(
                {
                    "event": "dlq-full",
                    "dropped": self.dlq.dropped - self._dlq_dropped_told,
                    "dropped_total": self.dlq.dropped,
                    "hint": "purge or replay dead letters (plexus dlq)",
                }
            )
            self._dlq_dropped_told = self.dlq.dropped
        notices, self.notices = self.notices, []
        return notices

    # -- recovery (broker.recovery.apply_restore calls these) -------------------------------

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
            permissions = permissions_of(key[0], self.permissions_for)
        except AuthFailure:
            return False
        session = Session(
            key, Authorizer(key[0], permissions), 1, now_ns, Mailbox(self.config.delivery)
        )
        session.caps = self.caps_of(key[0])
        session.detached_at_ns = now_ns
        self.sessions.add(session)
        self.subscriptions.restore(session, subscriptions)
        for delivery in deliveries:
            delivery.seq = self.next_delivery_seq()
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

    # -- time and the server's reports -------------------------------------------------------

    def housekeeping(self, now_ns: int) -> list[Outbound]:
        """Timers (monotonic `now_ns`): request expiry, unresponsive peers, grace periods,
        ack timeouts and due retries."""
        self._ts = self.stamp()
        self.requests.expire(now_ns)
        out = self.sessions.housekeeping(now_ns)
        out.extend(self.flow.sweep(now_ns))
        return out

    def drop_peer(self, peer: bytes, now_ns: int) -> None:
        """The server found `peer` unreachable: detach its session (grace period starts)."""
        self._ts = self.stamp()
        self.sessions.drop_peer(peer, now_ns)

    def undeliverable(self, peer: bytes, messages: int) -> None:
        """The server could not hand `messages` to `peer` (gone or its queue full)."""
        self.stats.undeliverable += messages

    def snapshot(self, now_ns: int, reset: bool = False) -> dict[str, Any]:
        return snapshot(self, now_ns, reset)
