"""The Python client of the Plexus bus: `Bus.connect()`, publish, subscribe, close.

    from clients.bus import Bus
    with Bus.connect() as bus:                  # identity and endpoint from the environment
        sub = bus.subscribe("market.*.prices")
        bus.publish("market.AAPL.prices", {"px": 187.2})
        msg = sub.get(timeout=1.0)

Identity comes from `PLEXUS_APP_ID` and a credential handed over by the supervisor on an
inherited file descriptor (`PLEXUS_CREDENTIAL_FD`) or printed by `plexus env`
(`PLEXUS_TOKEN`); the endpoint from `PLEXUS_ENDPOINT`. The protocol is the sans-I/O
core `clients.session`; all socket work happens in one background I/O thread that drives
it (`clients.connection`); handlers run in one dispatcher thread. `clients.aio.AsyncBus`
offers the same calls as coroutines.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from types import TracebackType
from typing import Any

from broker.wire import Dlq, DlqOp, Stats
from clients.connection import Connection, ConnectSettings
from clients.driving import (
    connect_settings,
    no_answer,
    no_reply,
    no_welcome,
    still_unconfirmed,
)
from clients.errors import (
    AuthenticationError,
    BrokerUnavailable,
    BusError,
    ClosedError,
    DeliveryError,
    InternalError,
    NoResponders,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    StorageError,
    WouldBlock,
)
from clients.message import Handler, Message, Subscription
from clients.outbound import (
    checked_pattern,
    checked_reply,
    encoded_publish,
    reply_record,
    request_record,
)
from clients.store import StoreClient, persistence_off, to_ns

__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "Bus",
    "BusError",
    "ClosedError",
    "DeliveryError",
    "InternalError",
    "Message",
    "NoResponders",
    "PermissionDenied",
    "ProtocolError",
    "RequestTimeout",
    "StorageError",
    "Subscription",
    "WouldBlock",
]

log = logging.getLogger("plexus.client")

_WATCHDOG_S = 2.0
"""How much longer than its timeout a caller waits for the I/O thread to expire a call."""


class Bus:
    """A connection of one app to the bus. Thread-safe; use one per process."""

    def __init__(self, settings: ConnectSettings) -> None:
        self.app_id = settings.app_id
        self._subs: dict[int, Subscription] = {}
        self._lock = threading.Lock()
        self._dispatch_queue: queue.SimpleQueue[list[tuple[Subscription, Message]] | None] = (
            queue.SimpleQueue()
        )
        """Batches of deliveries for the handlers, one per I/O loop turn (None: stop)."""
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        self.errors: queue.SimpleQueue[BusError] = queue.SimpleQueue()
        self._io = Connection(settings, self._subs, self._dispatch, self._report_error)
        self._store_client: StoreClient | None = None

    @classmethod
    def connect(
        cls,
        endpoint: str | None = None,
        app_id: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 5.0,
        heartbeat_ms: int | None = None,
        session: str = "main",
    ) -> Bus:
        """Connect and say HELLO; arguments default to the PLEXUS_* environment.

        `session` names this connection's session: reconnecting with the same name (also
        from a new process, within the grace period) resumes its subscriptions and gets
        what was queued meanwhile. Two live connections must use different names.
        """
        settings = connect_settings(endpoint, app_id, token, heartbeat_ms, session)
        bus = cls(settings)
        bus._io.start()
        if not bus._io.welcomed.wait(timeout):
            bus._io.stop(0.1)
            raise no_welcome(settings.endpoint, timeout)
        if bus._io.failure is not None:
            bus._io.stop(0.1)
            raise bus._io.failure
        return bus

    # -- publishing -------------------------------------------------------------------------

    def publish(
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
        """Publish `data` (anything msgpack can encode) on `topic`; returns the message id.

        Every publish is kept until the broker confirms it and is resent after a reconnect
        (the broker drops duplicates by message id). With `confirm=True` this call waits
        for that confirmation and raises the broker's error (e.g. `PermissionDenied`).
        With `to="app-id"` it is a direct send: only that app's subscriptions matching
        `topic` receive it.
        """
        self._check_open()
        msg_id, header, payload = encoded_publish(
            topic, data, correlation_id, traceparent, sensitive, to
        )
        future: Future[None] | None = Future() if confirm else None
        self._io.enqueue_publish(msg_id, header, payload, future)
        if future is not None:
            self._wait(future, timeout, f"confirmation of {topic}")
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
        """`publish` without waiting: raises `WouldBlock` (nothing queued) when the window
        of unconfirmed publishes is full, where `publish` would wait for room."""
        self._check_open()
        msg_id, header, payload = encoded_publish(
            topic, data, correlation_id, traceparent, sensitive, to
        )
        self._io.enqueue_publish(msg_id, header, payload, None, block=False)
        return msg_id.hex()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is confirmed: stored and synced with persistence
        on, routed with it off (failures go to `errors` as they happen).

        Raises `RequestTimeout` if some are still unconfirmed after `timeout` (they stay
        queued and are resent after a reconnect; nothing is dropped).
        """
        self._check_open()
        if not self._io.wait_confirmed(timeout):
            raise still_unconfirmed(self._io.unconfirmed, timeout)

    @property
    def unconfirmed(self) -> int:
        """Publishes sent but not yet confirmed (kept for resending after a reconnect)."""
        return self._io.unconfirmed

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        durable: bool = False,
        manual_ack: bool = False,
        timeout: float = 5.0,
        serve: bool = False,
    ) -> Subscription:
        """Receive messages matching `pattern`; waits until the broker accepted it.

        Without `handler`, read with `sub.get(timeout)` (which acks what it returns unless
        `manual_ack`); with one, it is called for each message in the bus's dispatcher
        thread and the message is acked when it returns, nacked (retried) when it raises.
        A `durable` subscription outlives the session's grace period until unsubscribed.
        """
        self._check_open()
        checked_pattern(pattern)
        sub = Subscription(
            0,  # the session picks the sid (a resumed one for the same pattern, if any)
            pattern,
            handler,
            durable=durable,
            manual_ack=manual_ack,
            serve=serve,
            _unsubscribe=self.unsubscribe,
        )
        future: Future[None] = Future()
        if handler is not None:
            self._ensure_dispatcher()
        self._io.add_subscription(sub, future)
        try:
            self._wait(future, timeout, f"subscription to {pattern}")
        except BaseException:
            sub.active = False
            self._io.remove_subscription(sub)
            raise
        return sub

    def serve(self, pattern: str, handler: Handler, *, timeout: float = 5.0) -> Subscription:
        """Answer requests on topics matching `pattern`: `handler(message)` returns the reply.

        Each request goes to one serving subscription (round robin among the apps serving
        it). If the handler raises, the requester gets a `DeliveryError` with the reason.
        """
        return self.subscribe(pattern, handler, timeout=timeout, serve=True)

    def request(
        self,
        topic: str,
        data: Any,
        timeout: float = 5.0,
        *,
        correlation_id: str | None = None,
    ) -> Message:
        """Send a request to one app serving `topic` and wait for its reply.

        Raises `NoResponders` at once when nobody serves `topic`, `RequestTimeout` when no
        reply came within `timeout`, `PermissionDenied` outside the manifest's `request`.
        """
        self._check_open()
        record = request_record(topic, data, timeout, correlation_id)
        future: Future[Message] = Future()
        self._io.request(record, time.monotonic() + timeout, future)
        try:  # the session expires the request at its deadline; this is a watchdog
            message = future.result(timeout + _WATCHDOG_S)
        except FutureTimeout:
            self._io.cancel(future)
            raise no_reply(topic, timeout) from None
        except RequestTimeout:
            raise no_reply(topic, timeout) from None
        return checked_reply(message)

    def _answer(self, request: Message, result: Any, error: str | None) -> None:
        """Send a responder's REP for `request` (dispatcher thread)."""
        self._io.reply(reply_record(request, result, error))

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop receiving for `sub`; messages already queued stay readable."""
        sub.active = False
        if not self._closed:
            self._io.remove_subscription(sub)

    # -- platform ---------------------------------------------------------------------------

    # -- history and replay (the persistence service) ------------------------------------

    def _store(self) -> StoreClient:
        endpoint = self._io.welcome_store
        if not isinstance(endpoint, str):
            raise persistence_off()
        with self._lock:
            if self._store_client is None:
                settings = self._io.settings
                self._store_client = StoreClient(endpoint, settings.app_id, settings.token)
            return self._store_client

    def history(self, topic: str, last: int = 10, *, timeout: float = 5.0) -> list[Message]:
        """The last `last` stored messages of `topic`, oldest first.

        Needs subscribe permission for `topic`; sensitive payloads come back decrypted.
        Raises `StorageError` (501) when the platform runs without persistence.
        """
        self._check_open()
        return self._store().history(topic, last, timeout)

    def replay(
        self,
        pattern: str,
        since: float | datetime,
        until: float | datetime | None = None,
        *,
        timeout: float = 10.0,
    ) -> Iterator[Message]:
        """Stored messages matching `pattern` (wildcards allowed) with broker timestamp
        >= `since` (and <= `until`), in publish order, fetched page by page as you iterate.

        `since`/`until` are seconds since the epoch or aware datetimes.
        """
        self._check_open()
        since_ns = to_ns(since)
        assert since_ns is not None
        return self._store().replay(pattern, since_ns, to_ns(until, upper=True), timeout)

    def broker_stats(self, timeout: float = 5.0, reset_latency: bool = False) -> dict[str, Any]:
        """The broker's STATS (platform identities only, e.g. the CLI).

        `reset_latency=True` starts a fresh routing-latency window after this snapshot
        (benchmarks measure one phase at a time).
        """
        return self._call(Stats(reset=reset_latency), timeout, "broker stats")

    def dead_letters(self, timeout: float = 5.0) -> dict[str, Any]:
        """The dead-letter queue: {"entries": [...], "dropped": n} (platform identities)."""
        return self._dlq("list", 0, timeout)

    def replay_dead_letter(self, entry_id: int, timeout: float = 5.0) -> dict[str, Any]:
        """Deliver dead letter `entry_id` again (to its session if it still exists)."""
        return self._dlq("replay", entry_id, timeout)

    def purge_dead_letters(
        self, timeout: float = 5.0, ids: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Drop the dead letters `ids` names (every one when None); returns {"purged": n}."""
        return self._call(Dlq("purge", ids=None if ids is None else tuple(ids)), timeout, "DLQ")

    def _dlq(self, op: DlqOp, entry_id: int, timeout: float) -> dict[str, Any]:
        return self._call(Dlq(op, entry_id), timeout, "DLQ")

    def _call(self, record: Stats | Dlq, timeout: float, what: str) -> dict[str, Any]:
        """One STATS/DLQ call, answered by its own `rid` however many run at once."""
        self._check_open()
        future = self._io.call(record, time.monotonic() + timeout)
        try:  # the session expires the call at its deadline; this is a watchdog
            answer: dict[str, Any] = future.result(timeout + _WATCHDOG_S)
        except FutureTimeout:
            self._io.cancel(future)
            raise no_answer(what, timeout) from None
        return answer

    @property
    def reconnects(self) -> int:
        return self._io.reconnects

    # -- lifecycle --------------------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued, wait until the broker has read it, say BYE, stop threads."""
        if self._closed:
            return
        self._closed = True
        self._io.stop(timeout)
        if self._store_client is not None:
            self._store_client.close()
        if self._dispatcher is not None:
            self._dispatch_queue.put(None)
            self._dispatcher.join(timeout)
        for sub in self._subs.values():
            sub.active = False

    def __enter__(self) -> Bus:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Bus is closed", hint="create a new one with Bus.connect()")
        if self._io.failure is not None:
            raise self._io.failure

    def _wait(self, future: Future[Any], timeout: float, what: str) -> Any:
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise no_answer(what, timeout) from None

    def _dispatch(self, batch: list[tuple[Subscription, Message]]) -> None:
        """I/O thread: one turn's handler deliveries, one put (one wake-up at most)."""
        self._dispatch_queue.put(batch)

    def _ensure_dispatcher(self) -> None:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._run_handlers, name=f"plexus-handlers-{self.app_id}", daemon=True
                )
                self._dispatcher.start()

    def _run_handlers(self) -> None:
        """The dispatcher thread: each handler call in delivery order, one message at a
        time, acked when it returns, nacked when it raises (the rest of its batch goes on)."""
        while True:
            batch = self._dispatch_queue.get()
            if batch is None:
                return
            for sub, message in batch:
                if sub.active and sub.handler is not None:
                    self._run_handler(sub, sub.handler, message)

    def _run_handler(self, sub: Subscription, handler: Handler, message: Message) -> None:
        try:
            result = handler(message)
        except Exception as exc:
            log.exception("handler for %s raised on message %s", sub.pattern, message.id)
            if sub.serve:  # the failure is the answer; retrying a request is the caller's call
                self._answer(message, None, f"{type(exc).__name__}: {exc}")
                message.ack()
            else:
                message.nack(f"{type(exc).__name__}: {exc}")
            return
        if sub.serve:
            self._answer(message, result, None)
        if not sub.manual_ack:
            message.ack()

    def _report_error(self, error: BusError) -> None:
        log.warning("broker reported: %s", error)
        self.errors.put(error)
