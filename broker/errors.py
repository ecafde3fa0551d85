"""Error codes that cross the wire, grouped by category, each with what to do about it.

Tree of the exceptions raised by the pure broker modules::

    WireError                 any error that becomes an ERROR frame (has .code)
    ├── ProtocolViolation     the peer sent something malformed (1xx)
    ├── AuthFailure           identity problems (2xx)
    ├── PermissionViolation   the manifest does not allow it (3xx)
    ├── DeliveryFailure       the message could not be delivered (4xx)
    │   └── CapExceeded       the app is over one of its caps (41x, broker.caps)
    └── StorageFailure        the store cannot do it or found damage (5xx)

The catalogue `ERRORS` is the one mapping from a numeric code to its name, category and
advice; `error_body` turns a code into the ERROR header every client receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Code(IntEnum):
    """Numeric error codes; the hundreds digit is the category."""

    MALFORMED_FRAME = 100
    UNKNOWN_COMMAND = 101
    BAD_HEADER = 102
    BAD_FRAME_COUNT = 103
    TOO_LARGE = 104
    NOT_WELCOMED = 105
    UNSUPPORTED_VERSION = 106
    BAD_TOPIC = 107
    BAD_PATTERN = 108
    DUPLICATE_SID = 109
    UNKNOWN_SID = 110
    TOO_MANY_SUBSCRIPTIONS = 111
    BAD_SESSION_NAME = 112

    AUTH_FAILED = 200
    IDENTITY_UNKNOWN = 201
    MANIFEST_MISSING = 202
    SESSION_TAKEN_OVER = 203
    CREDENTIAL_REVOKED = 204
    IDENTITY_MISMATCH = 205

    PUBLISH_DENIED = 300
    SUBSCRIBE_DENIED = 301
    RESERVED_TOPIC = 302
    COMMAND_DENIED = 303
    REQUEST_DENIED = 304

    QUEUE_FULL = 400
    UNKNOWN_DLQ_ENTRY = 401
    NO_RESPONDERS = 402
    UNKNOWN_REPLY = 403
    SESSION_LIMIT = 410
    DURABLE_LIMIT = 411
    PENDING_LIMIT = 412
    PUB_TOO_LARGE = 413
    HOLD_LIMIT = 414
    DLQ_QUOTA = 415

    STORAGE_UNAVAILABLE = 500
    PERSISTENCE_OFF = 501
    STORED_DATA_CORRUPT = 502
    STORAGE_FULL = 503
    KEY_UNAVAILABLE = 504

    INTERNAL = 600


class Category:
    """Category names as they appear on the wire."""

    PROTOCOL = "protocol"
    AUTH = "auth"
    PERMISSION = "permission"
    DELIVERY = "delivery"
    STORAGE = "storage"
    INTERNAL = "internal"


_CATEGORY_BY_HUNDREDS = {
    1: Category.PROTOCOL,
    2: Category.AUTH,
    3: Category.PERMISSION,
    4: Category.DELIVERY,
    5: Category.STORAGE,
    6: Category.INTERNAL,
}


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """What a code means and what the receiver should do about it."""

    code: Code
    hint: str

    @property
    def category(self) -> str:
        return _CATEGORY_BY_HUNDREDS[int(self.code) // 100]


ERRORS: dict[Code, ErrorSpec] = {
    spec.code: spec
    for spec in (
        ErrorSpec(
            Code.MALFORMED_FRAME, "Send frames as docs/protocol.md describes; fix the client."
        ),
        ErrorSpec(
            Code.UNKNOWN_COMMAND,
            "Use HELLO, SUB, UNSUB, PUB, ACK, NACK, REQ, REP, PING, BYE (STATS, DLQ).",
        ),
        ErrorSpec(Code.BAD_HEADER, "The header must be a msgpack map with the documented fields."),
        ErrorSpec(Code.BAD_FRAME_COUNT, "Send the number of frames the command requires."),
        ErrorSpec(
            Code.TOO_LARGE, "Keep headers under 8 KiB, payloads under 1 MiB, batches ≤ 1024."
        ),
        ErrorSpec(Code.NOT_WELCOMED, "Send HELLO and wait for WELCOME before any other command."),
        ErrorSpec(Code.UNSUPPORTED_VERSION, "Upgrade the client; the broker speaks version 1."),
        ErrorSpec(
            Code.BAD_TOPIC, "A topic is dot-separated non-empty tokens, no wildcards, ≤ 255 B."
        ),
        ErrorSpec(Code.BAD_PATTERN, "Use whole-token '*' or a final '>' in subscription patterns."),
        ErrorSpec(Code.DUPLICATE_SID, "Pick a subscription id not already in use on this session."),
        ErrorSpec(Code.UNKNOWN_SID, "Unsubscribe only subscription ids you subscribed."),
        ErrorSpec(
            Code.TOO_MANY_SUBSCRIPTIONS, "Use wildcards instead of thousands of subscriptions."
        ),
        ErrorSpec(
            Code.BAD_SESSION_NAME,
            "A session name is 1-64 printable characters: no NUL, control chars or line breaks.",
        ),
        ErrorSpec(
            Code.AUTH_FAILED, "Connect with the credential the supervisor or `plexus env` gave."
        ),
        ErrorSpec(
            Code.IDENTITY_UNKNOWN, "Reconnect; the connection carries no authenticated app id."
        ),
        ErrorSpec(Code.MANIFEST_MISSING, "Add a manifest for this app id to the apps directory."),
        ErrorSpec(
            Code.SESSION_TAKEN_OVER,
            "Another connection resumed this session; give each connection its own name.",
        ),
        ErrorSpec(
            Code.CREDENTIAL_REVOKED,
            "The credential was revoked or expired; get a new one (`plexus env APP_ID`, "
            "or let the supervisor launch the app).",
        ),
        ErrorSpec(
            Code.IDENTITY_MISMATCH,
            "HELLO named another app than the credential's; connect as the app it was issued to.",
        ),
        ErrorSpec(
            Code.PUBLISH_DENIED, "Add a matching pattern to [permissions].publish in the manifest."
        ),
        ErrorSpec(
            Code.SUBSCRIBE_DENIED,
            "Add a covering pattern to [permissions].subscribe in the manifest.",
        ),
        ErrorSpec(Code.RESERVED_TOPIC, "Topics starting with '$sys.' belong to the platform."),
        ErrorSpec(Code.REQUEST_DENIED, "Add a matching pattern to [permissions].request."),
        ErrorSpec(Code.COMMAND_DENIED, "This command is reserved for platform identities ($...)."),
        ErrorSpec(
            Code.QUEUE_FULL, "The receiver is too slow; consume faster or raise queue limits."
        ),
        ErrorSpec(
            Code.NO_RESPONDERS,
            "Start an app that serves this topic (bus.serve), or check the topic's spelling.",
        ),
        ErrorSpec(Code.UNKNOWN_REPLY, "Reply only to requests you received, before they expire."),
        ErrorSpec(
            Code.SESSION_LIMIT,
            "The app has as many sessions as [limits] sessions allows: close unused ones (BYE) "
            "or raise it in the app's manifest.",
        ),
        ErrorSpec(
            Code.DURABLE_LIMIT,
            "The app has [limits] durable_subscriptions durable subscriptions: unsubscribe "
            "some, use wildcards, or raise it in the app's manifest.",
        ),
        ErrorSpec(
            Code.PENDING_LIMIT,
            "The app waits for [limits] pending_requests replies: wait for answers (or their "
            "timeout) before sending more, or raise it in the app's manifest.",
        ),
        ErrorSpec(
            Code.PUB_TOO_LARGE,
            "Send fewer or smaller messages per PUB (at most [limits] pub_bytes bytes); the "
            "Python client batches within the limit on its own.",
        ),
        ErrorSpec(
            Code.HOLD_LIMIT,
            "The broker is recovering and holds [limits] held_messages/held_bytes of this app "
            "already: retry once it has recovered (`plexus status`).",
        ),
        ErrorSpec(
            Code.DLQ_QUOTA,
            "The app's dead letters are over [limits] dlq_entries/dlq_bytes, so its oldest "
            "were dropped: replay or purge them (`plexus dlq`), or fix why it rejects messages.",
        ),
        ErrorSpec(
            Code.UNKNOWN_DLQ_ENTRY, "List the dead letters (`plexus dlq list`) for valid ids."
        ),
        ErrorSpec(
            Code.STORAGE_UNAVAILABLE,
            "The persistence service is not answering; check `plexus status` and its log.",
        ),
        ErrorSpec(
            Code.PERSISTENCE_OFF,
            "The platform runs with --no-persistence; restart it without that flag.",
        ),
        ErrorSpec(
            Code.STORED_DATA_CORRUPT,
            "A stored record failed its integrity check; restore the segment from backup.",
        ),
        ErrorSpec(
            Code.STORAGE_FULL,
            "The store hit its size limit; raise [persistence] max_size_mb or lower max_age_s.",
        ),
        ErrorSpec(
            Code.KEY_UNAVAILABLE,
            "The key that encrypted this record is missing; restore HOME/keys from backup.",
        ),
        ErrorSpec(
            Code.INTERNAL, "A bug in Plexus: report it with the broker log around this time."
        ),
    )
}


class WireError(Exception):
    """An error that is reported to the peer as an ERROR frame.

    `detail` says what happened; `fix`, when given, replaces the code's generic advice
    with one naming this case (the exact manifest line to add), so the two never repeat
    each other.
    """

    def __init__(self, code: Code, detail: str, *, fix: str = "", **ref: Any) -> None:
        super().__init__(f"{code.name} ({int(code)}): {detail}")
        self.code = code
        self.detail = detail
        self.fix = fix
        self.ref = ref

    @property
    def hint(self) -> str:
        return self.fix or ERRORS[self.code].hint


class ProtocolViolation(WireError):
    """The peer sent bytes that do not follow the protocol."""


class AuthFailure(WireError):
    """The peer's identity could not be established."""


class PermissionViolation(WireError):
    """The peer asked for something its manifest does not allow."""


class DeliveryFailure(WireError):
    """A message could not be handed to a receiver."""


class CapExceeded(DeliveryFailure):
    """The app is over one of its per-app caps (broker.caps): `cap` names it, `limit` is
    its value. Reported as a Denied event with action "limit" and the cap as target."""

    def __init__(self, code: Code, cap: str, limit: int, detail: str, **ref: Any) -> None:
        super().__init__(code, detail, **ref)
        self.cap = cap
        self.limit = limit


class StorageFailure(WireError):
    """Persistence is off, unavailable, full, or a stored record failed its check."""


def error_body(code: Code, detail: str, ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ERROR header for `code`: the one place codes become names, categories and advice."""
    spec = ERRORS[code]
    return {
        "code": int(code),
        "name": code.name,
        "category": spec.category,
        "message": detail,
        "hint": spec.hint,
        "ref": ref or {},
    }
