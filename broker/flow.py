"""Publish credit: publishers are slowed before a receiver's queue overflows.

Every session may send `credit` PUB messages (WELCOME `credit`) before it must wait for
a CREDIT; each message (pair) of a PUB the broker reads uses one. The broker gives them
back (`CREDIT {n}`, once a quarter of the credit is used, so one small message per 64
publishes by default) as soon as it has routed them - unless one of the **attached**
sessions they were queued for is congested: its queue reached `flow_high` deliveries (or
a quarter of `queue_max_bytes`). Then the publisher's credit is held until every such
receiver has drained to `flow_low` (and a sixteenth of the bytes), detached or ended.
A publisher out of credit waits; its receivers' queues stay below `flow_high` + the credit
of each publisher feeding them, well under `queue_max`, so what a conforming publisher
sends is not dead-lettered as `queue-full` (the bound still applies: past it, still the
dead-letter queue).

Only PUB credit is ever withheld. The broker keeps reading its one ROUTER socket: ACK,
NACK, PING and everything else are handled as they come, so a congested receiver's
acknowledgements always get through and drain it (no deadlock). A detached receiver
holds nobody back (nobody consumes its queue: its overflow goes to the dead-letter queue
as before), and a publisher's held credit never waits on a receiver that has gone.

One publisher, two states:

    FLOWING --a message queued for a congested attached session--> HELD
    HELD    --every holding receiver drained / detached / ended-->  FLOWING (CREDIT owed)

Releases found while pumping a receiver go out at once; the rest (a holding receiver that
detached or ended) are found by `sweep`, on the broker's 50 ms timer. A publisher is never
held by its own session, and never for longer than `HOLD_MAX_NS` at a time: apps whose
handlers publish to each other in a cycle could otherwise wait for each other forever
once their client windows fill (the handler blocked in `publish` acknowledges nothing).
After that the publisher gets its credit and is held again by the next message it sends
to a receiver still congested, so such a receiver grows by at most one credit per
`HOLD_MAX_NS`, and reaching `queue_max` is still the dead-letter queue's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from broker.delivery import DeliveryConfig
from broker.wire import Credit

if TYPE_CHECKING:
    from broker.router import Outbound
    from broker.sessions import Session, SessionKey

HOLD_MAX_NS: Final = 10_000_000_000
"""Longest a publisher's credit is held in one go (see the module docstring)."""


class FlowControl:
    """The credit of every publisher session and who holds it back."""

    def __init__(self, config: DeliveryConfig, sessions: dict[SessionKey, Session]) -> None:
        self.credit = config.credit
        high = min(config.flow_high, max(1, config.queue_max // 2))
        self.high = high if config.credit else 1 << 62
        """Queue length at which a receiver holds back credit: `flow_high`, at most half
        of `queue_max` (never, without credit)."""
        self.high_bytes = config.queue_max_bytes // 4 if config.credit else 1 << 62
        self.low = min(config.flow_low, high // 4)
        self.low_bytes = config.queue_max_bytes // 16
        self._grant_at = max(1, config.credit // 4) if config.credit else 1 << 62
        """Owed credit given back in one CREDIT (never, without flow control)."""
        self._sessions = sessions
        self.held: dict[SessionKey, int] = {}
        """Publishers whose credit is held now -> since when (monotonic ns; 0: since the
        next sweep, which notes the time)."""
        self.holds = 0
        """Times a publisher's credit was held back (STATS `flow_holds`)."""
        self.granted = 0
        """Credit given back (STATS `flow_granted`)."""

    def welcome(self, session: Session) -> None:
        """A HELLO: the WELCOME gives the session its whole credit afresh."""
        session.owed = 0

    def hold(self, publisher: Session, receiver: Session) -> None:
        """`publisher` queued a message for congested, attached `receiver`."""
        if receiver.key in publisher.held_by or publisher is receiver:
            return
        if not publisher.held_by:
            self.holds += 1
            self.held[publisher.key] = 0
        publisher.held_by.add(receiver.key)
        receiver.holding.add(publisher.key)

    def used(self, publisher: Session, count: int) -> Outbound | None:
        """`count` PUB messages read from `publisher`: its CREDIT, when one is due."""
        owed = publisher.owed + count
        if publisher.held_by or owed < self._grant_at or publisher.peer is None:
            publisher.owed = owed
            return None
        publisher.owed = 0
        self.granted += owed
        return (publisher.peer, Credit(owed).frames())

    def drained(self, receiver: Session) -> list[Outbound]:
        """`receiver` sent from its queue (the caller saw `receiver.holding`): once it is
        below the low marks, the publishers it held get their credit."""
        mailbox = receiver.mailbox
        if len(mailbox.queue) > self.low or mailbox.queued_bytes > self.low_bytes:
            return []
        return self.release(receiver)

    def release(self, receiver: Session) -> list[Outbound]:
        """`receiver` holds nobody back any more."""
        out: list[Outbound] = []
        for key in receiver.holding:
            publisher = self._sessions.get(key)
            if publisher is None:
                continue
            publisher.held_by.discard(receiver.key)
            if not publisher.held_by:
                out.extend(self._flowing(publisher))
        receiver.holding.clear()
        return out

    def sweep(self, now_ns: int) -> list[Outbound]:
        """Timer: held publishers whose holding receivers drained, detached or ended, or
        that were held for `HOLD_MAX_NS`."""
        out: list[Outbound] = []
        sessions = self._sessions
        for key, noted in list(self.held.items()):
            publisher = sessions.get(key)
            if publisher is None:
                del self.held[key]
                continue
            if not noted:
                self.held[key] = now_ns
            overdue = bool(noted) and now_ns - noted >= HOLD_MAX_NS
            for receiver_key in list(publisher.held_by):
                receiver = sessions.get(receiver_key)
                if (
                    overdue
                    or receiver is None
                    or receiver.peer is None
                    or self._below_low(receiver)
                ):
                    publisher.held_by.discard(receiver_key)
                    if receiver is not None:
                        receiver.holding.discard(key)
            if not publisher.held_by:
                out.extend(self._flowing(publisher))
        return out

    def _below_low(self, receiver: Session) -> bool:
        mailbox = receiver.mailbox
        return len(mailbox.queue) <= self.low and mailbox.queued_bytes <= self.low_bytes

    def _flowing(self, publisher: Session) -> list[Outbound]:
        """HELD -> FLOWING: what it is owed goes out now."""
        self.held.pop(publisher.key, None)
        owed, publisher.owed = publisher.owed, 0
        if not owed or publisher.peer is None:
            publisher.owed = owed
            return []
        self.granted += owed
        return [(publisher.peer, Credit(owed).frames())]
