"""What the client core tells its driver: one frozen record per thing that happened.

`ClientSession.take_events()` returns these in order. A delivery is not wrapped: it is the
`Message` itself (`clients.message`), the one object the app gets, so the hot path builds
no second record per message. Tokens are whatever the driver passed in with a request or
a call (a `concurrent.futures.Future` for `Bus`, an `asyncio.Future` for `AsyncBus`); the
core hands them back untouched, so it never needs to know how a driver waits.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.wire import Welcome
from clients.errors import BusError
from clients.message import Message


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The broker opened or resumed the session (after every HELLO, also re-HELLOs)."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The broker accepted the first SUB of subscription `sid`."""

    sid: int


@dataclass(frozen=True, slots=True)
class SubscribeFailed:
    """The broker refused subscription `sid`; the core has forgotten it."""

    sid: int
    error: BusError


@dataclass(frozen=True, slots=True)
class Confirmed:
    """These publishes are confirmed (each id once: only ids that were unconfirmed)."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class PublishRefused:
    """The broker refused publish `msg_id` by id: final, it is never resent."""

    msg_id: bytes
    error: BusError


@dataclass(frozen=True, slots=True)
class Replied:
    """The reply to the request carrying `token` (already acknowledged by the core)."""

    token: object
    message: Message


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The request carrying `token` was refused, expired (`RequestTimeout`) or its session
    ended."""

    token: object
    error: BusError


@dataclass(frozen=True, slots=True)
class Answered:
    """The answer (STATSOK or DLQOK body, without `rid`) to the call carrying `token`."""

    token: object
    data: dict[str, object]


@dataclass(frozen=True, slots=True)
class CallFailed:
    """The call carrying `token` was refused, expired or lost with its connection."""

    token: object
    error: BusError


@dataclass(frozen=True, slots=True)
class ErrorReported:
    """An ERROR that concerns nothing the app waits for (e.g. a fire-and-forget publish
    refused while nobody awaits its confirmation)."""

    error: BusError


@dataclass(frozen=True, slots=True)
class ReconnectNeeded:
    """The broker was silent past `timeout_ms`: replace the transport, then call
    `connection_made()`."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The session is over for good (credential refused, session taken over, HELLO
    refused); every later call should raise `error`."""

    error: BusError


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended; `clean` when the broker answered the closing PING and BYE went
    out."""

    clean: bool


Event = (
    Message
    | Welcomed
    | Subscribed
    | SubscribeFailed
    | Confirmed
    | PublishRefused
    | Replied
    | RequestFailed
    | Answered
    | CallFailed
    | ErrorReported
    | ReconnectNeeded
    | Failed
    | Closed
)
