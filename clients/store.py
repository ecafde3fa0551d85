"""History and replay for apps: the client of the persistence query socket (§15).

The broker's WELCOME names the socket (`store`; None when the platform runs with
--no-persistence, which makes every query raise `StorageError` code 501). The client
connects a DEALER lazily, with the app's own credential. The socket's answers carry no
request id and come in request order, so queries are serialised (a lock here, an
asyncio lock in `clients.aio_store`) and the socket is dropped after a timeout: a late
answer must never be taken for the next request's. Replay pages through the range
(`broker.wire.PAGE_MESSAGES` per page), so a replay of millions of messages holds one
page at a time. Requests and answers are the wire records History, Replay and Result.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Final

import zmq

from broker import protocol as P
from broker.codec import Stamp
from broker.errors import Code, error_body
from broker.wire import Error as ErrorRecord
from broker.wire import History, Replay, Result, StoredRow
from clients.errors import BrokerUnavailable, BusError, error_from_record, error_from_wire
from clients.message import Message, envelope_of
from security.credentials import Credential

Query = History | Replay


def persistence_off() -> BusError:
    return error_from_wire(
        error_body(Code.PERSISTENCE_OFF, "history and replay need persistence, which is off")
    )


def no_answer(timeout: float) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"no answer from the persistence service within {timeout:g}s",
        hint="check `plexus status`: is persistence running?",
    )


def decoded_answer(frames: list[bytes]) -> Result:
    """A RESULT page, or the ERROR it is as the client's exception."""
    if frames and frames[0] == P.ERROR:
        raise error_from_record(ErrorRecord.decode(frames))
    return Result.decode(frames)


def query_socket(context: zmq.Context[Any], endpoint: str, app_id: str, token: str) -> Any:
    """A DEALER to the query socket with the app's credential (same class as `context`'s)."""
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    Credential.parse(token).connect_to_store(sock)
    sock.connect(endpoint)
    return sock


class StoreClient:
    """One app's connection to the query socket (blocking; thread-safe)."""

    def __init__(self, endpoint: str, app_id: str, token: str) -> None:
        self._endpoint = endpoint
        self._app_id = app_id
        self._token = token
        self._lock = threading.Lock()
        self._socket: zmq.Socket[bytes] | None = None

    def query(self, request: Query, timeout: float) -> Result:
        """One request and its answer."""
        with self._lock:
            if self._socket is None:
                self._socket = query_socket(
                    zmq.Context.instance(), self._endpoint, self._app_id, self._token
                )
            sock = self._socket
            sock.send_multipart(request.frames())
            if not sock.poll(int(timeout * 1000)):
                sock.close(linger=0)
                self._socket = None
                raise no_answer(timeout)
            frames = sock.recv_multipart()
        return decoded_answer(frames)

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    def history(self, topic: str, last: int, timeout: float) -> list[Message]:
        return [stored_message(row) for row in self.query(History(topic, last), timeout).messages]

    def replay(
        self, pattern: str, since_ns: int, until_ns: int | None, timeout: float
    ) -> Iterator[Message]:
        after = 0
        while True:
            page = self.query(Replay(pattern, since_ns, until_ns, after), timeout)
            for row in page.messages:
                yield stored_message(row)
            after = page.after or after
            if page.done:
                return


def stored_message(row: StoredRow) -> Message:
    """A `Message` from a stored row [seq, ts_ns, sender, header, payload]."""
    seq, ts_ns, sender, header, payload = row
    return Message(envelope_of(Stamp(seq, sender, ts_ns, 1), header, payload), 0)


_INT64_MAX: Final = 2**63 - 1
LATEST_MOMENT_S: Final = _INT64_MAX / 1e9
"""The store keeps broker time as int64 nanoseconds: nothing later than 2262-04-11."""
_LATEST_S: Final = LATEST_MOMENT_S - 1e-3
"""A bound within a millisecond of the end is taken as the end."""


def to_ns(moment: float | datetime | None, upper: bool = False) -> int | None:
    """A moment (seconds since the epoch, or a datetime) in ns; None stays None.

    A float carries only about 0.24 µs of precision at today's epoch, so a bound is
    widened by one microsecond (down for `since`, up for `until`): passing a message's own
    `timestamp` back as a bound always includes that message. Epoch 0 ("from the
    start") stays 0: the widening never takes a bound below the epoch.
    """
    if moment is None:
        return None
    if isinstance(moment, datetime):
        moment = moment.timestamp()
    name = "until" if upper else "since"
    if math.isnan(moment):
        raise ValueError(f"{name} is NaN, not a moment")
    if moment >= _LATEST_S:
        if upper:  # later than anything the store can hold: no upper bound at all
            return _INT64_MAX
        raise ValueError(f"{name}={moment!r} is after 2262-04-11, the latest time the store holds")
    micros = moment * 1e6
    return (math.ceil(micros) + 1) * 1000 if upper else max(0, (math.floor(micros) - 1) * 1000)
