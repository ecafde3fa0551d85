"""The client's I/O thread: the one owner of the DEALER socket.

It says HELLO, keeps the session alive with heartbeats, re-HELLOs and re-subscribes after
the broker comes back, coalesces publishes queued by app threads into PUB batches (one
syscall-heavy send per batch instead of per message), and fans deliveries out to
subscriptions. App threads talk to it only through a deque and a wake-up pipe, so a
publish costs an append, not a thread hop, while the I/O thread is busy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as P
from broker.codec import Envelope, decode_envelope, decode_sids, pack, unpack_map
from broker.errors import Code, WireError
from clients.errors import AuthenticationError, BusError, error_from_wire
from clients.message import Message, Receipt, Subscription

log = logging.getLogger("plexus.client")

_SNDMORE = 2
_NOBLOCK = 1
_RCVMORE = 13
_DRAIN_LIMIT = 256
_CLOSING_PING = pack({"closing": True})
_REPLY_SIDS = pack([P.REPLY_SID])
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """Where and as whom to connect."""

    endpoint: str
    app_id: str
    token: str
    heartbeat_ms: int | None = None
    outbox_limit: int = 10_000
    session: str = P.DEFAULT_SESSION


class Connection(threading.Thread):
    """Runs the DEALER socket loop in a daemon thread until `stop()`."""

    def __init__(
        self,
        settings: ConnectSettings,
        subscriptions: dict[int, Subscription],
        dispatch: Callable[[Subscription, Message], None],
        on_error: Callable[[BusError], None],
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__(name=f"plexus-io-{settings.app_id}", daemon=True)
        self.settings = settings
        self.welcomed = threading.Event()
        self.welcome: dict[str, Any] = {}
        self.failure: BusError | None = None
        self.outbox: deque[tuple[bytes, bytes]] = deque()
        self.outbox_control: deque[list[bytes]] = deque()
        self.sub_futures: dict[int, Future[None]] = {}
        self.confirm_futures: dict[bytes, Future[None]] = {}
        self.unconfirmed: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        """Publishes the broker has not confirmed yet; resent after a reconnect."""
        self.settlements: deque[tuple[int, str | None, bool]] = deque()
        """(seq, None, _) acks; (seq, error, requeue) nacks or, without requeue, rejects."""
        self.request_futures: dict[str, Future[Message]] = {}
        """Pending requests by reply id (set by the I/O thread when the reply arrives)."""
        self.request_ids: dict[bytes, str] = {}
        self.resumed_subs: dict[int, str] = {}
        """Subscriptions a resumed session still has at the broker, not yet re-claimed."""
        self._orphans: dict[int, list[Message]] = {}
        self.stats_future: Future[dict[str, Any]] | None = None
        self.dlq_future: Future[dict[str, Any]] | None = None
        self._subs = subscriptions
        self._sent_sids: set[int] = set()
        self._dispatch = dispatch
        self._on_error = on_error
        self._context = context or zmq.Context.instance()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._awake = False
        self._pipes_closed = False
        self._stopping = False
        self._drained = threading.Event()
        self._space = threading.Condition()
        self._dealer: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._handshakes = 0
        self._last_sent = 0.0
        self._last_ping = 0.0
        self._last_received = 0.0
        self.reconnects = 0

    # -- app-thread side --------------------------------------------------------------------

    def enqueue_publish(self, msg_id: bytes, header: bytes, payload: bytes) -> None:
        """Queue one (header, payload) for the next PUB batch.

        Waits while too many publishes are unsent or unconfirmed (backpressure), so a
        broker outage costs memory up to `outbox_limit` messages, never lost messages.
        """
        limit = self.settings.outbox_limit
        with self._space:  # also guards `unconfirmed` against the I/O thread's resend
            while len(self.unconfirmed) >= limit and not self._stopping:
                self._space.wait(0.05)
            item = (header, payload)
            self.unconfirmed[msg_id] = item
            self.outbox.append(item)
        self.wake()

    def wait_confirmed(self, timeout: float) -> bool:
        """Block until no publish awaits its CONFIRM (or failed); False after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._space:
            while self.unconfirmed:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return False
                self._space.wait(min(left, 0.1))
        return True

    def settle(self, seq: int, error: str | None, requeue: bool = True) -> None:
        """Queue an ACK (error None) or NACK for delivery `seq` (any thread)."""
        self.settlements.append((seq, error, requeue))
        self.wake()

    def wake(self) -> None:
        """Make the I/O thread look at its queues soon."""
        if not self._awake and not self._pipes_closed:
            self._awake = True
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
            except OSError:
                pass  # the I/O thread has ended and closed the pipe

    def stop(self, drain_timeout: float = 2.0) -> None:
        """Flush queued publishes, wait until the broker has read them, say BYE, stop."""
        self._stopping = True
        self.wake()
        self._drained.wait(drain_timeout)
        self.join(drain_timeout + 1.0)

    # -- I/O thread -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # the thread must never die silently
            log.exception("client I/O thread failed")
            self.failure = BusError(f"client I/O thread failed: {exc!r}")
            self.welcomed.set()
        finally:
            self._close_socket()
            self._pipes_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._drained.set()

    def _open_socket(self) -> None:
        dealer = self._context.socket(zmq.DEALER)
        dealer.linger = 1000
        dealer.plain_username = self.settings.app_id.encode()
        dealer.plain_password = self.settings.token.encode()
        dealer.sndhwm = 100_000
        dealer.rcvhwm = 100_000
        dealer.reconnect_ivl = 100
        dealer.reconnect_ivl_max = 2000
        self._monitor = dealer.get_monitor_socket(_MONITOR_EVENTS)
        dealer.connect(self.settings.endpoint)
        self._dealer = dealer
        self._sent_sids.clear()
        self._handshakes = 0
        self._last_received = time.monotonic()

    def _close_socket(self) -> None:
        if self._dealer is not None:
            self._dealer.disable_monitor()
            self._dealer.close()
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._dealer = self._monitor = None

    def _send(self, frames: list[bytes]) -> bool:
        """Send one multipart message; False when the socket is full (HWM)."""
        dealer = self._dealer
        assert dealer is not None
        try:
            dealer.send(frames[0], (_SNDMORE if len(frames) > 1 else 0) | _NOBLOCK)
        except zmq.Again:
            return False
        last = len(frames) - 1
        for index in range(1, len(frames)):
            dealer.send(frames[index], _SNDMORE if index < last else 0)
        self._last_sent = time.monotonic()
        return True

    def _hello(self) -> None:
        hello = {
            "v": list(P.PROTOCOL_VERSIONS),
            "client": "plexus-py/0.1",
            "session": self.settings.session,
        }
        self._send([P.HELLO, pack(hello)])

    def _loop(self) -> None:
        self._open_socket()
        self._hello()
        poller = zmq.Poller()
        self._register(poller)
        closing_ping_sent = False
        while self.failure is None:
            heartbeat = self._heartbeat_s()
            timeout_ms = max(1, int(heartbeat * 1000 / 2))
            events = dict(poller.poll(timeout_ms))
            if self._wake_r in events:
                self._awake = False
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if self._monitor is not None and self._monitor in events and self._on_monitor():
                return
            if self._dealer is not None and self._dealer in events:
                closing_done = self._receive()
                if closing_done and closing_ping_sent:
                    self._send([P.BYE])
                    return
            if self.welcomed.is_set() and self.failure is None:
                self._sync_subscriptions()
                self._flush()
                if self._stopping and not self.outbox and not closing_ping_sent:
                    self._send([P.PING, _CLOSING_PING])  # PONG: broker read it all
                    closing_ping_sent = True
            elif self._stopping and (self.failure is not None or not self.welcomed.is_set()):
                return
            now = time.monotonic()
            if now - self._last_ping >= heartbeat:
                self._last_ping = now
                self._send([P.PING, b"\x80"])
            if now - self._last_received > self._timeout_s():
                log.warning("broker silent; reconnecting")
                self._reconnect(poller)

    def _register(self, poller: zmq.Poller) -> None:
        assert self._dealer is not None and self._monitor is not None
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)

    def _reconnect(self, poller: zmq.Poller) -> None:
        for sock in (self._dealer, self._monitor):
            if sock is not None:
                poller.unregister(sock)
        poller.unregister(self._wake_r)
        self._close_socket()
        self.reconnects += 1
        self._open_socket()
        self._register(poller)
        self._hello()

    def _heartbeat_s(self) -> float:
        ms = (
            self.settings.heartbeat_ms or self.welcome.get("heartbeat_ms") or P.DEFAULT_HEARTBEAT_MS
        )
        return float(ms) / 1000.0

    def _timeout_s(self) -> float:
        ms = self.welcome.get("timeout_ms") or P.DEFAULT_PEER_TIMEOUT_MS
        return float(ms) / 1000.0

    def _on_monitor(self) -> bool:
        """Handle socket events; True when the connection failed for good."""
        assert self._monitor is not None
        while self._monitor.poll(0):
            message = recv_monitor_message(self._monitor)
            kind = message["event"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.failure = AuthenticationError(
                    f"broker rejected the credential of app {self.settings.app_id!r}",
                    int(Code.AUTH_FAILED),
                    "use the credential from the supervisor or `plexus env APP_ID`",
                )
                self.welcomed.set()
                self._fail_pending(self.failure)
                return True
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
                if self._handshakes > 1:  # transport came back: maybe a new broker
                    self.reconnects += 1
                    self._hello()
        return False

    def _receive(self) -> bool:
        """Drain inbound messages; True when the closing PONG arrived."""
        dealer = self._dealer
        assert dealer is not None
        closing = False
        for _ in range(_DRAIN_LIMIT):
            try:
                first = dealer.recv(_NOBLOCK)
            except zmq.Again:
                break
            frames = [first]
            while dealer.getsockopt(_RCVMORE):
                frames.append(dealer.recv())
            self._last_received = time.monotonic()
            try:
                closing = self._handle(frames) or closing
            except WireError as exc:
                log.warning("malformed message from broker: %s", exc)
        return closing

    def _handle(self, frames: list[bytes]) -> bool:
        command = frames[0]
        if command == P.DELIVER:
            self._deliver(frames)
        elif command == P.CONFIRM:
            self._confirmed(unpack_map(frames[1]).get("ids"))
        elif command == P.PONG:
            return len(frames) > 1 and frames[1] == _CLOSING_PING
        elif command == P.SUBOK:
            self._resolve_sub(unpack_map(frames[1]).get("sid"), None)
        elif command == P.WELCOME:
            self.welcome = unpack_map(frames[1], "WELCOME", P.MAX_REPLY_BYTES)
            self._sent_sids.clear()
            self._remember_resumed(self.welcome.get("subs"))
            self._resend_unconfirmed()
            self.welcomed.set()
        elif command == P.DLQOK and self.dlq_future is not None:
            self.dlq_future.set_result(unpack_map(frames[1], "DLQOK", P.MAX_REPLY_BYTES))
        elif command == P.ERROR:
            self._error(unpack_map(frames[1]))
        elif command == P.STATSOK and self.stats_future is not None:
            self.stats_future.set_result(unpack_map(frames[1], "STATSOK", P.MAX_REPLY_BYTES))
        return False

    def _deliver(self, frames: list[bytes]) -> None:
        subs = self._subs
        for i in range(1, len(frames) - 3, 4):
            envelope = decode_envelope(frames[i + 1], frames[i + 2], frames[i + 3])
            if frames[i] == _REPLY_SIDS:
                self._replied(envelope)
                continue
            live: list[Subscription] = []
            held: list[int] = []
            for sid in decode_sids(frames[i]):
                sub = subs.get(sid)
                if sub is not None and sub.active:
                    live.append(sub)
                elif sid in self.resumed_subs:  # the app has not re-subscribed it yet
                    held.append(sid)
            if not live and not held:  # unsubscribed meanwhile: nothing will consume it
                self.settlements.append((envelope.seq, None, True))
                continue
            receipt = Receipt(envelope.seq, len(live) + len(held), self.settle)
            for sid in held:
                self._orphans.setdefault(sid, []).append(Message(envelope, sid, receipt))
            for sub in live:
                self._release_orphans(sub)
                self._hand_over(sub, Message(envelope, sub.sid, receipt))

    def _replied(self, envelope: Envelope) -> None:
        """A reply to one of our requests: resolve its future, acknowledge at once."""
        self.settlements.append((envelope.seq, None, True))
        future = self.request_futures.pop(envelope.in_reply_to or "", None)
        if future is not None and not future.done():
            future.set_result(Message(envelope, P.REPLY_SID))

    def _hand_over(self, sub: Subscription, message: Message) -> None:
        if sub.handler is not None:
            self._dispatch(sub, message)
        elif not sub.offer(message):
            log.warning("subscription %s overflowed its local queue", sub.pattern)

    def _release_orphans(self, sub: Subscription) -> None:
        """Deliveries that arrived for a resumed sid before the app re-claimed it, in order."""
        orphans = self._orphans.pop(sub.sid, None)
        self.resumed_subs.pop(sub.sid, None)
        for message in orphans or ():
            self._hand_over(sub, message)

    def _remember_resumed(self, subs: Any) -> None:
        self.resumed_subs = {}
        if not isinstance(subs, list):
            return
        for item in subs:
            if isinstance(item, list) and len(item) == 2 and type(item[0]) is int:
                sid, pattern = item
                if sid not in self._subs and isinstance(pattern, str):
                    self.resumed_subs[sid] = pattern

    def _confirmed(self, ids: Any) -> None:
        if not isinstance(ids, list):
            return
        with self._space:
            for msg_id in ids:
                if isinstance(msg_id, bytes):
                    self.unconfirmed.pop(msg_id, None)
            self._space.notify_all()
        for msg_id in ids:
            future = self.confirm_futures.pop(msg_id, None) if isinstance(msg_id, bytes) else None
            if future is not None:
                future.set_result(None)

    def _resend_unconfirmed(self) -> None:
        """After a (re)HELLO: everything unconfirmed goes out again, in order, first."""
        with self._space:
            if not self.unconfirmed:
                return
            queued = {id(item) for item in self.outbox}
            resend = [item for item in self.unconfirmed.values() if id(item) not in queued]
            self.outbox.extendleft(reversed(resend))

    def _error(self, body: dict[str, Any]) -> None:
        """Route an ERROR to what it concerns: the session, a SUB, a message, a request."""
        error = error_from_wire(body)
        if self.failure is not None:
            return  # this connection is finished (credential refused, session taken over)
        if error.code == int(Code.NOT_WELCOMED):
            if self.welcomed.is_set():  # one HELLO per lost session, not one per refusal
                self.welcomed.clear()
                self._hello()
            return
        code = error.code or 0
        hello_refused = code // 100 == 2 or code == int(Code.UNSUPPORTED_VERSION)
        if error.code == int(Code.SESSION_TAKEN_OVER) or (
            hello_refused and not self.welcomed.is_set()
        ):
            self.failure = error  # the loop ends; the next call on the Bus raises it
            self._fail_pending(error)
            self.welcomed.set()
            return
        sid = error.ref.get("sid")
        if isinstance(sid, int) and sid in self.sub_futures:
            self._subs.pop(sid, None)
            self._resolve_sub(sid, error)
            return
        msg_id = error.ref.get("id")
        if isinstance(msg_id, bytes) and self._fail_message(msg_id, error):
            return
        if error.code in (int(Code.COMMAND_DENIED), int(Code.UNKNOWN_DLQ_ENTRY)):
            for future in (self.stats_future, self.dlq_future):
                if future is not None and not future.done():
                    future.set_exception(error)
                    return
        self._on_error(error)

    def _fail_message(self, msg_id: bytes, error: BusError) -> bool:
        """A publish or request was refused: it is final (never resent); True if awaited."""
        with self._space:
            self.unconfirmed.pop(msg_id, None)
        reply = self.request_ids.pop(msg_id, None)
        if reply is not None:
            pending = self.request_futures.pop(reply, None)
            if pending is not None and not pending.done():
                pending.set_exception(error)
            return True
        confirm = self.confirm_futures.pop(msg_id, None)
        if confirm is not None:
            confirm.set_exception(error)
            return True
        return False

    def _resolve_sub(self, sid: Any, error: BusError | None) -> None:
        future = self.sub_futures.pop(sid, None) if isinstance(sid, int) else None
        if future is None:
            return
        if error is None:
            future.set_result(None)
        else:
            self._sent_sids.discard(sid)
            future.set_exception(error)

    def _fail_pending(self, error: BusError) -> None:
        for future in [*self.sub_futures.values(), *self.confirm_futures.values()]:
            if not future.done():
                future.set_exception(error)
        self.sub_futures.clear()
        self.confirm_futures.clear()

    def _sync_subscriptions(self) -> None:
        """Make the broker's subscriptions of this session equal the registered ones."""
        wanted = {sid for sid, sub in list(self._subs.items()) if sub.active}
        for sid in wanted & (self._orphans.keys() | self.resumed_subs.keys()):
            self._release_orphans(self._subs[sid])
        for sid in wanted - self._sent_sids:
            sub = self._subs.get(sid)
            if sub is not None and self._send(
                [
                    P.SUB,
                    pack(
                        {
                            "sid": sid,
                            "pattern": sub.pattern,
                            "durable": sub.durable,
                            "serve": sub.serve,
                        }
                    ),
                ]
            ):
                self._sent_sids.add(sid)
        for sid in self._sent_sids - wanted:
            if self._send([P.UNSUB, pack({"sid": sid})]):
                self._sent_sids.discard(sid)

    def _flush(self) -> None:
        """Send queued publishes as PUB batches until the queue or the socket is exhausted."""
        if self.settlements:
            self._send_settlements()
        while self.outbox_control:
            if not self._send(self.outbox_control[0]):
                return
            self.outbox_control.popleft()
        outbox = self.outbox
        while outbox:
            frames = [P.PUB]
            taken: list[tuple[bytes, bytes]] = []
            while outbox and len(taken) < P.CLIENT_BATCH:
                item = outbox.popleft()
                taken.append(item)
                frames += item
            if not self._send(frames):
                outbox.extendleft(reversed(taken))
                break
        if len(outbox) < self.settings.outbox_limit:
            with self._space:
                self._space.notify_all()

    def _send_settlements(self) -> None:
        acks: list[int] = []
        settlements = self.settlements
        while settlements:
            seq, error, requeue = settlements.popleft()
            if error is None:
                acks.append(seq)
            else:
                nack = {"seq": seq, "error": error[:512], "requeue": requeue}
                self._send([P.NACK, pack(nack)])
        for start in range(0, len(acks), P.MAX_ACK_BATCH):
            self._send([P.ACK, pack({"seqs": acks[start : start + P.MAX_ACK_BATCH]})])

    def send_control(self, frames: list[bytes]) -> None:
        """Queue one non-PUB command (REQ, REP, ...) for the I/O thread (any thread)."""
        self.outbox_control.append(frames)
        self.wake()

    def request_dlq(self, request: dict[str, Any]) -> Future[dict[str, Any]]:
        """Ask the broker to list, replay or purge dead letters (platform identities only)."""
        future: Future[dict[str, Any]] = Future()
        self.dlq_future = future
        self.outbox_control.append([P.DLQ, pack(request)])
        self.wake()
        return future

    def request_stats(self, reset_latency: bool = False) -> Future[dict[str, Any]]:
        """Ask the broker for STATS (platform identities only)."""
        future: Future[dict[str, Any]] = Future()
        self.stats_future = future
        self.outbox_control.append([P.STATS, pack({"reset": reset_latency})])
        self.wake()
        return future
