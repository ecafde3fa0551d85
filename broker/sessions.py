"""Sessions: which connection speaks for which (app, session), and each session's life.

A session is keyed by (app id, session name), not by connection: a client that reconnects
with the same name resumes its subscriptions and everything queued meanwhile. Lifecycle
(each change is a SessionChanged event):

    (none)   --HELLO-->                      ATTACHED   "opened"
    DETACHED --HELLO, same key-->            ATTACHED   "resumed" (in-flight comes again)
    ATTACHED --HELLO, same key, other conn--> ATTACHED  "taken-over" (old conn told), "resumed"
    ATTACHED --peer gone / silent / HELLO of another session on the conn--> DETACHED "detached"
    ATTACHED --BYE-->                        CLOSED     "closed" (non-durable subscriptions end,
                                                        what it held discarded and counted)
    DETACHED --grace period over-->          EXPIRED    "expired" (its queue dead-lettered)

A session with durable subscriptions outlives BYE and its grace period, detached, its
queue kept. Timers run on the monotonic `now_ns` the caller passes; never the wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker import protocol as P
from broker.caps import Caps
from broker.delivery import Mailbox, Outcome
from broker.errors import AuthFailure, CapExceeded, Code, ProtocolViolation
from broker.event_records import RetryScheduled, SessionChanged
from broker.permissions import Authorizer, permissions_of
from broker.wire import Hello, Welcome

if TYPE_CHECKING:
    from broker.delivery import Delivery
    from broker.router import Outbound, Router

SessionKey = tuple[str, str]
"""(app id, session name)."""


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
    owed: int = 0
    """PUB messages read since the last CREDIT (broker.flow)."""
    held_by: set[SessionKey] = field(default_factory=set)
    """Congested receivers holding this publisher's credit back (broker.flow)."""
    holding: set[SessionKey] = field(default_factory=set)
    """Publishers whose credit this congested receiver holds back (broker.flow)."""
    caps: Caps = field(default_factory=Caps)
    """The app's caps (broker.caps), read at HELLO: the manifest may have changed."""

    @property
    def app_id(self) -> str:
        return self.key[0]

    @property
    def name(self) -> str:
        return self.key[1]


class Sessions:
    """Every session of the broker by key and the attached ones by connection."""

    def __init__(self, core: Router) -> None:
        self._core = core
        self.by_key: dict[SessionKey, Session] = {}
        self.by_peer: dict[bytes, Session] = {}
        self.per_app: dict[str, int] = {}
        """app id -> how many sessions `by_key` holds for it (the `sessions` cap)."""

    def __len__(self) -> int:
        return len(self.by_key)

    def add(self, session: Session) -> None:
        """Keep a new session (counted against its app's `sessions` cap)."""
        self.by_key[session.key] = session
        app = session.app_id
        self.per_app[app] = self.per_app.get(app, 0) + 1

    def _remove(self, session: Session) -> None:
        del self.by_key[session.key]
        app = session.app_id
        left = self.per_app[app] - 1
        if left:
            self.per_app[app] = left
        else:
            del self.per_app[app]

    def of(self, peer: bytes, app_id: str, now_ns: int) -> Session:
        """The welcomed session of `peer`, marked alive; errors when there is none or the
        connection's identity changed."""
        session = self.by_peer.get(peer)
        if session is None:
            raise ProtocolViolation(Code.NOT_WELCOMED, "no session: send HELLO first")
        if session.app_id != app_id:
            raise AuthFailure(Code.IDENTITY_UNKNOWN, "connection identity changed")
        session.last_seen_ns = now_ns
        return session

    # -- HELLO ------------------------------------------------------------------------------

    def hello(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        hello = Hello.decode(frames)
        common = set(hello.versions) & set(P.PROTOCOL_VERSIONS)
        if not common:
            raise ProtocolViolation(
                Code.UNSUPPORTED_VERSION,
                f"client offers versions {list(hello.versions)[:8]}, "
                f"broker speaks {list(P.PROTOCOL_VERSIONS)}",
            )
        core = self._core
        config = core.config
        permissions = permissions_of(app_id, core.permissions_for)
        out: list[Outbound] = []
        key = (app_id, hello.session)
        caps = core.caps_of(app_id)
        if key not in self.by_key and self.per_app.get(app_id, 0) >= caps.sessions:
            raise CapExceeded(
                Code.SESSION_LIMIT,
                "sessions",
                caps.sessions,
                f"app {app_id!r} already has {caps.sessions} sessions (attached or in their "
                "grace period)",
            )
        previous = self.by_peer.pop(peer, None)
        if previous is not None and previous.key != key:
            self.detach(previous, now_ns, "the connection opened another session")
        session = self.by_key.get(key)
        resumed = session is not None
        if session is None:
            session = Session(
                key, Authorizer(app_id, permissions), max(common), now_ns, Mailbox(config.delivery)
            )
            self.add(session)
            core.stats.sessions_opened += 1
            core.emit(SessionChanged(app_id, hello.session, "opened", hello.client))
        else:
            core.stats.sessions_resumed += 1
            session.authorizer = Authorizer(app_id, permissions)  # the manifest may have changed
            if session.peer != peer:  # a new connection: what the old one held comes again
                if session.peer is not None:
                    taken = AuthFailure(
                        Code.SESSION_TAKEN_OVER,
                        f"session {hello.session!r} of {app_id!r} was resumed by another "
                        "connection",
                    )
                    out.append(core.error(session.peer, taken))
                    self.by_peer.pop(session.peer, None)
                    core.emit(
                        SessionChanged(
                            app_id, hello.session, "taken-over", "resumed by another connection"
                        )
                    )
                self._requeue_in_flight(session, now_ns)
            core.emit(SessionChanged(app_id, hello.session, "resumed", hello.client))
        session.peer = peer
        session.caps = caps
        session.version = max(common)  # a resume may come from a newer (or older) client
        session.last_seen_ns = now_ns
        session.mailbox.auto_ack = not hello.acked
        self.by_peer[peer] = session
        core.flow.welcome(session)
        welcome = Welcome(
            version=max(common),
            app=app_id,
            session=hello.session,
            resumed=resumed,
            subs=tuple(sorted(session.subscriptions.items())),
            heartbeat_ms=config.heartbeat_ms,
            timeout_ms=config.peer_timeout_ms,
            grace_ms=config.delivery.grace_ms,
            window=config.delivery.window,
            store=config.store_endpoint,
            credit=config.delivery.credit,
        )
        out.append((peer, welcome.frames()))
        out.extend(core.pump(session, now_ns))
        return out

    # -- detach, end, expiry ----------------------------------------------------------------

    def detach(self, session: Session, now_ns: int, reason: str) -> None:
        """The connection is gone; the session waits for a resume until its grace ends."""
        if session.peer is None:
            return
        self._unhook(session, now_ns)
        self._core.emit(SessionChanged(session.app_id, session.name, "detached", reason))

    def _unhook(self, session: Session, now_ns: int) -> None:
        if session.peer is not None:
            self.by_peer.pop(session.peer, None)
        session.peer = None
        session.detached_at_ns = now_ns
        self._requeue_in_flight(session, now_ns)

    def _requeue_in_flight(self, session: Session, now_ns: int) -> None:
        """Unacknowledged deliveries go back to the queue front; out of attempts: dead."""
        self.report(session, session.mailbox.detach(), "detached", "ack-timeout")

    def report(self, session: Session, outcome: Outcome, why: str, dead_reason: str) -> None:
        """Record a mailbox outcome: RetryScheduled for each retry, the dead to the DLQ."""
        core = self._core
        if core.stream.active:
            for delivery, delay_ns in outcome.retried:
                core.emit(
                    RetryScheduled(
                        session.app_id,
                        session.name,
                        delivery.msg_id,
                        delivery.attempt,
                        delay_ns // 1_000_000,
                        why,
                    )
                )
        for dead in outcome.dead:
            core.dead(session, dead, dead_reason)

    def end(self, session: Session, now_ns: int, change: str, why: str) -> None:
        """End a session ("closed" or "expired"): non-durable subscriptions go, and what
        it held goes too unless durable subscriptions keep the session.

        A clean close (BYE) discards what it held and counts it (`discarded_on_close`):
        the app chose to leave, nothing failed. An expiry (the grace period over without
        a resume) dead-letters it as "expired"."""
        core = self._core
        closing = change == "closed" and not session.durable
        # a clean close takes everything first, in flight too: not redelivered, not dead
        discarded = session.mailbox.drain() if closing else []
        self._unhook(session, now_ns)
        reason = f"{why}; {len(discarded)} queued discarded" if discarded else why
        core.emit(SessionChanged(session.app_id, session.name, change, reason))
        core.subscriptions.end_transient(
            session, "expired" if change == "expired" else "session-ended"
        )
        if session.durable:  # the session lives on for its durable subscriptions, queue kept
            return
        self._remove(session)
        if closing:
            core.stats.discarded_on_close += len(discarded)
            return
        dead: list[Delivery] = session.mailbox.drain()
        for delivery in dead:
            delivery.last_error = f"session ended ({why})"
            core.dead(session, delivery, "expired")

    def drop_peer(self, peer: bytes, now_ns: int) -> None:
        """`peer` is unreachable: detach its session (grace period starts)."""
        session = self.by_peer.get(peer)
        if session is not None:
            self.detach(session, now_ns, "unreachable")

    def housekeeping(self, now_ns: int) -> list[Outbound]:
        """Unresponsive peers, expired grace periods, ack timeouts and due retries."""
        core = self._core
        out: list[Outbound] = []
        timeout = core.config.peer_timeout_ms * 1_000_000
        grace = core.config.delivery.grace_ms * 1_000_000
        for session in list(self.by_key.values()):
            if session.peer is not None and now_ns - session.last_seen_ns > timeout:
                core.stats.unresponsive += 1
                notice = {
                    "app": session.app_id,
                    "session": session.name,
                    "silent_ms": (now_ns - session.last_seen_ns) // 1_000_000,
                }
                core.notices.append({"event": "unresponsive", **notice})
                self.detach(session, now_ns, "unresponsive")
                out.extend(core.publish_internal(P.UNRESPONSIVE_TOPIC, notice, now_ns))
                continue
            if session.peer is None:
                transient = any(sid not in session.durable for sid in session.subscriptions)
                if now_ns - session.detached_at_ns > grace and (transient or not session.durable):
                    core.stats.sessions_expired += 1
                    core.notices.append(
                        {"event": "session-expired", "app": session.app_id, "session": session.name}
                    )
                    self.end(session, now_ns, "expired", "grace period over")
                continue
            outcome = session.mailbox.expire(now_ns)
            if outcome:
                self.report(session, outcome, "ack-timeout", "ack-timeout")
            out.extend(core.pump(session, now_ns))
        return out
