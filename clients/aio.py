"""The asyncio client of the Plexus bus: `AsyncBus`, the same calls as `Bus`, as coroutines.

    from clients.aio import AsyncBus
    async with await AsyncBus.connect() as bus:       # identity from the environment
        sub = await bus.subscribe("market.*.prices")  # or subscribe(pattern, handler)
        await bus.publish("market.AAPL.prices", {"px": 187.2}, confirm=True)
        message = await sub.get(timeout=1.0)
        reply = await bus.request("pricing.quote", {"sym": "AAPL"}, timeout=2.0)

It is the second driver of the sans-I/O core `clients.session.ClientSession` (the first
is `Bus`'s I/O thread), built for one event loop, e.g. the web gateway's. No thread: the
loop owns the DEALER. A reader task feeds the socket's messages into the session; every
call that queues something schedules one `_pump` (so publishes made in one loop turn go
out as one PUB batch), which sends what the session has, acts on its events and re-arms
one timer at the session's next deadline (heartbeat, silence, request and call expiry).
Sends never wait: a full socket keeps the rest queued and retries shortly. Handlers
(plain or coroutine functions) run one at a time in one dispatcher task, in delivery
order, and the message is acked when the handler returns, nacked when it raises.
Everything must be called from the loop that connected the bus; only `Message.ack()` and
`nack()` may also be called from other threads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from broker.wire import Dlq, DlqOp, Stats
from clients.aio_store import AsyncStoreClient
from clients.aio_subscription import AsyncHandler, AsyncSubscription
from clients.connection import (
    ConnectSettings,
    auth_refused,
    hand_over,
    open_dealer,
    receive_available,
    send_in_order,
)
from clients.driving import (
    connect_settings,
    no_answer,
    no_reply,
    no_welcome,
    still_unconfirmed,
    window_full,
)
from clients.errors import (
    BusError,
    ClosedError,
    RequestTimeout,
)
from clients.events import (
    Answered,
    CallFailed,
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
from clients.message import Message
from clients.outbound import (
    checked_pattern,
    checked_reply,
    encoded_publish,
    reply_record,
    request_record,
)
from clients.session import ClientSession, SessionConfig
from clients.store import persistence_off, to_ns

__all__ = ["AsyncBus", "AsyncSubscription"]

log = logging.getLogger("plexus.client")

_RETRY_SEND_S = 0.005
_PUMP_ROUNDS = 8
_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


class _Signal:
    """Wake every coroutine waiting for "something changed" (room in the window, a
    confirmation); each waiter re-checks its own condition."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait(self, timeout: float | None) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await asyncio.wait_for(waiter, timeout)


class AsyncBus:
    """A connection of one app to the bus, on one asyncio event loop."""

    def __init__(
        self, settings: ConnectSettings, context: zmq.asyncio.Context | None = None
    ) -> None:
        self.app_id = settings.app_id
        self.settings = settings
        self.errors: asyncio.Queue[BusError] = asyncio.Queue()
        self._context = context or zmq.asyncio.Context.instance()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._session = ClientSession(
            SessionConfig(
                settings.app_id, settings.session, settings.heartbeat_ms, settings.outbox_limit
            ),
            self._settle,
            time.monotonic(),
        )
        self._subs: dict[int, AsyncSubscription] = {}
        self._sub_futures: dict[int, asyncio.Future[None]] = {}
        self._confirm_futures: dict[bytes, asyncio.Future[None]] = {}
        self._changed = _Signal()
        self._welcomed: asyncio.Future[None] = self._loop.create_future()
        self._finished: asyncio.Future[None] = self._loop.create_future()
        self._unsent: deque[list[bytes]] = deque()
        self._pump_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._raw: zmq.Socket[bytes] | None = None
        """A plain (non-asyncio) handle of the same DEALER, for sends and drains that
        never wait."""
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatch_queue: asyncio.Queue[list[tuple[AsyncSubscription, Message]] | None] = (
            asyncio.Queue()
        )
        """Batches of deliveries for the handlers, one per `_handle_events` (None: stop)."""
        self._dispatcher: asyncio.Task[None] | None = None
        self._store_client: AsyncStoreClient | None = None
        self._closed = False
        self.failure: BusError | None = None

    @classmethod
    async def connect(
        cls,
        endpoint: str | None = None,
        app_id: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 5.0,
        heartbeat_ms: int | None = None,
        session: str = "main",
        context: zmq.asyncio.Context | None = None,
    ) -> AsyncBus:
        """Connect and say HELLO; arguments default to the PLEXUS_* environment (as
        `Bus.connect`)."""
        settings = connect_settings(endpoint, app_id, token, heartbeat_ms, session)
        bus = cls(settings, context)
        bus._open_socket()
        bus._pump()
        try:
            await asyncio.wait_for(asyncio.shield(bus._welcomed), timeout)
        except TimeoutError:
            await bus._shutdown()
            raise no_welcome(settings.endpoint, timeout) from None
        if bus.failure is not None:
            await bus._shutdown()
            raise bus.failure
        return bus

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        data: Any,
        *,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        sensitive: bool = False,
        confirm: bool = False,
        timeout: float = 5.0,
        to: str | None = None,
    ) -> str:
        """As `Bus.publish`: waits for room in the unconfirmed window, and with
        `confirm=True` for the broker's confirmation (raising its refusal)."""
        self._check_open()
        msg_id, header, payload = encoded_publish(
            topic, data, correlation_id, traceparent, sensitive, to
        )
        while self._session.window_free <= 0:
            self._check_open()
            await self._changed.wait(None)
        future = self._publish(msg_id, header, payload, confirm)
        if future is not None:
            await self._wait(future, timeout, f"confirmation of {topic}")
        return msg_id.hex()

    def publish_nowait(
        self,
        topic: str,
        data: Any,
        *,
        correlation_id: str | None = None,
        traceparent: str | None = None,
        sensitive: bool = False,
        to: str | None = None,
    ) -> str:
        """`publish` without waiting: raises `WouldBlock` (nothing queued) when the
        unconfirmed window is full."""
        self._check_open()
        msg_id, header, payload = encoded_publish(
            topic, data, correlation_id, traceparent, sensitive, to
        )
        if self._session.window_free <= 0:
            raise window_full(
                self._session.unconfirmed, self.settings.outbox_limit, "await publish()"
            )
        self._publish(msg_id, header, payload, False)
        return msg_id.hex()

    def _publish(
        self, msg_id: bytes, header: bytes, payload: bytes, confirm: bool
    ) -> asyncio.Future[None] | None:
        future: asyncio.Future[None] | None = None
        if confirm:
            future = self._loop.create_future()
            self._confirm_futures[msg_id] = future
        self._session.publish(msg_id, header, payload)
        self._kick()
        return future

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is confirmed (`RequestTimeout` after `timeout`)."""
        self._check_open()
        deadline = time.monotonic() + timeout
        while self._session.unconfirmed:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                await self._changed.wait(left)
            except TimeoutError:
                raise still_unconfirmed(self._session.unconfirmed, timeout) from None
            self._check_open()

    @property
    def unconfirmed(self) -> int:
        return self._session.unconfirmed

    @property
    def reconnects(self) -> int:
        return self._session.reconnects

    # -- subscribing and requests -----------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: AsyncHandler | None = None,
        *,
        durable: bool = False,
        manual_ack: bool = False,
        timeout: float = 5.0,
        serve: bool = False,
    ) -> AsyncSubscription:
        """As `Bus.subscribe`; read with `await sub.get()` / `async for`, or pass a
        handler (a function or a coroutine function)."""
        self._check_open()
        checked_pattern(pattern)
        sid = self._session.subscribe(pattern, durable=durable, serve=serve)
        sub = AsyncSubscription(
            sid,
            pattern,
            handler,
            durable=durable,
            manual_ack=manual_ack,
            serve=serve,
            _unsubscribe=self.unsubscribe,
        )
        self._subs[sid] = sub
        future: asyncio.Future[None] = self._loop.create_future()
        self._sub_futures[sid] = future
        if handler is not None and self._dispatcher is None:
            self._dispatcher = self._loop.create_task(self._run_handlers())
        self._kick()
        try:
            await self._wait(future, timeout, f"subscription to {pattern}")
        except BaseException:
            self._forget(sub)
            raise
        return sub

    async def serve(
        self, pattern: str, handler: AsyncHandler, *, timeout: float = 5.0
    ) -> AsyncSubscription:
        """Answer requests on topics matching `pattern`: `handler(message)` returns (or
        its coroutine returns) the reply."""
        return await self.subscribe(pattern, handler, timeout=timeout, serve=True)

    async def unsubscribe(self, sub: AsyncSubscription) -> None:
        """Stop receiving for `sub`; messages already queued stay readable."""
        self._forget(sub)

    def _forget(self, sub: AsyncSubscription) -> None:
        sub.end()
        if self._subs.get(sub.sid) is sub:
            del self._subs[sub.sid]
            self._session.unsubscribe(sub.sid)
            self._kick()

    async def request(
        self,
        topic: str,
        data: Any,
        timeout: float = 5.0,
        *,
        correlation_id: str | None = None,
    ) -> Message:
        """As `Bus.request`: one responder's reply, or NoResponders, RequestTimeout,
        PermissionDenied, DeliveryError (the responder failed)."""
        self._check_open()
        record = request_record(topic, data, timeout, correlation_id)
        future: asyncio.Future[Message] = self._loop.create_future()
        self._session.request(record, time.monotonic() + timeout, future)
        self._kick()
        try:
            message = await future  # the session fails it at its deadline
        except RequestTimeout:
            raise no_reply(topic, timeout) from None
        except asyncio.CancelledError:
            self._session.cancel(future)
            raise
        return checked_reply(message)

    # -- platform calls and the store -------------------------------------------------------

    async def broker_stats(
        self, timeout: float = 5.0, reset_latency: bool = False
    ) -> dict[str, Any]:
        """The broker's STATS (platform identities only)."""
        return await self._call(Stats(reset=reset_latency), timeout)

    async def dead_letters(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self._dlq("list", 0, timeout)

    async def replay_dead_letter(self, entry_id: int, timeout: float = 5.0) -> dict[str, Any]:
        return await self._dlq("replay", entry_id, timeout)

    async def purge_dead_letters(
        self, timeout: float = 5.0, ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        return await self._call(Dlq("purge", ids=None if ids is None else tuple(ids)), timeout)

    async def _dlq(self, op: DlqOp, entry_id: int, timeout: float) -> dict[str, Any]:
        return await self._call(Dlq(op, entry_id), timeout)

    async def _call(self, record: Stats | Dlq, timeout: float) -> dict[str, Any]:
        self._check_open()
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._session.call(record, time.monotonic() + timeout, future)
        self._kick()
        try:
            return await future  # answered by its rid, failed at its deadline
        except asyncio.CancelledError:
            self._session.cancel(future)
            raise

    def _store(self) -> AsyncStoreClient:
        welcome = self._session.welcome
        if welcome is None or welcome.store is None:
            raise persistence_off()
        if self._store_client is None:
            self._store_client = AsyncStoreClient(
                welcome.store, self.settings.app_id, self.settings.token, self._context
            )
        return self._store_client

    async def history(self, topic: str, last: int = 10, *, timeout: float = 5.0) -> list[Message]:
        """As `Bus.history`."""
        self._check_open()
        return await self._store().history(topic, last, timeout)

    def replay(
        self,
        pattern: str,
        since: float | datetime,
        until: float | datetime | None = None,
        *,
        timeout: float = 10.0,
    ) -> AsyncIterator[Message]:
        """As `Bus.replay`, as an async iterator: `async for m in bus.replay(...)`."""
        self._check_open()
        since_ns = to_ns(since)
        assert since_ns is not None
        return self._store().replay(pattern, since_ns, to_ns(until, upper=True), timeout)

    # -- lifecycle --------------------------------------------------------------------------

    async def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, wait until the broker has read it, say BYE, stop."""
        if self._closed:
            return
        self._closed = True
        self._session.close(time.monotonic(), timeout)
        self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), timeout + 1.0)
        except TimeoutError:
            log.warning("closing the session took longer than %.1fs", timeout)
        await self._shutdown()

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        """Stop tasks and the timer, close sockets; the bus is unusable afterwards."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._close_socket()
        if self._dispatcher is not None:
            self._dispatch_queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._dispatcher, 1.0)
            except (TimeoutError, asyncio.CancelledError):
                self._dispatcher.cancel()
        if self._store_client is not None:
            self._store_client.close()
        for sub in self._subs.values():
            sub.end()
        self._changed.fire()

    # -- the driver -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise ClosedError("this AsyncBus is closed", hint="connect a new one")

    async def _wait(self, future: asyncio.Future[Any], timeout: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise no_answer(what, timeout) from None

    def _settle(self, seq: int, error: str | None, requeue: bool) -> None:
        """A Receipt's ack/nack (from the loop, or any thread)."""
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._settle, seq, error, requeue)
            return
        self._session.settle(seq, error, requeue)
        self._kick()

    def _kick(self) -> None:
        """Run `_pump` soon, once however many calls ask in this loop turn."""
        if not self._pump_due:
            self._pump_due = True
            self._loop.call_soon(self._pump)

    def _open_socket(self) -> None:
        dealer: zmq.asyncio.Socket = open_dealer(self._context, self.settings)  # type: ignore[assignment]
        monitor = dealer.get_monitor_socket(_MONITOR_EVENTS)
        dealer.connect(self.settings.endpoint)
        self._dealer = dealer
        self._raw = zmq.Socket.shadow(dealer.underlying)
        self._unsent.clear()
        self._tasks = [
            self._loop.create_task(self._read(dealer)),
            self._loop.create_task(self._watch(dealer, monitor)),
        ]

    def _close_socket(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._dealer is not None:
            self._dealer.disable_monitor()
            self._dealer.close()
        self._dealer = self._raw = None

    async def _read(self, dealer: zmq.asyncio.Socket) -> None:
        """The reader task of one socket: wait for a message, drain what else is there."""
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(dealer.underlying)
        try:
            while True:
                await dealer.poll()  # POLLIN
                receive_available(raw, self._session, time.monotonic())
                self._pump()
        except (asyncio.CancelledError, zmq.ZMQError):
            return

    async def _watch(self, dealer: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """The monitor task of one socket: a failed credential, a new handshake."""
        handshakes = 0
        try:
            while True:
                kind = parse_monitor_message(await monitor.recv_multipart())["event"]
                if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._session.auth_failed(auth_refused(self.settings.app_id))
                elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    handshakes += 1
                    if handshakes > 1:  # transport came back: maybe a new broker
                        self._unsent.clear()
                        self._session.connection_made(time.monotonic())
                self._pump()
        except (asyncio.CancelledError, zmq.ZMQError):
            return
        finally:
            monitor.close(linger=0)

    def _pump(self) -> None:
        """Send what the session has, act on its events, re-arm the timer."""
        self._pump_due = False
        session, raw = self._session, self._raw
        if raw is None:
            return
        for _ in range(_PUMP_ROUNDS):
            self._unsent.extend(session.outgoing(time.monotonic()))
            self._send_unsent()
            if self._handle_events():
                self._close_socket()
                self._open_socket()
                session.connection_made(time.monotonic())
                self._kick()
                break
            # The socket's fd signals edges, and our sends may have consumed the one of a
            # message that arrived meanwhile: the reader would never wake for it. Look.
            if not int(raw.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                break
            receive_available(raw, session, time.monotonic())
        else:
            self._kick()  # still more to read: later in this loop turn, after others
        if session.finished:
            if not self._finished.done():
                self._finished.set_result(None)
            if not self._welcomed.done():
                self._welcomed.set_result(None)
            return
        self._arm_timer()

    def _arm_timer(self) -> None:
        delay = self._session.next_deadline() - time.monotonic()
        if self._unsent:
            delay = min(delay, _RETRY_SEND_S)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, delay), self._pump)

    def _send_unsent(self) -> None:
        assert self._raw is not None
        send_in_order(self._raw, self._unsent)

    def _handle_events(self) -> bool:  # noqa: PLR0912 - one branch per event kind
        """Act on the session's events; True when the transport must be replaced."""
        replace = False
        messages: list[Message] = []
        for event in self._session.take_events():
            if type(event) is Message:
                messages.append(event)
            elif isinstance(event, Confirmed):
                futures = self._confirm_futures
                for msg_id in event.ids if futures else ():
                    _resolve(futures.pop(msg_id, None), None)
                self._changed.fire()
            elif isinstance(event, PublishRefused):
                future = self._confirm_futures.pop(event.msg_id, None)
                if future is not None:
                    _reject(future, event.error)
                else:
                    self._report(event.error)
                self._changed.fire()
            elif isinstance(event, Replied):
                _resolve(event.token, event.message)
            elif isinstance(event, Answered):
                _resolve(event.token, event.data)
            elif isinstance(event, RequestFailed | CallFailed):
                _reject(event.token, event.error)
            elif isinstance(event, Subscribed):
                _resolve(self._sub_futures.pop(event.sid, None), None)
            elif isinstance(event, SubscribeFailed):
                sub = self._subs.pop(event.sid, None)
                if sub is not None:
                    sub.end()
                _reject(self._sub_futures.pop(event.sid, None), event.error)
            elif isinstance(event, Welcomed):
                if not self._welcomed.done():
                    self._welcomed.set_result(None)
            elif isinstance(event, ErrorReported):
                self._report(event.error)
            elif isinstance(event, ReconnectNeeded):
                replace = True
            elif isinstance(event, Failed):
                self._failed(event.error)
        if messages:
            hand_over(messages, self._subs, self._dispatch_queue.put_nowait)
        return replace

    def _report(self, error: BusError) -> None:
        log.warning("broker reported: %s", error)
        self.errors.put_nowait(error)

    def _failed(self, error: BusError) -> None:
        self.failure = error
        for future in [*self._sub_futures.values(), *self._confirm_futures.values()]:
            _reject(future, error)
        self._sub_futures.clear()
        self._confirm_futures.clear()
        self._changed.fire()

    async def _run_handlers(self) -> None:
        """The dispatcher task: each handler call in delivery order, one message at a
        time, ack or nack after (a handler that raises leaves the rest of its batch be)."""
        while True:
            batch = await self._dispatch_queue.get()
            if batch is None:
                return
            for sub, message in batch:
                if not sub.active or sub.handler is None:
                    continue
                try:
                    result = sub.handler(message)
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:
                    log.exception("handler for %s raised on message %s", sub.pattern, message.id)
                    if sub.serve:  # the failure is the answer
                        self._answer(message, None, f"{type(exc).__name__}: {exc}")
                        message.ack()
                    else:
                        message.nack(f"{type(exc).__name__}: {exc}")
                    continue
                if sub.serve:
                    self._answer(message, result, None)
                if not sub.manual_ack:
                    message.ack()

    def _answer(self, request: Message, result: Any, error: str | None) -> None:
        if self._closed or self.failure is not None:
            return
        self._session.reply(reply_record(request, result, error))
        self._kick()


def _resolve(future: Any, value: object) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _reject(future: Any, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
