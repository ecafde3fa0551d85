"""The persistence service's two connections to the broker: its event stream and its link.

`EventFeed` turns PUB batches (and EVDATA re-sends) into a contiguous run of events after
the service's watermark: anything already seen is skipped, and a gap (PUB/SUB dropped a
batch, or the service joined late) asks the broker for the missing range instead of
being skipped.

`BrokerLink` is a DEALER authenticated as `$persistence`: HELLO, then EVSYNC with the
stored watermark (a recovering broker rebuilds from the store at that moment), then
EVACK after every group commit and EVFETCH for gaps. An ERROR "send HELLO first" means
the broker restarted: the link says HELLO and EVSYNC again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from broker import events as E
from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack, unpack_map
from broker.errors import Code, ProtocolViolation
from broker.logs import event

log = logging.getLogger("plexus.persistence")

_FETCH_RETRY_NS = 500_000_000
_HELLO_RETRY_NS = 1_000_000_000


@dataclass(slots=True)
class EventFeed:
    """Ordering and gap detection over event batches."""

    received: int
    """Highest seq taken (committed or pending)."""
    fetching_from: int = 0
    fetch_sent_ns: int = 0
    gaps: int = 0

    def take(self, first_seq: int, blob: bytes) -> tuple[list[E.Event], int | None]:
        """(new contiguous events, seq to fetch from when a gap was found)."""
        fresh: list[E.Event] = []
        if first_seq > self.received + 1:
            return fresh, self._gap()
        for item in E.decode_events(blob):
            if item.seq <= self.received:
                continue
            if item.seq != self.received + 1:
                return fresh, self._gap()
            fresh.append(item)
            self.received = item.seq
        if self.fetching_from and self.received >= self.fetching_from:
            self.fetching_from = 0
        return fresh, None

    def _gap(self) -> int:
        self.gaps += 1
        return self.received + 1


class BrokerLink:
    """The DEALER to the broker, as `$persistence`."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        token: str,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        sock.linger = 0
        sock.plain_username = P.PERSISTENCE_ID.encode()
        sock.plain_password = token.encode()
        sock.sndhwm = 0
        sock.connect(endpoint)
        self.socket = sock
        self._clock = clock
        self.synced = False
        self.welcomed = False
        self.epoch = 0
        self._hello_sent_ns = -_HELLO_RETRY_NS
        self._last_sent_ns = 0

    def close(self) -> None:
        self.socket.close(linger=0)

    def _send(self, command: bytes, body: dict[str, Any]) -> None:
        self.socket.send_multipart([command, pack(body)])
        self._last_sent_ns = self._clock()

    def hello(self) -> None:
        """(Re)start the handshake, at most once a second while unanswered."""
        now = self._clock()
        if now - self._hello_sent_ns < _HELLO_RETRY_NS:
            return
        self._hello_sent_ns = now
        self.welcomed = self.synced = False
        self._send(P.HELLO, {"v": list(P.PROTOCOL_VERSIONS), "session": "store"})

    def sync(self, watermark: int) -> None:
        self._send(P.EVSYNC, {"wm": watermark})

    def ack(self, watermark: int) -> None:
        self._send(P.EVACK, {"wm": watermark})

    def fetch(self, first: int) -> None:
        self._send(P.EVFETCH, {"from": first})

    def idle_for_ns(self) -> int:
        return self._clock() - self._last_sent_ns

    def alert(self, topic: str, data: dict[str, Any]) -> None:
        """Publish a platform notice (e.g. `$sys.alerts.storage`)."""
        header = encode_pub_header(new_message_id(), topic)
        self.socket.send_multipart([P.PUB, header, pack(data)])
        self._last_sent_ns = self._clock()

    def receive(self) -> tuple[bytes, list[bytes]] | None:
        """One message from the broker (command, frames), None when nothing is waiting."""
        try:
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return frames[0], frames

    def on_error(self, frames: list[bytes], feed: EventFeed) -> bool:
        """Handle an ERROR; True when the broker forgot this link (restart: HELLO again).

        A fetch of events the broker no longer has (they died with a crashed broker before
        being stored, so nothing confirmed is among them) resumes the feed after them.
        """
        try:
            body = unpack_map(frames[1], "ERROR", P.MAX_REPLY_BYTES) if len(frames) > 1 else {}
        except ProtocolViolation:
            body = {}
        code = body.get("code")
        ref = body.get("ref") if isinstance(body.get("ref"), dict) else {}
        resume = ref.get("resume_from") if isinstance(ref, dict) else None
        if type(resume) is int and resume > feed.received:
            event(log, "events-skipped", logging.WARNING, first=feed.received + 1, resume=resume)
            feed.received = resume - 1
            feed.fetching_from = 0
            return False
        if code == int(Code.NOT_WELCOMED):
            self.welcomed = self.synced = False
            self._hello_sent_ns = -_HELLO_RETRY_NS
            return True
        event(log, "broker-error", logging.WARNING, code=code, message=body.get("message"))
        return False
