"""The threaded driver of the client core: one I/O thread owns the DEALER socket.

The protocol lives in `clients.session.ClientSession`; this module only moves frames and
events. App threads never touch the session or the socket: they append to deques
(publishes, settlements, commands) and ring a `Wakeup`, so a publish costs an append
while the I/O thread is busy, and the I/O thread feeds the queues into the session, sends
what `outgoing()` returns and turns events into futures resolved, messages handed to
subscriptions, and errors reported. Backpressure is a counter under a condition: taken
by `enqueue_publish` (which waits, or raises `WouldBlock` with `block=False`), given back
by Confirmed and PublishRefused events.

Deliveries cross threads in batches: what one loop turn received goes to the handler
dispatcher as one batch (one queue put) and to each `get()` subscription as one
`offer_all` (one notify). Settlements come back without a wake-up per message: an ACK
only wakes the I/O thread when the session's `ack_batch` of them are queued, or when the
I/O thread has backed off (below); a NACK always does. While deliveries are being
settled the I/O thread looks at the settlements every `_SETTLE_POLL_S` on its own, and
the session sends the ACKs it has within `ACK_DELAY_S`; a turn with nothing to do
doubles that interval up to `_SETTLE_POLL_MAX_S`, after which it stops polling. Any wait
longer than `_SETTLE_POLL_S` counts as backed off: the flag goes up before the last look
at the settlements, and `settle` appends before it reads the flag, so an ACK is always
either seen by that look or wakes the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as P
from broker.errors import Code
from broker.wire import Dlq, Reply, Request, Stats
from clients.errors import AuthenticationError, BusError, ClosedError, WouldBlock
from clients.events import (
    Answered,
    CallFailed,
    Closed,
    Confirmed,
    ErrorReported,
    Failed,
    PublishRefused,
    ReconnectNeeded,
    Replied,
    RequestFailed,
    Subscribed,
    SubscribeFailed,
    Welcomed,
)
from clients.message import Message, Subscription
from clients.session import ClientSession, SessionConfig, State
from clients.wakeup import Wakeup
from security.credentials import Credential, CredentialError
from security.handoff import read_handoff

log = logging.getLogger("plexus.client")

_SNDMORE = 2
_NOBLOCK = 1
_EVENTS = 15
_POLLIN = 1
_DRAIN_LIMIT = 256
_RETRY_SEND_S = 0.01
_SETTLE_POLL_S = 0.004
"""How often the I/O thread looks at the settlements while deliveries are being settled."""
_SETTLE_POLL_MAX_S = 0.5
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH

Command = Callable[[ClientSession], None]
Dispatch = Callable[[list[tuple[Subscription, Message]]], None]
"""Hands one loop turn's handler deliveries, in order, to the handler dispatcher."""


@dataclass(frozen=True, slots=True)
class ConnectSettings:
    """Where and as whom to connect."""

    endpoint: str
    app_id: str
    token: str
    heartbeat_ms: int | None = None
    outbox_limit: int = 10_000
    session: str = P.DEFAULT_SESSION


def auth_refused(app_id: str) -> AuthenticationError:
    return AuthenticationError(
        f"broker rejected the credential of app {app_id!r}",
        int(Code.AUTH_FAILED),
        "use the credential from the supervisor or `plexus env APP_ID`",
    )


def credential_of(settings: ConnectSettings) -> Credential:
    """The settings' token as a credential; a malformed one as `AuthenticationError`."""
    try:
        return Credential.parse(settings.token)
    except CredentialError as exc:
        raise AuthenticationError(
            f"the credential of app {settings.app_id!r} is not usable: {exc}",
            int(Code.AUTH_FAILED),
            "use the credential from the supervisor or `plexus env APP_ID`",
        ) from None


def open_dealer(context: zmq.Context[Any], settings: ConnectSettings) -> zmq.Socket[Any]:
    """The DEALER of one connection (not yet connected): credential, limits, reconnects."""
    dealer: zmq.Socket[Any] = context.socket(zmq.DEALER)
    dealer.linger = 1000
    credential_of(settings).connect_to_broker(dealer)
    dealer.sndhwm = 100_000
    dealer.rcvhwm = 100_000
    dealer.reconnect_ivl = 100
    dealer.reconnect_ivl_max = 2000
    return dealer


class Connection(threading.Thread):
    """Runs the DEALER socket loop in a daemon thread until the session ends."""

    def __init__(
        self,
        settings: ConnectSettings,
        subscriptions: dict[int, Subscription],
        dispatch: Dispatch,
        on_error: Callable[[BusError], None],
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__(name=f"plexus-io-{settings.app_id}", daemon=True)
        self.settings = settings
        self.session = ClientSession(
            SessionConfig(
                settings.app_id,
                settings.session,
                settings.heartbeat_ms,
                settings.outbox_limit,
            ),
            self.settle,
            time.monotonic(),
        )
        self.welcomed = threading.Event()
        self.failure: BusError | None = None
        self.confirm_futures: dict[bytes, Future[None]] = {}
        self.sub_futures: dict[int, Future[None]] = {}
        self._subs = subscriptions
        self._dispatch = dispatch
        self._on_error = on_error
        self._context = context or zmq.Context.instance()
        self._publishes: deque[tuple[bytes, bytes, bytes]] = deque()
        self._settlements: deque[tuple[int, str | None, bool]] = deque()
        self._commands: deque[Command] = deque()
        self._unsent: deque[list[bytes]] = deque()
        self._in_window = 0
        """Publishes queued or unconfirmed: the window `enqueue_publish` keeps bounded."""
        self._ack_batch = self.session.ack_batch
        """The session's, copied for app threads (updated at each WELCOME)."""
        self._settle_poll: float | None = None
        """The I/O thread's interval for looking at the settlements; None: not polling."""
        self._backed_off = True
        """The I/O thread may not look at the settlements soon: `settle` must wake it."""
        self._space = threading.Condition()
        self._wakeup = Wakeup()
        self._stopping = False
        self._ident = 0
        self._dealer: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._handshakes = 0

    # -- app-thread side --------------------------------------------------------------------

    @property
    def welcome_store(self) -> str | None:
        welcome = self.session.welcome
        return welcome.store if welcome is not None else None

    @property
    def reconnects(self) -> int:
        return self.session.reconnects

    @property
    def unconfirmed(self) -> int:
        return self._in_window

    def enqueue_publish(
        self,
        msg_id: bytes,
        header: bytes,
        payload: bytes,
        future: Future[None] | None = None,
        block: bool = True,
    ) -> None:
        """Queue one (header, payload) for the next PUB batch.

        Waits while the window of unsent or unconfirmed publishes is full (backpressure),
        so a broker outage costs memory up to `outbox_limit` messages, never lost
        messages; with `block=False` raises `WouldBlock` instead.
        """
        limit = self.settings.outbox_limit
        with self._space:
            while self._in_window >= limit:
                if self.failure is not None:
                    raise self.failure
                if self._stopping:
                    raise ClosedError("this Bus is closed", hint="create a new one")
                if not block:
                    raise WouldBlock(
                        f"{self._in_window} publishes await confirmation (window {limit})",
                        hint="retry later, or use publish(), which waits for room",
                    )
                self._space.wait(0.05)
            self._in_window += 1
            if future is not None:
                self.confirm_futures[msg_id] = future
            self._publishes.append((msg_id, header, payload))
        self._wakeup.wake()

    def wait_confirmed(self, timeout: float) -> bool:
        """Block until no publish awaits its CONFIRM; False after `timeout` (or an end)."""
        deadline = time.monotonic() + timeout
        with self._space:
            while self._in_window:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping or self.failure is not None:
                    return False
                self._space.wait(min(left, 0.1))
        return True

    def settle(self, seq: int, error: str | None, requeue: bool = True) -> None:
        """Queue an ACK (error None) or NACK for delivery `seq` (any thread). Only a NACK,
        a full ACK batch or a backed-off I/O thread costs a wake-up (module docstring)."""
        settlements = self._settlements
        settlements.append((seq, error, requeue))  # before reading the flag: see _wait_s
        if (
            error is not None or self._backed_off or len(settlements) >= self._ack_batch
        ) and threading.get_ident() != self._ident:
            self._wakeup.wake()

    def command(self, command: Command) -> None:
        """Run `command(session)` on the I/O thread soon (any thread)."""
        self._commands.append(command)
        self._wakeup.wake()

    def add_subscription(self, sub: Subscription, future: Future[None]) -> None:
        """Subscribe `sub` (its sid is set by the session on the I/O thread)."""

        def run(session: ClientSession) -> None:
            sub.sid = session.subscribe(sub.pattern, durable=sub.durable, serve=sub.serve)
            self.sub_futures[sub.sid] = future
            self._subs[sub.sid] = sub

        self.command(run)

    def remove_subscription(self, sub: Subscription) -> None:
        def run(session: ClientSession) -> None:
            if sub.sid and self._subs.get(sub.sid) is sub:
                del self._subs[sub.sid]
                session.unsubscribe(sub.sid)

        self.command(run)

    def request(self, record: Request, deadline: float, future: Future[Message]) -> None:
        self.command(lambda session: session.request(record, deadline, future))

    def reply(self, record: Reply) -> None:
        self.command(lambda session: session.reply(record))

    def call(self, record: Stats | Dlq, deadline: float) -> Future[dict[str, Any]]:
        """Send STATS or DLQ; the future gets the answer (or the refusal, or expiry)."""
        future: Future[dict[str, Any]] = Future()

        def run(session: ClientSession) -> None:
            session.call(record, deadline, future)

        self.command(run)
        return future

    def cancel(self, token: object) -> None:
        self.command(lambda session: session.cancel(token))

    def stop(self, drain_timeout: float = 2.0) -> None:
        """Flush queued publishes, wait until the broker has read them, say BYE, stop."""
        with self._space:
            self._stopping = True
            self._space.notify_all()
        self.command(lambda session: session.close(time.monotonic(), drain_timeout))
        if self.is_alive():
            self.join(drain_timeout + 1.0)

    # -- I/O thread -------------------------------------------------------------------------

    def run(self) -> None:
        self._ident = threading.get_ident()
        try:
            self._loop()
        except Exception as exc:  # the thread must never die silently
            log.exception("client I/O thread failed")
            self._failed(BusError(f"client I/O thread failed: {exc!r}"))
        finally:
            self._close_socket()
            self._wakeup.close()
            with self._space:
                self._stopping = True
                self._space.notify_all()

    def _open_socket(self) -> None:
        dealer = open_dealer(self._context, self.settings)
        self._monitor = dealer.get_monitor_socket(_MONITOR_EVENTS)
        dealer.connect(self.settings.endpoint)
        self._dealer = dealer
        self._handshakes = 0
        self._unsent.clear()

    def _close_socket(self) -> None:
        if self._dealer is not None:
            self._dealer.disable_monitor()
            self._dealer.close()
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._dealer = self._monitor = None

    def _poller(self) -> zmq.Poller:
        assert self._dealer is not None and self._monitor is not None
        poller = zmq.Poller()
        # `poll` reports in this order: the queues first, then the transport's news
        poller.register(self._wakeup.fd, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        return poller

    def _loop(self) -> None:
        """One turn: wait, take what came in (socket, queues), send everything that
        produced, and only then act on the events: a future resolved wakes its app
        thread while this one goes straight back to `poll` (no fight for the GIL with
        the thread it just woke), and a reply's ACK has left already."""
        session = self.session
        self._open_socket()
        poller = self._poller()
        wakeup_fd = self._wakeup.fd
        while True:
            wait = self._wait_s()
            timeout = 0 if wait <= 0 else min(int(wait * 1000) + 1, 60_000)
            ready = poller.poll(timeout)
            for sock, _ in ready:
                if sock is self._dealer:
                    self._receive()
                elif sock == wakeup_fd:
                    self._wakeup.drain()  # before looking at the queues: see clients.wakeup
                else:
                    self._on_monitor()
            settled = bool(self._settlements)
            self._take_inputs()
            self._send_outgoing()
            replace, handed = self._handle_events()
            if self._settlements:  # acks made while handing over (this thread: no wake)
                settled = True
                session.settle_all(self._settlements)
                self._send_outgoing()
            if not replace:
                replace, more = self._handle_events()
                handed = handed or more
            self._pace_settle_poll(handed or settled, bool(ready))
            if replace:  # the transport must be replaced
                self._close_socket()
                self._open_socket()
                poller = self._poller()
                session.connection_made(time.monotonic())
            if session.finished:
                return

    def _wait_s(self) -> float:
        """How long the next poll may wait: the session's deadline, a retry of a full
        socket, the settlement poll. A wait past `_SETTLE_POLL_S` raises the backed-off
        flag first, then looks at the settlements once more (see the module docstring)."""
        wait = self.session.next_deadline() - time.monotonic()
        if self._unsent:
            wait = min(wait, _RETRY_SEND_S)  # the socket was full: try again soon
        if self._settle_poll is not None:
            wait = min(wait, self._settle_poll)
        backed_off = wait > _SETTLE_POLL_S
        self._backed_off = backed_off
        if backed_off and self._settlements:
            return 0.0
        return wait

    def _pace_settle_poll(self, active: bool, woken: bool) -> None:
        """Poll the settlements often while deliveries come and go, less and less when
        nothing happens, and not at all after a long quiet spell."""
        if active:
            self._settle_poll = _SETTLE_POLL_S
        elif not woken and self._settle_poll is not None:
            if self._settle_poll >= _SETTLE_POLL_MAX_S:
                self._settle_poll = None
            else:
                self._settle_poll = min(self._settle_poll * 2, _SETTLE_POLL_MAX_S)

    def _send_outgoing(self) -> None:
        self._unsent.extend(self.session.outgoing(time.monotonic()))
        if self._unsent:
            self._send_unsent()

    def _take_inputs(self) -> None:
        session = self.session
        commands = self._commands
        while commands:
            commands.popleft()(session)
        if self._publishes:
            session.publish_all(self._publishes)
        if self._settlements:
            session.settle_all(self._settlements)

    def _send_unsent(self) -> None:
        assert self._dealer is not None
        send_in_order(self._dealer, self._unsent)

    def _on_monitor(self) -> None:
        monitor = self._monitor
        assert monitor is not None
        while monitor.poll(0):
            kind = recv_monitor_message(monitor)["event"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.session.auth_failed(auth_refused(self.settings.app_id))
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
                if self._handshakes > 1:  # transport came back: maybe a new broker
                    self._unsent.clear()
                    self.session.connection_made(time.monotonic())

    def _receive(self) -> None:
        assert self._dealer is not None
        receive_available(self._dealer, self.session, time.monotonic())

    # -- events -----------------------------------------------------------------------------

    def _handle_events(self) -> tuple[bool, bool]:
        """Act on what the session reports: (the transport must be replaced, deliveries
        were handed over). The deliveries go out after the others, as one batch
        (`hand_over`)."""
        replace = False
        messages: list[Message] = []
        for event in self.session.take_events():
            if type(event) is Message:
                messages.append(event)
            elif type(event) is Confirmed:
                self._confirmed(event.ids)
            elif isinstance(event, ReconnectNeeded):
                replace = True
            else:
                self._other(event)
        if messages:
            hand_over(messages, self._subs, self._dispatch)
        return replace, bool(messages)

    def _confirmed(self, ids: tuple[bytes, ...]) -> None:
        with self._space:
            self._in_window -= len(ids)
            self._space.notify_all()
        futures = self.confirm_futures
        if futures:
            for msg_id in ids:
                future = futures.pop(msg_id, None)
                if future is not None:
                    future.set_result(None)

    def _other(self, event: object) -> None:  # noqa: PLR0912 - one branch per event kind
        if isinstance(event, PublishRefused):
            with self._space:
                self._in_window -= 1
                self._space.notify_all()
            future = self.confirm_futures.pop(event.msg_id, None)
            if future is not None:
                future.set_exception(event.error)
            else:
                self._on_error(event.error)
        elif isinstance(event, Replied):
            _resolve(event.token, event.message)
        elif isinstance(event, Answered):
            _resolve(event.token, event.data)
        elif isinstance(event, RequestFailed | CallFailed):
            _reject(event.token, event.error)
        elif isinstance(event, Subscribed):
            _resolve(self.sub_futures.pop(event.sid, None), None)
        elif isinstance(event, SubscribeFailed):
            sub = self._subs.pop(event.sid, None)
            if sub is not None:
                sub.active = False
            _reject(self.sub_futures.pop(event.sid, None), event.error)
        elif isinstance(event, Welcomed):
            self._ack_batch = self.session.ack_batch
            self.welcomed.set()
        elif isinstance(event, ErrorReported):
            self._on_error(event.error)
        elif isinstance(event, Failed):
            self._failed(event.error)
        elif isinstance(event, Closed):
            pass  # the loop ends when the session is final

    def _failed(self, error: BusError) -> None:
        """The connection is finished: every waiter gets `error`."""
        self.failure = error
        for future in [*self.sub_futures.values(), *self.confirm_futures.values()]:
            _reject(future, error)
        self.sub_futures.clear()
        self.confirm_futures.clear()
        with self._space:
            self._space.notify_all()
        self.welcomed.set()


def _resolve(token: object, value: object) -> None:
    future = cast("Future[object] | None", token)
    if future is not None and not future.done():
        future.set_result(value)


def _reject(token: object, error: BaseException) -> None:
    future = cast("Future[object] | None", token)
    if future is not None and not future.done():
        future.set_exception(error)


def read_credential_fd(fd: int) -> str:
    """Read the whole credential the supervisor wrote into an inherited pipe, then close it."""
    return read_handoff(fd).decode("utf-8").strip()


class Receiver(Protocol):
    """What `hand_over` needs of a subscription (`Subscription`, `AsyncSubscription`)."""

    @property
    def pattern(self) -> str: ...
    @property
    def active(self) -> bool: ...
    @property
    def handler(self) -> object: ...
    def offer_all(self, messages: list[Message]) -> int: ...


SubT = TypeVar("SubT", bound=Receiver)


def hand_over(
    messages: list[Message],
    subs: Mapping[int, SubT],
    dispatch: Callable[[list[tuple[SubT, Message]]], None],
) -> None:
    """Hand one turn's deliveries over (both drivers): those for handlers to `dispatch`
    as one batch, in order; those for `get()` to each subscription's queue as one batch
    (`offer_all`: overflow is counted, nacked and logged); a copy for a subscription
    that has ended is consumed (acked)."""
    batch: list[tuple[SubT, Message]] = []
    queued: dict[SubT, list[Message]] = {}
    for message in messages:
        sub = subs.get(message.subscription_id)
        if sub is None or not sub.active:
            message.ack()  # unsubscribed meanwhile: this copy is consumed
        elif sub.handler is not None:
            batch.append((sub, message))
        elif sub in queued:
            queued[sub].append(message)
        else:
            queued[sub] = [message]
    if batch:
        dispatch(batch)
    for sub, mine in queued.items():
        overflowed = sub.offer_all(mine)
        if overflowed:
            log.warning(
                "subscription %s overflowed its local queue: %d nacked", sub.pattern, overflowed
            )


def receive_available(sock: zmq.Socket[Any], session: ClientSession, now: float) -> None:
    """Hand the messages `sock` holds to `session` without waiting, at most `_DRAIN_LIMIT`
    per call (both drivers)."""
    receive = session.receive
    for _ in range(_DRAIN_LIMIT):
        try:
            frame = sock.recv(_NOBLOCK, copy=False)
        except zmq.Again:
            return
        # a Frame's `more` reads the flag off the message itself: a getsockopt(RCVMORE)
        # per frame cost more than the copy-free receive does (4 frames per delivery)
        frames = [frame.bytes]
        while frame.more:
            frame = sock.recv(0, copy=False)
            frames.append(frame.bytes)
        receive(frames, now)
        if not cast("int", sock.getsockopt(_EVENTS)) & _POLLIN:
            return  # cheaper than the zmq.Again a last recv would raise


def send_in_order(sock: zmq.Socket[Any], unsent: deque[list[bytes]]) -> None:
    """Send queued multipart messages in order until done or the socket is full (both
    drivers: the frames of one message go out whole or not at all)."""
    while unsent:
        frames = unsent[0]
        last = len(frames) - 1
        try:
            sock.send(frames[0], (_SNDMORE if last else 0) | _NOBLOCK)
        except zmq.Again:
            return
        for index in range(1, last + 1):
            sock.send(frames[index], _SNDMORE if index < last else 0)
        unsent.popleft()


__all__ = ["ConnectSettings", "Connection", "State", "read_credential_fd"]
