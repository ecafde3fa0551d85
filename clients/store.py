"""History and replay for apps: a synchronous client of the persistence query socket.

The broker's WELCOME names the socket (`store`; None when the platform runs with
--no-persistence, which makes every query raise `StorageError` code 501). The client
connects a DEALER lazily, with the app's own credential, and serialises queries with a
lock: zmq sockets are not thread-safe and queries are rare next to publishes. Replay
pages through the range (broker.wire), so a replay of millions of messages holds
one page at a time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import zmq

from broker import protocol as P
from broker import wire as Q
from broker.codec import decode_envelope, encode_stamp, pack, unpack_map
from broker.errors import Code, error_body
from clients.errors import BrokerUnavailable, BusError, error_from_wire
from clients.message import Message


def persistence_off() -> BusError:
    return error_from_wire(
        error_body(Code.PERSISTENCE_OFF, "history and replay need persistence, which is off")
    )


class StoreClient:
    """One app's connection to the query socket."""

    def __init__(self, endpoint: str, app_id: str, token: str) -> None:
        self._endpoint = endpoint
        self._app_id = app_id
        self._token = token
        self._lock = threading.Lock()
        self._socket: zmq.Socket[bytes] | None = None

    def _connected(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.plain_username = self._app_id.encode()
            sock.plain_password = self._token.encode()
            sock.connect(self._endpoint)
            self._socket = sock
        return self._socket

    def query(self, command: bytes, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request and its answer; the socket is dropped after a timeout (a late
        answer must never be taken for the next request's)."""
        with self._lock:
            sock = self._connected()
            sock.send_multipart([command, pack(body)])
            if not sock.poll(int(timeout * 1000)):
                sock.close(linger=0)
                self._socket = None
                raise BrokerUnavailable(
                    f"no answer from the persistence service within {timeout:g}s",
                    hint="check `plexus status`: is persistence running?",
                )
            frames = sock.recv_multipart()
        answer = unpack_map(frames[1], "store answer", P.MAX_REPLY_BYTES * 2)
        if frames[0] == P.ERROR:
            raise error_from_wire(answer)
        return answer

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    def history(self, topic: str, last: int, timeout: float) -> list[Message]:
        answer = self.query(Q.HISTORY, {"topic": topic, "last": last}, timeout)
        return [stored_message(row) for row in answer.get("messages", [])]

    def replay(
        self, pattern: str, since_ns: int, until_ns: int | None, timeout: float
    ) -> Iterator[Message]:
        after = 0
        while True:
            body: dict[str, Any] = {"pattern": pattern, "since": since_ns, "after": after}
            if until_ns is not None:
                body["until"] = until_ns
            answer = self.query(Q.REPLAY, body, timeout)
            for row in answer.get("messages", []):
                yield stored_message(row)
            after = int(answer.get("after", after))
            if answer.get("done", True):
                return


def stored_message(row: list[Any]) -> Message:
    """A `Message` from a stored row [seq, ts_ns, sender, header, payload]."""
    seq, ts_ns, sender, header, payload = row
    return Message(decode_envelope(encode_stamp(seq, sender, ts_ns), header, payload), 0)


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
    micros = moment * 1e6
    return (math.ceil(micros) + 1) * 1000 if upper else max(0, (math.floor(micros) - 1) * 1000)
