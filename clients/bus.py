"""The Python client of the Plexus bus: `Bus.connect()`, publish, subscribe, close.

    from clients.bus import Bus
    with Bus.connect() as bus:                  # identity and endpoint from the environment
        sub = bus.subscribe("market.*.prices")
        bus.publish("market.AAPL.prices", {"px": 187.2})
        msg = sub.get(timeout=1.0)

Identity comes from `PLEXUS_APP_ID` and a credential handed over by the supervisor on an
inherited file descriptor (`PLEXUS_CREDENTIAL_FD`) or printed by `plexus env`
(`PLEXUS_TOKEN`); the endpoint from `PLEXUS_ENDPOINT`. All socket work happens in one
background I/O thread (`clients.connection`); handlers run in one dispatcher thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from types import TracebackType
from typing import Any

from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from broker.errors import Code, WireError
from broker.topics import pattern_tokens, validate_topic
from clients.connection import Connection, ConnectSettings
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
)
from clients.message import Handler, Message, Subscription
from clients.store import StoreClient, persistence_off, to_ns
from security import handoff

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
]

log = logging.getLogger("plexus.client")


def credential_from_environment() -> str:
    """This app's credential (`security.handoff`), failures as the client's error."""
    try:
        return handoff.credential_from_environment()
    except handoff.HandoffError as exc:
        raise AuthenticationError(str(exc), hint=exc.hint) from None


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise BrokerUnavailable(
            f"{name} is not set", hint="launch the app through `plexus run` or `plexus env APP_ID`"
        )
    return value


def _checked(check: Callable[[str], object], text: str) -> None:
    """Run a topic or pattern check locally; its failure as the client's ProtocolError."""
    try:
        check(text)
    except WireError as exc:
        raise ProtocolError(exc.detail, int(exc.code)) from None


class Bus:
    """A connection of one app to the bus. Thread-safe; use one per process."""

    def __init__(self, settings: ConnectSettings) -> None:
        self.app_id = settings.app_id
        self._subs: dict[int, Subscription] = {}
        self._sids = itertools.count(1)
        self._lock = threading.Lock()
        self._dispatch_queue: queue.SimpleQueue[tuple[Subscription, Message] | None] = (
            queue.SimpleQueue()
        )
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
        settings = ConnectSettings(
            endpoint=endpoint or _required_env("PLEXUS_ENDPOINT"),
            app_id=app_id or _required_env("PLEXUS_APP_ID"),
            token=token or credential_from_environment(),
            heartbeat_ms=heartbeat_ms,
            session=session,
        )
        bus = cls(settings)
        bus._io.start()
        if not bus._io.welcomed.wait(timeout):
            bus._io.stop(0.1)
            raise BrokerUnavailable(
                f"no WELCOME from {settings.endpoint} within {timeout:g}s",
                hint="check `plexus status`; is the platform running with this --home?",
            )
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
        _checked(validate_topic, topic)
        msg_id = new_message_id()
        header = encode_pub_header(
            msg_id,
            topic,
            correlation_id,
            traceparent,
            sensitive,
            confirm=True,
            extra={"dest": to} if to is not None else None,
        )
        payload = pack(data)
        if len(payload) > P.MAX_PAYLOAD_BYTES or len(header) > P.MAX_HEADER_BYTES:
            raise ProtocolError(
                f"message of {len(payload)} bytes (header {len(header)}) exceeds the limits",
                int(Code.TOO_LARGE),
                f"keep payloads ≤ {P.MAX_PAYLOAD_BYTES} bytes; store big data elsewhere",
            )
        future: Future[None] | None = None
        if confirm:
            future = Future()
            self._io.confirm_futures[msg_id] = future
        self._io.enqueue_publish(msg_id, header, payload)
        if future is not None:
            self._wait(future, timeout, f"confirmation of {topic}")
        return msg_id.hex()

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every publish so far is confirmed: stored and synced with persistence
        on, routed with it off (failures go to `errors` as they happen).

        Raises `RequestTimeout` if some are still unconfirmed after `timeout` (they stay
        queued and are resent after a reconnect; nothing is dropped).
        """
        self._check_open()
        if not self._io.wait_confirmed(timeout):
            raise RequestTimeout(
                f"{len(self._io.unconfirmed)} publishes still unconfirmed after {timeout:g}s",
                hint="check `plexus status`: is the broker (and persistence) running?",
            )

    @property
    def unconfirmed(self) -> int:
        """Publishes sent but not yet confirmed (kept for resending after a reconnect)."""
        return len(self._io.unconfirmed)

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
        _checked(pattern_tokens, pattern)
        with self._lock:
            sid = self._claim_sid(pattern)
            sub = Subscription(
                sid,
                pattern,
                handler,
                durable=durable,
                manual_ack=manual_ack,
                serve=serve,
                _unsubscribe=self.unsubscribe,
            )
            future: Future[None] = Future()
            self._io.sub_futures[sid] = future
            self._subs[sid] = sub
        if handler is not None:
            self._ensure_dispatcher()
        self._io.wake()
        try:
            self._wait(future, timeout, f"subscription to {pattern}")
        except BaseException:
            self._subs.pop(sid, None)
            sub.active = False
            raise
        return sub

    def _claim_sid(self, pattern: str) -> int:
        """A resumed session's subscription to the same pattern is taken over (with what
        the broker kept for it); otherwise the next id no subscription uses."""
        for sid, kept in list(self._io.resumed_subs.items()):
            if kept == pattern and sid not in self._subs:
                return sid
        sid = next(self._sids)
        while sid in self._subs or sid in self._io.resumed_subs:
            sid = next(self._sids)
        return sid

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
        _checked(validate_topic, topic)
        msg_id = new_message_id()
        reply = secrets.token_hex(16)
        header = encode_pub_header(
            msg_id,
            topic,
            correlation_id,
            extra={"reply": reply, "ttl_ms": max(1, int(timeout * 1000))},
        )
        future: Future[Message] = Future()
        self._io.request_futures[reply] = future
        self._io.request_ids[msg_id] = reply
        self._io.send_control([P.REQ, header, pack(data)])
        try:
            message = future.result(timeout)
        except FutureTimeout:
            raise RequestTimeout(
                f"no reply to {topic} within {timeout:g}s",
                hint="the responder may be slow or stuck; raise the timeout or check it",
            ) from None
        finally:
            self._io.request_futures.pop(reply, None)
            self._io.request_ids.pop(msg_id, None)
        if message.envelope.error is not None:
            raise DeliveryError(
                f"the responder {message.sender!r} failed: {message.envelope.error}",
                hint="see the responder's log",
            )
        return message

    def _answer(self, request: Message, result: Any, error: str | None) -> None:
        """Send a responder's REP for `request` (dispatcher thread)."""
        extra: dict[str, Any] = {"to": request.envelope.reply_to or ""}
        if error is not None:
            extra["err"] = error[:1024]
        header = encode_pub_header(
            new_message_id(), request.topic, request.correlation_id, extra=extra
        )
        self._io.send_control([P.REP, header, pack(result)])

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop receiving for `sub`; messages already queued stay readable."""
        sub.active = False
        self._subs.pop(sub.sid, None)
        if not self._closed:
            self._io.wake()

    # -- platform ---------------------------------------------------------------------------

    # -- history and replay (the persistence service) ------------------------------------

    def _store(self) -> StoreClient:
        endpoint = self._io.welcome.get("store")
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
        self._check_open()
        future = self._io.request_stats(reset_latency)
        stats: dict[str, Any] = self._wait(future, timeout, "broker stats")
        stats.pop("rid", None)  # the request id is the protocol's, not part of the answer
        return stats

    def dead_letters(self, timeout: float = 5.0) -> dict[str, Any]:
        """The dead-letter queue: {"entries": [...], "dropped": n} (platform identities)."""
        return self._dlq({"op": "list"}, timeout)

    def replay_dead_letter(self, entry_id: int, timeout: float = 5.0) -> dict[str, Any]:
        """Deliver dead letter `entry_id` again (to its session if it still exists)."""
        return self._dlq({"op": "replay", "id": entry_id}, timeout)

    def purge_dead_letters(self, timeout: float = 5.0) -> dict[str, Any]:
        """Drop every dead letter; returns {"purged": n}."""
        return self._dlq({"op": "purge"}, timeout)

    def _dlq(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._check_open()
        answer: dict[str, Any] = self._wait(self._io.request_dlq(request), timeout, "DLQ")
        answer.pop("rid", None)  # the request id is the protocol's, not part of the answer
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
            raise BrokerUnavailable(
                f"no answer for {what} within {timeout:g}s",
                hint="the broker may be down or overloaded; check `plexus status`",
            ) from None

    def _dispatch(self, sub: Subscription, message: Message) -> None:
        self._dispatch_queue.put((sub, message))

    def _ensure_dispatcher(self) -> None:
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._run_handlers, name=f"plexus-handlers-{self.app_id}", daemon=True
                )
                self._dispatcher.start()

    def _run_handlers(self) -> None:
        while True:
            item = self._dispatch_queue.get()
            if item is None:
                return
            sub, message = item
            if not sub.active or sub.handler is None:
                continue
            try:
                result = sub.handler(message)
            except Exception as exc:
                log.exception("handler for %s raised on message %s", sub.pattern, message.id)
                if sub.serve:  # the failure is the answer; retrying a request is the caller's call
                    self._answer(message, None, f"{type(exc).__name__}: {exc}")
                    message.ack()
                else:
                    message.nack(f"{type(exc).__name__}: {exc}")
                continue
            if sub.serve:
                self._answer(message, result, None)
            if not sub.manual_ack:
                message.ack()

    def _report_error(self, error: BusError) -> None:
        log.warning("broker reported: %s", error)
        self.errors.put(error)
