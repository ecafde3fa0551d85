"""Errors the Python client raises, one class per wire category, plus local failures.

    BusError                    .code (int or None for local errors), .hint, .category
    ├── ProtocolError           1xx: the client sent something malformed (a bug)
    ├── AuthenticationError     2xx: wrong, missing or revoked credential; no manifest
    ├── PermissionDenied        3xx: the manifest does not allow it
    ├── DeliveryError           4xx: the message could not be delivered
    │   └── NoResponders        402: nobody serves the requested topic
    ├── StorageError            5xx: persistence problems
    ├── InternalError           6xx: a bug in the broker
    ├── BrokerUnavailable       local: no broker answered in time
    ├── RequestTimeout          local: no reply within the request's timeout
    ├── WouldBlock              local: `publish_nowait` found the unconfirmed window full
    └── ClosedError             local: the Bus was closed

`error_from_wire` is the one mapping from an ERROR header to an exception
(`error_from_record` the same for a decoded `broker.wire.Error`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.wire import Error


class BusError(Exception):
    """Any failure the bus reports; `code` is the broker's error code (None when local)."""

    category = "local"

    def __init__(
        self,
        message: str,
        code: int | None = None,
        hint: str = "",
        ref: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{message} — {hint}" if hint else message)
        self.code = code
        self.hint = hint
        self.ref = ref or {}


class ProtocolError(BusError):
    category = "protocol"


class AuthenticationError(BusError):
    category = "auth"


class PermissionDenied(BusError):
    category = "permission"


class DeliveryError(BusError):
    category = "delivery"


class NoResponders(DeliveryError):
    """A request found no app serving its topic (code 402)."""


class RequestTimeout(BusError):
    """No reply arrived within the request's timeout (local)."""


class StorageError(BusError):
    category = "storage"


class InternalError(BusError):
    category = "internal"


class BrokerUnavailable(BusError):
    """No broker answered: is the platform running (`plexus status`), is the endpoint right?"""


class ClosedError(BusError):
    """The Bus was closed; create a new one with Bus.connect()."""


class WouldBlock(BusError):
    """`publish_nowait` found the unconfirmed window full: `publish` would have waited.

    Nothing was queued. Retry later, or call `publish` (which waits for room).
    """


_BY_HUNDREDS: dict[int, type[BusError]] = {
    1: ProtocolError,
    2: AuthenticationError,
    3: PermissionDenied,
    4: DeliveryError,
    5: StorageError,
    6: InternalError,
}


def error_from_wire(body: dict[str, Any]) -> BusError:
    """The exception for an ERROR header received from the broker."""
    code = body.get("code")
    code = code if isinstance(code, int) else 600
    cls = NoResponders if code == 402 else _BY_HUNDREDS.get(code // 100, InternalError)
    name = body.get("name", "ERROR")
    message = f"{name} ({code}): {body.get('message', '')}"
    ref = body.get("ref")
    return cls(message, code, str(body.get("hint", "")), ref if isinstance(ref, dict) else {})


def error_from_record(record: Error) -> BusError:
    """The exception for a decoded ERROR record (a missing code counts as 600 internal)."""
    body = record.body()
    if not record.code:
        body["code"] = 600
    return error_from_wire(body)
