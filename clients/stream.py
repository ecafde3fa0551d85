"""Following the broker's event stream as a platform service: persistence today; audit,
tracing and the gateway next. One consumer = one platform identity (`$persistence`,
`$audit`, ...) with its own cursor at the broker (docs/protocol.md §14).

Three pieces, each usable alone, and `StreamConsumer`, which joins them for a service's
poll loop:

- `events_socket`: the SUB socket on the broker's events endpoint, authenticated with
  CurveZMQ with the service credential (the broker admits only platform services there).
- `EventFeed`: turns batches (PUB, and EVDATA re-sends) into a contiguous run of events
  after the consumer's watermark: anything already taken is skipped, and a gap (PUB/SUB
  dropped a batch, or the consumer joined late) asks the broker for the missing range
  instead of being skipped.
- `BrokerLink`: the DEALER to the broker as that identity: HELLO, EVSYNC with the
  consumer's watermark, EVACK when the watermark moves (and once a second as its
  heartbeat), EVFETCH for gaps; an ERROR "send HELLO first" means the broker restarted
  (HELLO and EVSYNC again), and a fetch of events the broker no longer has resumes the
  feed after them (`resume_from`).

Sans policy: what "taken" means (stored and synced for persistence) is the caller's; it
says so with `ack(watermark)`. Time comes from an injectable monotonic clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

import zmq

from broker import event_records as R
from broker import protocol as P
from broker import wire
from broker.codec import encode_pub_header, new_message_id, pack
from broker.errors import Code, ProtocolViolation
from broker.logs import event
from security.credentials import Credential

log = logging.getLogger("plexus.stream")

HELLO_RETRY_NS: Final = 1_000_000_000
"""An unanswered HELLO is sent again after this long."""
FETCH_RETRY_NS: Final = 500_000_000
"""An unanswered EVFETCH for a gap is sent again after this long."""
HEARTBEAT_NS: Final = 1_000_000_000
"""A link idle this long sends EVACK (its heartbeat) and asks for anything newer."""
STREAM_HWM: Final = 100_000

LinkControl = wire.Welcome | wire.EvSyncOk
"""What the link hands back to its owner, who decides what to do before it syncs."""


def events_socket(
    context: zmq.Context[Any], endpoint: str, identity: str, token: str
) -> zmq.Socket[bytes]:
    """A SUB socket on the event stream, authenticated (CurveZMQ, `token`) as `identity`."""
    sock: zmq.Socket[bytes] = context.socket(zmq.SUB)
    sock.linger = 0
    sock.rcvhwm = STREAM_HWM
    Credential.parse(token).connect_to_broker(sock)
    sock.setsockopt(zmq.SUBSCRIBE, R.EV)
    sock.connect(endpoint)
    return sock


@dataclass(slots=True)
class EventFeed:
    """Ordering and gap detection over event batches."""

    received: int
    """Highest seq taken (committed or pending)."""
    fetching_from: int = 0
    """First seq of a gap being fetched (0: none)."""
    fetch_sent_ns: int = 0
    gaps: int = 0
    malformed: int = 0

    def take(self, first_seq: int, blob: bytes) -> tuple[list[R.Event], int | None]:
        """(new contiguous events, seq to fetch from when a gap was found)."""
        fresh: list[R.Event] = []
        if first_seq > self.received + 1:
            return fresh, self._gap()
        for item in R.decode_events(blob):
            if item.seq <= self.received:
                continue
            if item.seq != self.received + 1:
                return fresh, self._gap()
            fresh.append(item)
            self.received = item.seq
        if self.fetching_from and self.received >= self.fetching_from:
            self.fetching_from = 0
        return fresh, None

    def ingest(self, head: bytes, blob: bytes) -> list[R.Event]:
        """The new events of one batch `[head, blob]`; a gap starts a fetch (sent by
        `BrokerLink.tick`), a malformed batch is logged and dropped (its events are
        fetched again as a gap when the next batch arrives)."""
        try:
            _epoch, first = R.decode_head(head)
            fresh, gap = self.take(first, blob)
        except ProtocolViolation as exc:
            self.malformed += 1
            event(log, "event-batch-malformed", logging.ERROR, error=str(exc))
            return []
        if gap is not None and not self.fetching_from:
            self.fetching_from = gap
            self.fetch_sent_ns = 0  # ask at the next tick
            event(log, "event-gap", logging.WARNING, fetch_from=gap)
        return fresh

    def continue_after(self, seq: int) -> None:
        """The stream goes on after `seq`: events between the feed and it will never come
        (they died with a crashed broker before anyone stored them), and after a broker's
        restore anything the feed took beyond `seq` came from the dead broker (the new
        one numbers after `seq` again)."""
        self.received = seq
        self.fetching_from = 0

    def _gap(self) -> int:
        self.gaps += 1
        return self.received + 1


class BrokerLink:
    """The DEALER to the broker, as one platform identity."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        identity: str,
        token: str,
        session: str = "events",
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        sock.linger = 0
        Credential.parse(token).connect_to_broker(sock)
        sock.sndhwm = 0
        sock.connect(endpoint)
        self.socket = sock
        self.identity = identity
        self._session = session
        self._clock = clock
        self.welcomed = False
        self.synced = False
        self.epoch = 0
        self._hello_sent_ns = -HELLO_RETRY_NS
        self._last_sent_ns = 0

    def close(self) -> None:
        self.socket.close(linger=0)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)
        self._last_sent_ns = self._clock()

    def hello(self) -> None:
        """(Re)start the handshake, at most once a second while unanswered."""
        now = self._clock()
        if now - self._hello_sent_ns < HELLO_RETRY_NS:
            return
        self._hello_sent_ns = now
        self.welcomed = self.synced = False
        self.send(wire.Hello(session=self._session).frames())

    def sync(self, watermark: int) -> None:
        self.send(wire.EvSync(watermark).frames())

    def ack(self, watermark: int) -> None:
        self.send(wire.EvAck(watermark).frames())

    def fetch(self, first: int) -> None:
        self.send(wire.EvFetch(first).frames())

    def alert(self, topic: str, data: dict[str, Any]) -> None:
        """Publish a platform notice (e.g. `$sys.alerts.storage`)."""
        header = encode_pub_header(new_message_id(), topic)
        self.send(wire.Publish(((header, pack(data)),)).frames())

    def idle_for_ns(self) -> int:
        return self._clock() - self._last_sent_ns

    def receive(self) -> list[bytes] | None:
        """One message from the broker (its frames), None when nothing is waiting."""
        try:
            return self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    # -- what the broker said ------------------------------------------------------------

    def welcome(self) -> None:
        self.welcomed = True

    def synced_ok(self, ok: wire.EvSyncOk, feed: EventFeed) -> None:
        """EVSYNCOK: the broker numbers `next` next; anything between the feed and it is
        retained for this consumer, so fetch it (unless a restore sets the numbering)."""
        self.synced = True
        self.epoch = ok.epoch
        if not ok.restore and ok.next > feed.received + 1:
            feed.fetching_from = feed.received + 1
            feed.fetch_sent_ns = 0

    def data(self, record: wire.EvData, feed: EventFeed) -> list[R.Event]:
        """EVDATA: a bounded re-send; keep asking until the broker has nothing more."""
        fresh = feed.ingest(record.head, record.blob)
        if fresh:
            self.fetch(feed.received + 1)
        else:
            feed.fetching_from = 0
        return fresh

    def error(self, error: wire.Error, feed: EventFeed) -> bool:
        """Handle an ERROR; True when the broker forgot this link (restart: HELLO again).

        A fetch of events the broker no longer has (they died with a crashed broker before
        being stored, so nothing confirmed is among them) resumes the feed after them.
        """
        resume = error.ref.get("resume_from")
        if type(resume) is int and resume > feed.received:
            event(log, "events-skipped", logging.WARNING, first=feed.received + 1, resume=resume)
            feed.continue_after(resume - 1)
            return False
        if error.code == int(Code.NOT_WELCOMED):
            self.welcomed = self.synced = False
            self._hello_sent_ns = -HELLO_RETRY_NS
            return True
        event(log, "broker-error", logging.WARNING, code=error.code, message=error.message)
        return False

    def tick(self, feed: EventFeed, watermark: int) -> None:
        """Timers: HELLO until welcomed, the heartbeat, fetch retries."""
        if not self.welcomed:
            self.hello()
            return
        if self.idle_for_ns() >= HEARTBEAT_NS:
            self.ack(watermark)  # doubles as the link's heartbeat
            if self.synced:  # and asks for anything newer (a lost last batch shows up here)
                self.fetch(feed.received + 1)
        now = self._clock()
        if feed.fetching_from and self.synced and now - feed.fetch_sent_ns > FETCH_RETRY_NS:
            feed.fetch_sent_ns = now
            self.fetch(feed.fetching_from)


class StreamConsumer:
    """One service's view of the stream: its SUB socket, its link and its feed.

    In the service's poll loop: register `sockets()`, pass what is ready to `read`, act
    on the controls it returns (on `Welcome`: make the watermark durable, then `sync`;
    on `EvSyncOk`: restore, if asked), `ack` when the watermark moves, `tick` each turn.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        bus_endpoint: str,
        events_endpoint: str,
        identity: str,
        token: str,
        watermark: int = 0,
        session: str = "events",
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.feed = EventFeed(watermark)
        self.sub = events_socket(context, events_endpoint, identity, token)
        self.drained = True
        """The last `read` emptied the stream socket (nothing more was waiting)."""
        self.link = BrokerLink(context, bus_endpoint, identity, token, session, clock)

    def sockets(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        return self.sub, self.link.socket

    def start(self) -> None:
        self.link.hello()

    def close(self) -> None:
        self.sub.close(linger=0)
        self.link.close()

    def read_stream(self, max_batches: int = 256) -> list[R.Event]:
        """New contiguous events from the SUB socket (at most `max_batches` batches;
        `drained` says whether the socket was emptied)."""
        fresh: list[R.Event] = []
        self.drained = False
        for _ in range(max_batches):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self.drained = True
                break
            if len(frames) == 3:
                fresh += self.feed.ingest(frames[1], frames[2])
        return fresh

    def read_link(self) -> tuple[list[R.Event], list[LinkControl]]:
        """Everything waiting on the link: re-sent events, and the controls for the owner."""
        fresh: list[R.Event] = []
        controls: list[LinkControl] = []
        link = self.link
        while (frames := link.receive()) is not None:
            try:
                command = frames[0]
                if command == P.WELCOME:
                    link.welcome()
                    controls.append(wire.Welcome.decode(frames))
                elif command == P.EVSYNCOK:
                    ok = wire.EvSyncOk.decode(frames)
                    link.synced_ok(ok, self.feed)
                    controls.append(ok)
                elif command == P.EVDATA:
                    fresh += link.data(wire.EvData.decode(frames), self.feed)
                elif command == P.ERROR:
                    link.error(wire.Error.decode(frames), self.feed)
            except ProtocolViolation as exc:
                event(log, "link-message-malformed", logging.ERROR, error=str(exc))
        return fresh, controls

    def read(self, ready: Collection[zmq.Socket[bytes]]) -> tuple[list[R.Event], list[LinkControl]]:
        """Link first (a re-send fills a gap before newer batches), then the stream."""
        fresh: list[R.Event] = []
        controls: list[LinkControl] = []
        self.drained = True
        if self.link.socket in ready:
            fresh, controls = self.read_link()
        if self.sub in ready:
            fresh += self.read_stream()
        return fresh, controls

    def sync(self, watermark: int) -> None:
        self.link.sync(watermark)

    def ack(self, watermark: int) -> None:
        if self.link.welcomed:
            self.link.ack(watermark)

    def tick(self, watermark: int) -> None:
        self.link.tick(self.feed, watermark)
