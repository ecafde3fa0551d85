"""The client protocol as a pure core: frames in, frames and events out, time passed in.

`ClientSession` is everything a Plexus client does on the wire (docs/protocol.md §3, §6)
and nothing about sockets, threads or event loops, so the threaded `Bus`
(`clients.connection`) and the asyncio `AsyncBus` (`clients.aio`) drive one core, and
tests drive it with a fake broker and a fake clock:

    session = ClientSession(SessionConfig("ticker"), settle=..., now=clock())
    for frames in session.outgoing(now):    # HELLO, SUB, ACK, REQ, PUB batches, PING ...
        socket.send(frames)
    session.receive(frames, now)            # each message from the broker
    for event in session.take_events():     # clients.events; deliveries are Messages
        ...
    session.next_deadline()                 # call outgoing() again by then at the latest

It holds the HELLO/WELCOME handshake (and the re-HELLO after 105 NOT_WELCOMED or a new
transport), subscriptions (kept equal at the broker to the ones the app wants, and the
resumed ones a new WELCOME lists, held until the app claims them), publish batching
(`CLIENT_BATCH` per PUB, never beyond the broker's publish credit: WELCOME `credit`, then
each CREDIT) and the unconfirmed window with its resend after every WELCOME,
ACK/NACK settlements (ACKs coalesced: a frame once a quarter of the broker's window is
pending, else after `ACK_DELAY_S`; NACKs at once), requests by reply id, STATS/DLQ
calls by `rid`, heartbeats, broker-silence detection, expiry of requests and calls, the
clean close, and the routing of every ERROR to what it concerns. Every method must be
called from one thread (or one event loop) at a time: the driver's. The only exception is
`settle`, passed in: the core gives it to each delivery's `Receipt`, which app threads
call.

States and transitions (`TRANSITIONS`; CLOSED and FAILED absorb every input):

    state        input          next         what happens
    CONNECTING   WELCOME        WELCOMED     resend unconfirmed, re-SUB, flush queues
    CONNECTING   NOT_WELCOMED   CONNECTING   answers to what was sent before our HELLO
    CONNECTING   RECONNECTED    CONNECTING   new transport: HELLO again
    CONNECTING   SILENT         CONNECTING   ReconnectNeeded: driver replaces the socket
    CONNECTING   REFUSED        FAILED       HELLO refused (2xx, 106, 410 sessions cap)
    CONNECTING   TAKEN_OVER     FAILED       203: another connection holds the session
    CONNECTING   AUTH_FAILED    FAILED       ZAP refused the credential
    CONNECTING   CLOSE          CLOSED       nothing to flush without a session
    WELCOMED     WELCOME        WELCOMED     an answer to a second HELLO
    WELCOMED     NOT_WELCOMED   CONNECTING   the broker forgot us: HELLO again
    WELCOMED     RECONNECTED    CONNECTING   HELLO again; calls in flight are lost
    WELCOMED     SILENT         CONNECTING   ReconnectNeeded
    WELCOMED     TAKEN_OVER     FAILED
    WELCOMED     AUTH_FAILED    FAILED
    WELCOMED     CLOSE          CLOSING      flush, closing PING, wait for its PONG
    CLOSING      CLOSING_PONG   CLOSED       BYE, Closed(clean=True)
    CLOSING      CLOSE_EXPIRED  CLOSED       no PONG in time: Closed(clean=False)
    CLOSING      NOT_WELCOMED   CLOSED       the session is gone already
    CLOSING      RECONNECTED    CLOSED
    CLOSING      SILENT         CLOSED
    CLOSING      TAKEN_OVER     FAILED
    CLOSING      AUTH_FAILED    FAILED
    CLOSING      WELCOME        CLOSING      a late answer to an earlier HELLO
    CLOSING      CLOSE          CLOSING

Every other (state, input) pair leaves the state as it is (a 2xx refusal of one command
on a live session, a PONG or close deadline outside CLOSING); the table lists them too,
so it covers every pair (tests/unit/test_client_session.py checks).
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from broker import protocol as P
from broker.codec import decode_sids, encode_sids
from broker.errors import Code, ProtocolViolation, WireError
from broker.wire import (
    CLOSING_ECHO,
    PACKED_BATCH_BYTES,
    Ack,
    Bye,
    Confirm,
    Credit,
    Dlq,
    DlqOk,
    Error,
    Hello,
    Nack,
    Ping,
    Pong,
    Publish,
    Reply,
    Request,
    Stats,
    StatsOk,
    Subscribe,
    SubscribeOk,
    Unsubscribe,
    Welcome,
    unpack_batch,
)
from clients.errors import (
    BrokerUnavailable,
    BusError,
    RequestTimeout,
    error_from_record,
)
from clients.events import (
    Answered,
    CallFailed,
    Closed,
    Confirmed,
    ErrorReported,
    Event,
    Failed,
    PublishRefused,
    ReconnectNeeded,
    Replied,
    RequestFailed,
    Subscribed,
    SubscribeFailed,
    Welcomed,
)
from clients.message import Message, Receipt, delivered_envelope

log = logging.getLogger("plexus.client")

Settle = Callable[[int, str | None, bool], None]
"""(seq, None, _) acknowledges delivery seq; (seq, error, requeue) nacks (or rejects)."""

_REPLY_SIDS_RAW: Final = encode_sids((P.REPLY_SID,))
_DEFAULT_WINDOW: Final = 256
"""The broker's default in-flight window, until a WELCOME announces the real one."""
ACK_DELAY_S: Final = 0.005
"""The longest an ACK waits for others to share its frame (from the first `outgoing()` that
sees it)."""
_NEVER: Final = float("inf")
_PING: Final = Ping().frames()
_BYE: Final = Bye().frames()
_CALL_ANSWERS: Final = {P.STATSOK: P.STATS, P.DLQOK: P.DLQ}
_CALL_ERRORS: Final = frozenset({int(Code.COMMAND_DENIED), int(Code.UNKNOWN_DLQ_ENTRY)})
_UNBOUNDED: Final = 2**62
"""The byte bound of an unpacked PUB (version 1 has none; its messages are frames)."""
"""Refusals of a STATS/DLQ an older broker sends without the call's `rid` in `ref`."""


class State(enum.Enum):
    CONNECTING = "connecting"
    WELCOMED = "welcomed"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class Input(enum.Enum):
    WELCOME = "welcome"
    NOT_WELCOMED = "not-welcomed"
    RECONNECTED = "reconnected"
    SILENT = "silent"
    REFUSED = "refused"
    TAKEN_OVER = "taken-over"
    AUTH_FAILED = "auth-failed"
    CLOSE = "close"
    CLOSING_PONG = "closing-pong"
    CLOSE_EXPIRED = "close-expired"


TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (State.CONNECTING, Input.WELCOME): State.WELCOMED,
    (State.CONNECTING, Input.NOT_WELCOMED): State.CONNECTING,
    (State.CONNECTING, Input.RECONNECTED): State.CONNECTING,
    (State.CONNECTING, Input.SILENT): State.CONNECTING,
    (State.CONNECTING, Input.REFUSED): State.FAILED,
    (State.CONNECTING, Input.TAKEN_OVER): State.FAILED,
    (State.CONNECTING, Input.AUTH_FAILED): State.FAILED,
    (State.CONNECTING, Input.CLOSE): State.CLOSED,
    (State.CONNECTING, Input.CLOSING_PONG): State.CONNECTING,
    (State.CONNECTING, Input.CLOSE_EXPIRED): State.CONNECTING,
    (State.WELCOMED, Input.WELCOME): State.WELCOMED,
    (State.WELCOMED, Input.NOT_WELCOMED): State.CONNECTING,
    (State.WELCOMED, Input.RECONNECTED): State.CONNECTING,
    (State.WELCOMED, Input.SILENT): State.CONNECTING,
    (State.WELCOMED, Input.TAKEN_OVER): State.FAILED,
    (State.WELCOMED, Input.AUTH_FAILED): State.FAILED,
    (State.WELCOMED, Input.CLOSE): State.CLOSING,
    (State.WELCOMED, Input.REFUSED): State.WELCOMED,
    (State.WELCOMED, Input.CLOSING_PONG): State.WELCOMED,
    (State.WELCOMED, Input.CLOSE_EXPIRED): State.WELCOMED,
    (State.CLOSING, Input.CLOSING_PONG): State.CLOSED,
    (State.CLOSING, Input.CLOSE_EXPIRED): State.CLOSED,
    (State.CLOSING, Input.NOT_WELCOMED): State.CLOSED,
    (State.CLOSING, Input.RECONNECTED): State.CLOSED,
    (State.CLOSING, Input.SILENT): State.CLOSED,
    (State.CLOSING, Input.TAKEN_OVER): State.FAILED,
    (State.CLOSING, Input.AUTH_FAILED): State.FAILED,
    (State.CLOSING, Input.WELCOME): State.CLOSING,
    (State.CLOSING, Input.CLOSE): State.CLOSING,
    (State.CLOSING, Input.REFUSED): State.CLOSING,
}
FINAL: Final = frozenset({State.CLOSED, State.FAILED})


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Who the session is and how it behaves; the broker's WELCOME supplies the rest."""

    app_id: str
    session: str = P.DEFAULT_SESSION
    heartbeat_ms: int | None = None
    """PING interval; None: the broker's (WELCOME `heartbeat_ms`)."""
    window: int = 10_000
    """Most unconfirmed publishes; drivers make `publish` wait (or raise WouldBlock)."""
    client: str = "plexus-py/0.1"
    ack_batch: int | None = None
    """ACKs that go out at once; fewer wait up to `ack_delay_s` for company. None: a
    quarter of the broker's window (WELCOME `window` // 4, at least 1; 64 by default), so
    pending ACKs never hold back more than a quarter of what the broker may send."""
    ack_delay_s: float = ACK_DELAY_S


_Item = tuple[bytes, bytes, bytes]
"""(msg_id, header, payload) of one publish."""


@dataclass(slots=True)
class _Request:
    token: object
    msg_id: bytes
    deadline: float


@dataclass(slots=True)
class _Call:
    token: object
    record: Stats | Dlq
    deadline: float
    sent: bool = False


class ClientSession:
    """One client session's protocol state; see the module docstring."""

    def __init__(self, config: SessionConfig, settle: Settle, now: float) -> None:
        self.config = config
        self.state = State.CONNECTING
        self.finished = False
        """State is CLOSED or FAILED (a plain bool: the hot path tests it often)."""
        self.welcome: Welcome | None = None
        self.failure: BusError | None = None
        self.reconnects = 0
        self._settle = settle
        self._events: list[Event] = []
        self._hello_due = True
        self._bye_due = False
        self._closing_ping_sent = False
        self._close_deadline = 0.0
        self._last_ping = now
        self._last_received = now
        self._heartbeat_s = 0.0
        self._timeout_s = 0.0
        self._set_timers(None)
        # publishing
        self._unconfirmed: dict[bytes, _Item] = {}
        """Every publish not yet confirmed, in publish order (the resend after WELCOME)."""
        self._outbox: deque[_Item] = deque()
        """Publishes to send; one confirmed meanwhile is skipped."""
        self._credit: int | None = None
        """PUB messages the broker lets us send now (WELCOME `credit`, then each CREDIT);
        None: no flow control (a broker that announces none). Out of credit, publishes
        wait in the outbox, and `publish` blocks once the unconfirmed window is full."""
        # subscriptions
        self._subs: dict[int, Subscribe] = {}
        self._sent_sids: set[int] = set()
        self._awaiting_ok: set[int] = set()
        self._subs_changed = False
        self._resumed: dict[int, str] = {}
        self._orphans: dict[int, list[Message]] = {}
        self._sids = itertools.count(1)
        # settlements, requests, replies, calls
        self._acks: list[int] = []
        """ACKs to send: at once from `ack_batch` on, else once `_ack_due` has passed
        (and before any NACK, and all of them when closing)."""
        self._ack_batch = config.ack_batch or _DEFAULT_WINDOW // 4
        self._ack_due = _NEVER
        """When the pending ACKs go out at the latest (_NEVER: none pending, or none seen
        by `outgoing` yet, which starts the clock)."""
        self._nacks: list[Nack] = []
        self._control: deque[list[bytes]] = deque()
        self._requests: dict[str, _Request] = {}
        self._request_ids: dict[bytes, str] = {}
        self._calls: dict[int, _Call] = {}
        self._calls_due: deque[int] = deque()
        self._rids = itertools.count(1)
        self._timers: list[tuple[float, int, str | int]] = []
        """Deadlines of requests (by reply id) and calls (by rid), a lazy heap."""
        self._timer_seq = itertools.count()

    # -- the app's side (through the driver) ------------------------------------------------

    @property
    def unconfirmed(self) -> int:
        """Publishes taken but not yet confirmed (kept to resend after a reconnect)."""
        return len(self._unconfirmed)

    @property
    def credit(self) -> int | None:
        """PUB messages the broker's flow control lets us send now (None: unlimited)."""
        return self._credit

    @property
    def ack_batch(self) -> int:
        """How many pending ACKs go out at once (drivers wake their sender at this many)."""
        return self._ack_batch

    @property
    def window_free(self) -> int:
        """How many more publishes the unconfirmed window takes."""
        return self.config.window - len(self._unconfirmed)

    def publish(self, msg_id: bytes, header: bytes, payload: bytes) -> None:
        """Queue one publish (header from `encode_pub_header`, with `cf` set) for the
        next PUB batch; it is kept until confirmed and resent after every WELCOME."""
        item = (msg_id, header, payload)
        self._unconfirmed[msg_id] = item
        self._outbox.append(item)

    def publish_all(self, items: deque[tuple[bytes, bytes, bytes]]) -> None:
        """`publish` every (msg_id, header, payload) of `items`, emptying it (the driver's
        queue, which other threads may append to meanwhile)."""
        unconfirmed, outbox = self._unconfirmed, self._outbox
        while items:
            item = items.popleft()
            unconfirmed[item[0]] = item
            outbox.append(item)

    def subscribe(self, pattern: str, *, durable: bool = False, serve: bool = False) -> int:
        """Want a subscription; returns its sid. A subscription the resumed session still
        has for the same pattern is claimed (same sid), and what the broker delivered for
        it meanwhile comes out first, in order."""
        sid = self._claim_sid(pattern)
        self._subs[sid] = Subscribe(sid, pattern, durable, serve)
        self._subs_changed = True
        self._awaiting_ok.add(sid)
        self._resumed.pop(sid, None)
        self._events.extend(self._orphans.pop(sid, ()))
        return sid

    def _claim_sid(self, pattern: str) -> int:
        for sid, kept in self._resumed.items():
            if kept == pattern and sid not in self._subs:
                return sid
        sid = next(self._sids)
        while sid in self._subs or sid in self._resumed:
            sid = next(self._sids)
        return sid

    def unsubscribe(self, sid: int) -> None:
        """Stop wanting subscription `sid` (UNSUB goes out if the broker has it)."""
        self._subs.pop(sid, None)
        self._subs_changed = True
        self._awaiting_ok.discard(sid)

    def settle(self, seq: int, error: str | None = None, requeue: bool = True) -> None:
        """ACK (error None) or NACK delivery `seq`: a NACK goes with the next send (after
        the ACKs pending before it), ACKs are coalesced (`SessionConfig.ack_batch`,
        `ack_delay_s`; `next_deadline` says when the last of them is due)."""
        if error is None:
            self._acks.append(seq)
        else:
            self._nacks.append(Nack(seq, error, requeue))

    def settle_all(self, items: deque[tuple[int, str | None, bool]]) -> None:
        """`settle` every (seq, error, requeue) of `items`, emptying it."""
        acks = self._acks
        while items:
            seq, error, requeue = items.popleft()
            if error is None:
                acks.append(seq)
            else:
                self._nacks.append(Nack(seq, error, requeue))

    def request(self, record: Request, deadline: float, token: object) -> None:
        """Send REQ `record`; Replied(token) when the reply comes, RequestFailed(token) when
        it is refused or `deadline` passes first. A REQ is never resent."""
        self._requests[record.reply] = _Request(token, record.header.msg_id, deadline)
        self._request_ids[record.header.msg_id] = record.reply
        self._control.append(record.frames())
        self._add_timer(deadline, record.reply)

    def reply(self, record: Reply) -> None:
        """Send a responder's REP."""
        self._control.append(record.frames())

    def call(self, record: Stats | Dlq, deadline: float, token: object) -> int:
        """Send STATS or DLQ under a fresh `rid`; Answered(token) or CallFailed(token).
        Returns the rid."""
        rid = next(self._rids)
        self._calls[rid] = _Call(token, dataclasses.replace(record, rid=rid), deadline)
        self._calls_due.append(rid)
        self._add_timer(deadline, rid)
        return rid

    def cancel(self, token: object) -> None:
        """Forget the request or call carrying `token` (its caller gave up)."""
        for reply, pending in list(self._requests.items()):
            if pending.token is token:
                del self._requests[reply]
                self._request_ids.pop(pending.msg_id, None)
        for rid, call in list(self._calls.items()):
            if call.token is token:
                del self._calls[rid]

    def close(self, now: float, timeout: float) -> None:
        """Begin the clean close of §6.6: flush, PING, wait up to `timeout` for the PONG,
        BYE. Closed(clean) tells the end."""
        before = self.state
        if self.finished:
            return
        if self._input(Input.CLOSE) is State.CLOSED:
            self._closed_now(False)
        elif before is State.WELCOMED:
            self._close_deadline = now + timeout

    # -- the transport's side ---------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """A new transport: a replaced socket, or a new ZMTP handshake after the first one
        (maybe a restarted broker). HELLO goes out again; calls in flight are lost."""
        if self.finished:
            return
        self.reconnects += 1
        self._last_received = now
        lost = [rid for rid, call in self._calls.items() if call.sent]
        for rid in lost:
            call = self._calls.pop(rid)
            what = call.record.COMMAND.decode()
            error = BrokerUnavailable(
                f"the connection was lost before {what} was answered",
                hint="retry: it may or may not have been carried out",
            )
            self._events.append(CallFailed(call.token, error))
        if self._input(Input.RECONNECTED) is State.CONNECTING:
            self._hello_due = True
        else:
            self._closed_now(False)

    def auth_failed(self, error: BusError) -> None:
        """ZAP refused the credential (a failed handshake): the session is over."""
        if not self.finished:
            self._input(Input.AUTH_FAILED)
            self._fail(error)

    def receive(self, frames: list[bytes], now: float) -> None:
        """Take one message from the broker."""
        self._last_received = now
        if self.finished:
            return
        command = frames[0]
        try:
            if command == P.DELIVER:
                self._on_deliver(frames)
            elif command == P.CONFIRM:
                self._on_confirm(frames)
            elif command == P.CREDIT:
                self._on_credit(frames)
            elif command == P.PONG:
                self._on_pong(frames)
            elif command == P.SUBOK:
                self._on_subok(frames)
            elif command == P.WELCOME:
                self._on_welcome(frames)
            elif command == P.ERROR:
                self._on_error(frames)
            elif command in _CALL_ANSWERS:
                self._on_answer(frames)
        except WireError as exc:
            log.warning("malformed message from broker: %s", exc)

    def outgoing(self, now: float) -> list[list[bytes]]:
        """Everything to send now, in order; also runs the timers (expiry, heartbeat,
        broker silence, the close deadline)."""
        out: list[list[bytes]] = []
        if self._bye_due:
            self._bye_due = False
            out.append(_BYE)
            self._events.append(Closed(True))
            return out
        if self.finished:
            return out
        self._run_timers(now)
        if self.finished:
            return out
        if self._hello_due:
            self._hello_due = False
            hello = Hello(
                session=self.config.session, client=self.config.client, app=self.config.app_id
            )
            out.append(hello.frames())
        if self.state is not State.CONNECTING:
            self._queued(out, now)
        return out

    def _queued(self, out: list[list[bytes]], now: float) -> None:
        """What a welcomed session sends: SUB/UNSUB, settlements, calls, REQ/REP, PUB
        batches, the heartbeat, and last the closing PING."""
        if self._subs_changed:
            self._sync_subscriptions(out)
        if self._acks or self._nacks:
            self._send_settlements(out, now)
        while self._calls_due:
            call = self._calls.get(self._calls_due.popleft())
            if call is not None:
                call.sent = True
                out.append(call.record.frames())
        while self._control:
            out.append(self._control.popleft())
        if self._outbox:
            self._publishes(out)
        if now - self._last_ping >= self._heartbeat_s:
            self._last_ping = now
            out.append(_PING)
        if self.state is State.CLOSING and not self._closing_ping_sent:
            self._closing_ping_sent = True
            out.append(Ping(CLOSING_ECHO).frames())

    def _send_settlements(self, out: list[list[bytes]], now: float) -> None:
        """ACKs coalesced (a frame for `ack_batch` of them, or whatever is pending after
        `ack_delay_s`, before a NACK, when closing), NACKs at once."""
        acks = self._acks
        if acks:
            if (
                len(acks) >= self._ack_batch
                or now >= self._ack_due
                or self._nacks
                or self.state is State.CLOSING
            ):
                out.extend(ack.frames() for ack in Ack.split(acks))
                self._acks = []
                self._ack_due = _NEVER
            elif self._ack_due == _NEVER:
                self._ack_due = now + self.config.ack_delay_s
        if self._nacks:
            out.extend(nack.frames() for nack in self._nacks)
            self._nacks = []

    def _publishes(self, out: list[list[bytes]]) -> None:
        """PUB batches of what the outbox holds, as far as the broker's credit goes; packed
        into one frame each (at most PACKED_BATCH_BYTES, a lone message always) when the
        broker speaks version 2."""
        outbox, unconfirmed, credit = self._outbox, self._unconfirmed, self._credit
        packed = self.welcome is not None and self.welcome.version >= P.PACKED_VERSION
        byte_limit = PACKED_BATCH_BYTES if packed else _UNBOUNDED
        while outbox and (credit is None or credit > 0):
            limit = P.CLIENT_BATCH if credit is None else min(P.CLIENT_BATCH, credit)
            pairs: list[tuple[bytes, bytes]] = []
            size = 0
            while outbox and len(pairs) < limit:
                msg_id, header, payload = outbox[0]
                if msg_id in unconfirmed:
                    size += len(header) + len(payload)
                    if size > byte_limit and pairs:
                        break
                    pairs.append((header, payload))
                outbox.popleft()
            if pairs:
                out.append(Publish(tuple(pairs)).frames(packed))
                if credit is not None:
                    credit -= len(pairs)
        self._credit = credit

    def take_events(self) -> Sequence[Event]:
        """What happened since the last call, in order."""
        events = self._events
        if not events:
            return ()
        self._events = []
        return events

    def next_deadline(self) -> float:
        """The latest time (on the `now` clock) by which `outgoing` must run again."""
        if self.finished:
            return float("inf") if not self._bye_due else 0.0
        deadline = self._last_received + self._timeout_s
        if self.state is not State.CONNECTING:
            deadline = min(deadline, self._last_ping + self._heartbeat_s)
        if self.state is State.CLOSING:
            deadline = min(deadline, self._close_deadline)
        if self._acks and self.state is not State.CONNECTING:
            deadline = min(deadline, self._ack_due if self._ack_due != _NEVER else 0.0)
        if self._timers:
            deadline = min(deadline, self._timers[0][0])
        return deadline

    # -- internals --------------------------------------------------------------------------

    def _input(self, what: Input) -> State:
        if not self.finished:
            self.state = TRANSITIONS[(self.state, what)]
            self.finished = self.state in FINAL
        return self.state

    def _set_timers(self, welcome: Welcome | None) -> None:
        """Heartbeat and silence timeout: ours, else the broker's terms, else defaults."""
        ms = self.config.heartbeat_ms or (welcome.heartbeat_ms if welcome else 0)
        self._heartbeat_s = (ms or P.DEFAULT_HEARTBEAT_MS) / 1000.0
        self._timeout_s = (welcome.timeout_ms if welcome else P.DEFAULT_PEER_TIMEOUT_MS) / 1000.0

    def _add_timer(self, deadline: float, key: str | int) -> None:
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), key))

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, key = heapq.heappop(timers)
            if isinstance(key, str):
                pending = self._requests.pop(key, None)
                if pending is not None:
                    self._request_ids.pop(pending.msg_id, None)
                    self._events.append(
                        RequestFailed(
                            pending.token,
                            RequestTimeout(
                                "no reply within the request's timeout",
                                hint="the responder may be slow or stuck; raise the timeout",
                            ),
                        )
                    )
            else:
                call = self._calls.pop(key, None)
                if call is not None:
                    self._events.append(
                        CallFailed(
                            call.token,
                            BrokerUnavailable(
                                f"no answer to {call.record.COMMAND.decode()} in time",
                                hint="the broker may be down or overloaded; check `plexus status`",
                            ),
                        )
                    )
        if self.state is State.CLOSING and now >= self._close_deadline:
            self._input(Input.CLOSE_EXPIRED)
            self._closed_now(False)
        elif now - self._last_received > self._timeout_s:
            log.warning("broker silent for %.1fs; reconnecting", now - self._last_received)
            if self._input(Input.SILENT) is State.CONNECTING:
                self._last_received = now
                self._events.append(ReconnectNeeded())
            else:
                self._closed_now(False)

    def _closed_now(self, clean: bool) -> None:
        self._events.append(Closed(clean))

    def _fail(self, error: BusError) -> None:
        """Everything pending fails with `error`; Failed(error) last."""
        self.failure = error
        for sid in sorted(self._awaiting_ok):
            self._events.append(SubscribeFailed(sid, error))
        self._awaiting_ok.clear()
        for pending in self._requests.values():
            self._events.append(RequestFailed(pending.token, error))
        self._requests.clear()
        self._request_ids.clear()
        for call in self._calls.values():
            self._events.append(CallFailed(call.token, error))
        self._calls.clear()
        self._events.append(Failed(error))

    def _sync_subscriptions(self, out: list[list[bytes]]) -> None:
        """Make the broker's subscriptions of this session equal the wanted ones."""
        self._subs_changed = False
        subs, sent = self._subs, self._sent_sids
        for sid, record in subs.items():
            if sid not in sent:
                out.append(record.frames())
                sent.add(sid)
        for sid in sent - subs.keys():
            out.append(Unsubscribe(sid).frames())
            sent.discard(sid)

    def _on_deliver(self, frames: list[bytes]) -> None:
        """Each [sids, stamp, header, payload] group straight from the frames (no
        `Deliver` record per message: this is the hot path of every delivery and reply).
        A sids frame is decoded once per distinct value in the DELIVER (usually one)."""
        if len(frames) == 2:  # packed (version 2): the whole batch in one frame
            frames = unpack_batch(frames, 4)
        count = len(frames) - 1
        if count <= 0 or count % 4:
            raise ProtocolViolation(Code.BAD_FRAME_COUNT, "DELIVER takes groups of 4 frames")
        events, settle, acks = self._events, self._settle, self._acks
        targets: dict[bytes, tuple[list[int], list[int]]] = {}
        for i in range(1, count, 4):
            sids_raw = frames[i]
            envelope = delivered_envelope(frames[i + 1], frames[i + 2], frames[i + 3])
            if sids_raw == _REPLY_SIDS_RAW:
                self._on_reply(Message(envelope, P.REPLY_SID))
                continue
            target = targets.get(sids_raw)
            if target is None:
                target = targets[sids_raw] = self._targets(decode_sids(sids_raw))
            live, held = target
            if not live and not held:  # unsubscribed meanwhile: nothing will consume it
                acks.append(envelope.seq)
                continue
            receipt = Receipt(envelope.seq, len(live) + len(held), settle)
            for sid in held:
                self._orphans.setdefault(sid, []).append(Message(envelope, sid, receipt))
            for sid in live:
                events.append(Message(envelope, sid, receipt))

    def _targets(self, sids: list[int]) -> tuple[list[int], list[int]]:
        """The sids a delivery is for that the app wants (live) and that a resumed session
        holds until the app claims them (held)."""
        subs, resumed = self._subs, self._resumed
        live = [sid for sid in sids if sid in subs]
        held = [sid for sid in sids if sid in resumed] if resumed else []
        return live, held

    def _on_reply(self, message: Message) -> None:
        """A reply to one of our requests: acknowledged at once, handed to its token."""
        self._acks.append(message.envelope.seq)
        pending = self._requests.pop(message.envelope.in_reply_to or "", None)
        if pending is not None:
            self._request_ids.pop(pending.msg_id, None)
            self._events.append(Replied(pending.token, message))

    def _on_confirm(self, frames: list[bytes]) -> None:
        unconfirmed = self._unconfirmed
        ids = tuple(i for i in Confirm.decode(frames).ids if unconfirmed.pop(i, None))
        if ids:
            self._events.append(Confirmed(ids))

    def _on_credit(self, frames: list[bytes]) -> None:
        if self._credit is not None:
            self._credit += Credit.decode(frames).n

    def _on_pong(self, frames: list[bytes]) -> None:
        if (
            self.state is State.CLOSING
            and self._closing_ping_sent
            and Pong.decode(frames).echo == CLOSING_ECHO
        ):
            self._input(Input.CLOSING_PONG)
            self._bye_due = True

    def _on_subok(self, frames: list[bytes]) -> None:
        sid = SubscribeOk.decode(frames).sid
        if sid in self._awaiting_ok:
            self._awaiting_ok.discard(sid)
            self._events.append(Subscribed(sid))

    def _on_welcome(self, frames: list[bytes]) -> None:
        welcome = Welcome.decode(frames)
        if self.state is not State.CONNECTING:
            return  # a late answer to an earlier HELLO: this one changes nothing
        self._input(Input.WELCOME)
        self.welcome = welcome
        self._set_timers(welcome)
        self._sent_sids.clear()
        self._subs_changed = True
        self._resumed = {sid: pattern for sid, pattern in welcome.subs if sid not in self._subs}
        self._orphans.clear()  # unacknowledged: the resumed session delivers them again
        self._outbox = deque(self._unconfirmed.values())  # all unconfirmed, in order, first
        self._credit = welcome.credit or None  # a fresh connection's whole credit
        self._ack_batch = self.config.ack_batch or max(1, welcome.window // 4)
        self._calls_due.extend(rid for rid, call in self._calls.items() if call.sent)
        self._events.append(Welcomed(welcome))

    def _on_answer(self, frames: list[bytes]) -> None:
        command = _CALL_ANSWERS[frames[0]]
        answer = StatsOk.decode(frames) if command == P.STATS else DlqOk.decode(frames)
        rid = self._answered_rid(answer.rid, command)
        if rid is not None:
            call = self._calls.pop(rid)
            self._events.append(Answered(call.token, answer.data))

    def _answered_rid(self, rid: int, command: bytes | None) -> int | None:
        """The call an answer belongs to: by its echoed `rid`; without one (an older
        broker) the oldest call sent of that command (the broker answers in order)."""
        if rid:
            return rid if rid in self._calls else None
        for key, call in self._calls.items():
            if call.sent and (command is None or command == call.record.COMMAND):
                return key
        return None

    def _on_error(self, frames: list[bytes]) -> None:
        """Route an ERROR to what it concerns: the session, a SUB, a message, a call."""
        record = Error.decode(frames)
        error = error_from_record(record)
        code, ref = record.code, record.ref
        if code == int(Code.NOT_WELCOMED):
            if self.state is State.WELCOMED:  # one HELLO per lost session, not per refusal
                self._input(Input.NOT_WELCOMED)
                self._hello_due = True
            elif self.state is State.CLOSING:
                self._input(Input.NOT_WELCOMED)
                self._closed_now(False)
            return
        if code == int(Code.SESSION_TAKEN_OVER):
            self._input(Input.TAKEN_OVER)
            self._fail(error)
            return
        if code in (int(Code.CREDENTIAL_REVOKED), int(Code.IDENTITY_MISMATCH)):
            self._input(Input.AUTH_FAILED)  # the credential is gone: no reconnect helps
            self._fail(error)
            return
        if self.state is State.CONNECTING and (
            code // 100 == 2 or code in (int(Code.UNSUPPORTED_VERSION), int(Code.SESSION_LIMIT))
        ):
            self._input(Input.REFUSED)
            self._fail(error)
            return
        sid = ref.get("sid")
        if type(sid) is int and sid in self._awaiting_ok:
            self._awaiting_ok.discard(sid)
            self._subs.pop(sid, None)
            self._sent_sids.discard(sid)
            self._events.append(SubscribeFailed(sid, error))
            return
        msg_id = ref.get("id")
        if isinstance(msg_id, bytes) and self._refused(msg_id, error):
            return
        rid = ref.get("rid")
        if type(rid) is int and rid:
            key = self._answered_rid(rid, None)
        elif code in _CALL_ERRORS:
            key = self._answered_rid(0, P.DLQ if code == int(Code.UNKNOWN_DLQ_ENTRY) else None)
        else:
            key = None
        if key is not None:
            self._events.append(CallFailed(self._calls.pop(key).token, error))
            return
        self._events.append(ErrorReported(error))

    def _refused(self, msg_id: bytes, error: BusError) -> bool:
        """A publish or request refused by id: final, never resent; True if it was ours."""
        reply = self._request_ids.pop(msg_id, None)
        if reply is not None:
            pending = self._requests.pop(reply, None)
            if pending is not None:
                self._events.append(RequestFailed(pending.token, error))
            return True
        if self._unconfirmed.pop(msg_id, None) is not None:
            self._events.append(PublishRefused(msg_id, error))
            return True
        return False
