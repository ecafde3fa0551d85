"""The wire module: every command's frame layout and body, once, as a typed frozen record.

Each record knows its command (`COMMAND`), encodes itself (`frames()`) and decodes
untrusted frames (`decode(frames)`), raising `ProtocolViolation` with a code on anything
malformed. The broker, the Python client (threaded and asyncio), the persistence link and
the query socket all speak through these records; no command body is a dict literal at a
call site. The hot path stays cheap: `Publish` and `Deliver` carry the publisher's header
and payload frames as they are (never re-encoded), and their encoders build frame lists
directly.

Layouts (docs/protocol.md §3, §14, §15):

    [HELLO, body]  [WELCOME, body]  [SUB, body]  [SUBOK, body]  [UNSUB, body]
    [UNSUBOK, body]  [PUB, (header, payload)+]  [DELIVER, (sids, stamp, header, payload)+]
    packed (version 2): [PUB, packed]  [DELIVER, packed]  (packed: one msgpack array of
    the same frames, flat, as binary strings)
    [CONFIRM, body]  [ACK, body]  [NACK, body]  [REQ, header, payload]
    [REP, header, payload]  [PING, echo]  [PONG, echo]  [BYE]  [STATS, body]
    [STATSOK, body]  [DLQ, body]  [DLQOK, body]  [ERROR, body]
    [EVSYNC, body]  [EVSYNCOK, body]  [EVACK, body]  [EVFETCH, body]  [EVDATA, head, blob]
    [EVRESTORE, body] (query socket:) [HISTORY, body]  [REPLAY, body]  [RESULT, body]

`rid` fields are request ids chosen by the asker and echoed in the answer (and in the
`ref` of an ERROR), so concurrent calls never take each other's answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, Self

import msgpack

from broker import protocol as P
from broker.codec import (
    PubHeader,
    Stamp,
    decode_pub_header,
    decode_sids,
    decode_stamp,
    encode_pub_header,
    encode_sids,
    encode_stamp,
    pack,
    required_int,
    required_text,
    unpack_map,
)
from broker.errors import ERRORS, Code, ProtocolViolation, WireError
from broker.names import validate_session_name

MAX_RID: Final = 2**31 - 1
_SEQ_MAX: Final = 2**63 - 1
_ECHO_LIMIT: Final = 64
_DEFAULT_ECHO: Final = b"\x80"

# Query socket commands (the persistence service's ROUTER, docs/protocol.md §15)
HISTORY: Final = b"HISTORY"
REPLAY: Final = b"REPLAY"
RESULT: Final = b"RESULT"
QUERY_COMMANDS: Final = frozenset({HISTORY, REPLAY})
PAGE_MESSAGES: Final = 1000
PAGE_BYTES: Final = 4 * 2**20
MAX_HISTORY: Final = 100_000

EVRESTORE: Final = P.EVRESTORE
"""persistence -> broker, after EVSYNCOK: the durable state a recovering broker rebuilds."""
RESTORE_RECENT_IDS: Final = 131_072
"""How many of the newest stored message ids a restore carries (the broker's dedupe)."""
RESTORE_PAGE_ROWS: Final = 1000
RESTORE_PAGE_BYTES: Final = P.MAX_PAYLOAD_BYTES
"""Budget of one EVRESTORE page (rows' variable fields): one page is always below the
broker's MAX_FRAME_BYTES, also when its one row carries a maximal payload."""


def expect_frames(frames: list[bytes], count: int) -> None:
    """BAD_FRAME_COUNT unless `frames` has exactly `count` frames."""
    if len(frames) != count:
        name = frames[0][:16].decode("ascii", "replace") if frames else "?"
        raise ProtocolViolation(
            Code.BAD_FRAME_COUNT, f"{name} takes {count} frames, got {len(frames)}"
        )


def _body(frames: list[bytes], what: str, limit: int = P.MAX_HEADER_BYTES) -> dict[str, Any]:
    expect_frames(frames, 2)
    return unpack_map(frames[1], what, limit)


def _optional_bool(body: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolViolation(Code.BAD_HEADER, f"{what} field {key!r} must be a boolean")
    return value


def _optional_int(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    if key not in body:
        return default
    return required_int(body, key, low, high)


def _rid(body: dict[str, Any]) -> int:
    return _optional_int(body, "rid", 0, 0, MAX_RID)


def request_id(frames: list[bytes]) -> int:
    """The `rid` of a request whose body may not decode as a whole (for the `ref` of the
    ERROR answering it); 0 when there is none."""
    if len(frames) != 2:
        return 0
    try:
        return _rid(unpack_map(frames[1]))
    except ProtocolViolation:
        return 0


def _int_list(body: dict[str, Any], key: str, what: str) -> tuple[int, ...]:
    values = body.get(key)
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ProtocolViolation(Code.BAD_HEADER, f"{what} field {key!r} must be a list of ints")
    return tuple(values)


# -- packed batches (version 2) --------------------------------------------------------------

PACKED_BATCH_BYTES: Final = P.MAX_PAYLOAD_BYTES
"""Most header and payload bytes one packed PUB or DELIVER gathers; the next message starts
another. A message alone is always sent, so a packed frame stays below MAX_FRAME_BYTES."""

_batch_packer = msgpack.Packer(use_bin_type=True)
"""Reused for packed batches (a flat list of bytes, no user callbacks)."""


def pack_batch(items: Sequence[bytes]) -> bytes:
    """One frame holding `items` (a batch's frames after the command), as a msgpack array."""
    return _batch_packer.pack(items)  # type: ignore[no-any-return]


def unpack_batch(frames: list[bytes], group: int) -> list[bytes]:
    """[command, *items] of a packed [command, packed] message: `packed` must be a msgpack
    array of byte strings whose length is a positive multiple of `group` (2 for PUB, 4 for
    DELIVER); anything else is a MALFORMED_FRAME, never another exception."""
    command = frames[0].decode("ascii", "replace")
    try:
        items = msgpack.unpackb(frames[1], raw=True, use_list=True)
    except Exception as exc:  # msgpack raises several kinds (and ValueError when too deep)
        raise ProtocolViolation(
            Code.MALFORMED_FRAME, f"packed {command} is not msgpack: {type(exc).__name__}"
        ) from None
    if type(items) is not list or not items or len(items) % group:
        raise ProtocolViolation(
            Code.MALFORMED_FRAME,
            f"packed {command} must be an array of {group}-frame groups of binary strings",
        )
    for item in items:
        if type(item) is not bytes:
            raise ProtocolViolation(
                Code.MALFORMED_FRAME, f"packed {command} holds a {type(item).__name__}, not bytes"
            )
    return [frames[0], *items]


# -- session ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Open or resume a session. `acked` False: at-most-once (deliveries need no ACK)."""

    COMMAND: ClassVar[bytes] = P.HELLO
    versions: tuple[int, ...] = P.PROTOCOL_VERSIONS
    session: str = P.DEFAULT_SESSION
    acked: bool = True
    client: str = ""
    app: str = ""
    """The app the client believes it is (checked against its credential's; "" unsaid)."""

    def frames(self) -> list[bytes]:
        body: dict[str, Any] = {"v": list(self.versions), "session": self.session}
        if not self.acked:
            body["ack"] = False
        if self.client:
            body["client"] = self.client
        if self.app:
            body["app"] = self.app
        return [P.HELLO, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "HELLO")
        offered = body.get("v")
        if not isinstance(offered, list) or not all(type(v) is int for v in offered):
            raise ProtocolViolation(Code.BAD_HEADER, "HELLO field 'v' must be a list of integers")
        acked = _optional_bool(body, "ack", True, "HELLO")
        name = validate_session_name(body.get("session", P.DEFAULT_SESSION))
        client = body.get("client", "")
        app = body.get("app", "")
        if not isinstance(app, str) or len(app) > 256:
            raise ProtocolViolation(Code.BAD_HEADER, "HELLO field 'app' must be a short string")
        return cls(tuple(offered), name, acked, client if isinstance(client, str) else "", app)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker's answer to HELLO: the session's terms and what a resume kept."""

    COMMAND: ClassVar[bytes] = P.WELCOME
    version: int
    app: str
    session: str
    resumed: bool
    subs: tuple[tuple[int, str], ...]
    heartbeat_ms: int
    timeout_ms: int
    grace_ms: int
    window: int
    store: str | None = None
    """The persistence query socket (None: persistence is off)."""
    max_payload: int = P.MAX_PAYLOAD_BYTES
    max_batch: int = P.MAX_PUB_BATCH
    credit: int = 0
    """PUB messages the session may send before a CREDIT gives more (0: no flow control,
    a broker that predates it)."""

    def frames(self) -> list[bytes]:
        body = {
            "v": self.version,
            "app": self.app,
            "session": self.session,
            "resumed": self.resumed,
            "subs": [list(item) for item in self.subs],
            "heartbeat_ms": self.heartbeat_ms,
            "timeout_ms": self.timeout_ms,
            "grace_ms": self.grace_ms,
            "max_payload": self.max_payload,
            "max_batch": self.max_batch,
            "window": self.window,
            "store": self.store,
            "credit": self.credit,
        }
        return [P.WELCOME, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "WELCOME", P.MAX_REPLY_BYTES)
        raw_subs = body.get("subs", [])
        if not isinstance(raw_subs, list):
            raise ProtocolViolation(Code.BAD_HEADER, "WELCOME field 'subs' must be a list")
        subs: list[tuple[int, str]] = []
        for item in raw_subs:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and type(item[0]) is int
                and isinstance(item[1], str)
            ):
                raise ProtocolViolation(Code.BAD_HEADER, "WELCOME 'subs' must be [sid, pattern]")
            subs.append((item[0], item[1]))
        store = body.get("store")
        return cls(
            version=required_int(body, "v", 1, 2**16),
            app=required_text(body, "app"),
            session=required_text(body, "session"),
            resumed=_optional_bool(body, "resumed", False, "WELCOME"),
            subs=tuple(subs),
            heartbeat_ms=required_int(body, "heartbeat_ms", 1, 2**31),
            timeout_ms=required_int(body, "timeout_ms", 1, 2**31),
            grace_ms=required_int(body, "grace_ms", 0, 2**40),
            window=required_int(body, "window", 1, 2**31),
            store=store if isinstance(store, str) else None,
            max_payload=_optional_int(body, "max_payload", P.MAX_PAYLOAD_BYTES, 1, 2**40),
            max_batch=_optional_int(body, "max_batch", P.MAX_PUB_BATCH, 1, 2**31),
            credit=_optional_int(body, "credit", 0, 0, 2**31),
        )


@dataclass(frozen=True, slots=True)
class Ping:
    """A heartbeat; `echo` (≤ 64 bytes) comes back in the PONG (a closing client uses it
    to learn the broker has read everything sent before)."""

    COMMAND: ClassVar[bytes] = P.PING
    echo: bytes = _DEFAULT_ECHO

    def frames(self) -> list[bytes]:
        return [P.PING, self.echo]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        if len(frames) == 2 and len(frames[1]) <= _ECHO_LIMIT:
            return cls(frames[1])
        return cls()


@dataclass(frozen=True, slots=True)
class Pong:
    COMMAND: ClassVar[bytes] = P.PONG
    echo: bytes = _DEFAULT_ECHO

    def frames(self) -> list[bytes]:
        return [P.PONG, self.echo]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(frames[1] if len(frames) > 1 else _DEFAULT_ECHO)


CLOSING_ECHO: Final = pack({"closing": True})
"""The echo of the PING a closing client sends last: its PONG means "all read"."""


@dataclass(frozen=True, slots=True)
class Bye:
    """End the session cleanly (non-durable subscriptions end, nothing is dead-lettered)."""

    COMMAND: ClassVar[bytes] = P.BYE

    def frames(self) -> list[bytes]:
        return [P.BYE]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal: code, its category and advice, and `ref` naming what it concerns
    (`id` of a message, `sid`, `index` in a batch, `rid` of a request, ...)."""

    COMMAND: ClassVar[bytes] = P.ERROR
    code: int
    message: str
    name: str = ""
    category: str = ""
    hint: str = ""
    ref: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: WireError) -> Self:
        spec = ERRORS[exc.code]
        return cls(int(exc.code), exc.detail, exc.code.name, spec.category, exc.hint, exc.ref)

    @classmethod
    def for_code(cls, code: Code, message: str, **ref: Any) -> Self:
        return cls.of(WireError(code, message, **ref))

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "category": self.category,
            "message": self.message,
            "hint": self.hint,
            "ref": self.ref,
        }

    def frames(self) -> list[bytes]:
        return [P.ERROR, pack(self.body())]

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Self:
        code = body.get("code")
        ref = body.get("ref")

        def text(key: str) -> str:
            value = body.get(key)
            return value if isinstance(value, str) else ""

        return cls(
            code if type(code) is int else 0,
            text("message"),
            text("name"),
            text("category"),
            text("hint"),
            ref if isinstance(ref, dict) else {},
        )

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls.from_body(_body(frames, "ERROR", P.MAX_REPLY_BYTES))


# -- subscriptions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    COMMAND: ClassVar[bytes] = P.SUB
    sid: int
    pattern: str
    durable: bool = False
    serve: bool = False
    """Answer requests on `pattern` instead of receiving publishes."""

    def frames(self) -> list[bytes]:
        body = {"sid": self.sid, "pattern": self.pattern}
        if self.durable:
            body["durable"] = True
        if self.serve:
            body["serve"] = True
        return [P.SUB, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "SUB")
        return cls(
            required_int(body, "sid", 1, P.MAX_SID),
            required_text(body, "pattern"),
            body.get("durable", False) is True,
            body.get("serve", False) is True,
        )


@dataclass(frozen=True, slots=True)
class SubscribeOk:
    COMMAND: ClassVar[bytes] = P.SUBOK
    sid: int
    pattern: str
    durable: bool = False

    def frames(self) -> list[bytes]:
        body = {"sid": self.sid, "pattern": self.pattern, "durable": self.durable}
        return [P.SUBOK, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "SUBOK")
        return cls(
            required_int(body, "sid", 1, P.MAX_SID),
            required_text(body, "pattern"),
            body.get("durable", False) is True,
        )


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    COMMAND: ClassVar[bytes] = P.UNSUB
    sid: int

    def frames(self) -> list[bytes]:
        return [P.UNSUB, pack({"sid": self.sid})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "UNSUB"), "sid", 1, P.MAX_SID))


@dataclass(frozen=True, slots=True)
class UnsubscribeOk:
    COMMAND: ClassVar[bytes] = P.UNSUBOK
    sid: int

    def frames(self) -> list[bytes]:
        return [P.UNSUBOK, pack({"sid": self.sid})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "UNSUBOK"), "sid", 1, P.MAX_SID))


# -- publishing and delivery -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """A batch of (header, payload) pairs, forwarded as sent (headers: codec.PubHeader)."""

    COMMAND: ClassVar[bytes] = P.PUB
    pairs: tuple[tuple[bytes, bytes], ...]

    def frames(self, packed: bool = False) -> list[bytes]:
        """[PUB, header, payload, ...], or with `packed` [PUB, packed] (one frame, version 2;
        the caller keeps the batch within PACKED_BATCH_BYTES)."""
        frames = [P.PUB]
        for header, payload in self.pairs:
            frames += (header, payload)
        return [P.PUB, pack_batch(frames[1:])] if packed else frames

    @staticmethod
    def check(frames: list[bytes]) -> int:
        """How many pairs a PUB carries; ProtocolViolation unless 1-1024 whole pairs.
        (The broker's hot path reads the pairs from the frames without building a record.)"""
        count = len(frames) - 1
        if count == 0 or count % 2:
            raise ProtocolViolation(
                Code.BAD_FRAME_COUNT, f"PUB takes header/payload pairs, got {count} frames"
            )
        if count > 2 * P.MAX_PUB_BATCH:
            raise ProtocolViolation(
                Code.TOO_LARGE, f"PUB batch of {count // 2} exceeds {P.MAX_PUB_BATCH}"
            )
        return count // 2

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        """Either layout: two frames per message, or packed."""
        if len(frames) == 2:
            frames = unpack_batch(frames, 2)
        count = cls.check(frames)
        return cls(tuple((frames[1 + 2 * i], frames[2 + 2 * i]) for i in range(count)))


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message of a DELIVER: the ids of the receiving subscriptions, the broker's
    stamp (sender, time, delivery seq, attempt) and the publisher's header and payload."""

    sids: tuple[int, ...]
    stamp: Stamp
    header: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Messages for one session, as `[sids, stamp, header, payload]` groups."""

    COMMAND: ClassVar[bytes] = P.DELIVER
    items: tuple[Delivered, ...]

    def frames(self) -> list[bytes]:
        return self.frames_of(
            [
                (
                    encode_sids(item.sids),
                    encode_stamp(
                        item.stamp.seq,
                        item.stamp.sender,
                        item.stamp.timestamp_ns,
                        item.stamp.attempt,
                    ),
                    item.header,
                    item.payload,
                )
                for item in self.items
            ]
        )

    @staticmethod
    def frames_of(groups: list[tuple[bytes, bytes, bytes, bytes]]) -> list[bytes]:
        """The hot-path encoder: (packed sids, packed stamp, header, payload) groups."""
        frames = [P.DELIVER]
        for group in groups:
            frames += group
        return frames

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        """Either layout: four frames per message, or packed (version 2)."""
        if len(frames) == 2:
            frames = unpack_batch(frames, 4)
        count = len(frames) - 1
        if count <= 0 or count % 4:
            raise ProtocolViolation(Code.BAD_FRAME_COUNT, "DELIVER takes groups of 4 frames")
        items = tuple(
            Delivered(
                tuple(decode_sids(frames[i])),
                decode_stamp(frames[i + 1]),
                frames[i + 2],
                frames[i + 3],
            )
            for i in range(1, count, 4)
        )
        return cls(items)


@dataclass(frozen=True, slots=True)
class Confirm:
    """Message ids the broker accepted (stored and synced, with persistence on)."""

    COMMAND: ClassVar[bytes] = P.CONFIRM
    ids: tuple[bytes, ...]

    def frames(self) -> list[bytes]:
        return [P.CONFIRM, pack({"ids": list(self.ids)})]

    @classmethod
    def split(cls, ids: list[bytes]) -> list[Self]:
        """CONFIRMs for `ids`, each under the protocol's 8 KiB header limit."""
        step = P.MAX_CONFIRM_IDS
        return [cls(tuple(ids[i : i + step])) for i in range(0, len(ids), step)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        ids = _body(frames, "CONFIRM").get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, bytes) for i in ids):
            raise ProtocolViolation(Code.BAD_HEADER, "CONFIRM field 'ids' must be a list of bin")
        return cls(tuple(ids))


@dataclass(frozen=True, slots=True)
class Credit:
    """More publish credit: the session may send `n` more PUB messages (§3.17)."""

    COMMAND: ClassVar[bytes] = P.CREDIT
    n: int

    def frames(self) -> list[bytes]:
        return [P.CREDIT, pack({"n": self.n})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "CREDIT"), "n", 1, 2**31))


@dataclass(frozen=True, slots=True)
class Ack:
    """Delivery seqs the client finished with."""

    COMMAND: ClassVar[bytes] = P.ACK
    seqs: tuple[int, ...]

    def frames(self) -> list[bytes]:
        return [P.ACK, pack({"seqs": list(self.seqs)})]

    @classmethod
    def split(cls, seqs: list[int]) -> list[Self]:
        step = P.MAX_ACK_BATCH
        return [cls(tuple(seqs[i : i + step])) for i in range(0, len(seqs), step)]

    @staticmethod
    def seqs_of(frames: list[bytes]) -> list[int]:
        """The hot-path decoder (one ACK per DELIVER received): the seqs, no record."""
        if len(frames) != 2:
            expect_frames(frames, 2)
        seqs = unpack_map(frames[1], "ACK").get("seqs")
        if type(seqs) is not list or not all(type(s) is int for s in seqs):
            raise ProtocolViolation(Code.BAD_HEADER, "ACK field 'seqs' must be a list of ints")
        return seqs

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(tuple(cls.seqs_of(frames)))


@dataclass(frozen=True, slots=True)
class Nack:
    """A failed delivery: retried with backoff, or (`requeue` False) dead at once."""

    COMMAND: ClassVar[bytes] = P.NACK
    seq: int
    error: str = ""
    requeue: bool = True

    def frames(self) -> list[bytes]:
        body = {"seq": self.seq, "error": self.error[:512], "requeue": self.requeue}
        return [P.NACK, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "NACK")
        error = body.get("error", "")
        return cls(
            required_int(body, "seq", 0, _SEQ_MAX),
            error[:512] if isinstance(error, str) else "",
            body.get("requeue", True) is not False,
        )


@dataclass(frozen=True, slots=True)
class Request:
    """A request: a PUB-style header with `reply` (the requester's 1-64 char reply id,
    echoed as `to` in the reply) and `ttl_ms`, and the payload."""

    COMMAND: ClassVar[bytes] = P.REQ
    header: PubHeader
    reply: str
    ttl_ms: int
    header_raw: bytes
    payload: bytes

    def frames(self) -> list[bytes]:
        return [P.REQ, self.header_raw, self.payload]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        expect_frames(frames, 3)
        header_raw, payload = frames[1], frames[2]
        fields = unpack_map(header_raw)
        header = decode_pub_header(header_raw)
        reply = fields.get("reply")
        if not isinstance(reply, str) or not 0 < len(reply) <= 64:
            raise ProtocolViolation(
                Code.BAD_HEADER, "REQ field 'reply' must be 1-64 chars", id=header.msg_id
            )
        ttl = fields.get("ttl_ms", P.DEFAULT_REQUEST_TTL_MS)
        ttl = ttl if type(ttl) is int and 0 < ttl <= 3_600_000 else P.DEFAULT_REQUEST_TTL_MS
        return cls(header, reply, ttl, header_raw, payload)

    @classmethod
    def build(
        cls,
        msg_id: bytes,
        topic: str,
        reply: str,
        ttl_ms: int,
        payload: bytes,
        correlation_id: str | None = None,
    ) -> Self:
        """A requester's REQ (the client side): the header encoded once, here."""
        extra = {"reply": reply, "ttl_ms": ttl_ms}
        raw = encode_pub_header(msg_id, topic, correlation_id, extra=extra)
        return cls(PubHeader(msg_id, topic), reply, ttl_ms, raw, payload)


@dataclass(frozen=True, slots=True)
class Reply:
    """A responder's answer: a PUB-style header with `to` (the request's reply id) and,
    on failure, `err` instead of a result."""

    COMMAND: ClassVar[bytes] = P.REP
    header: PubHeader
    to: str
    error: str | None
    header_raw: bytes
    payload: bytes

    def frames(self) -> list[bytes]:
        return [P.REP, self.header_raw, self.payload]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        expect_frames(frames, 3)
        header_raw, payload = frames[1], frames[2]
        fields = unpack_map(header_raw)
        header = decode_pub_header(header_raw)
        to = fields.get("to")
        err = fields.get("err")
        return cls(
            header,
            to if isinstance(to, str) else "",
            err if isinstance(err, str) else None,
            header_raw,
            payload,
        )

    @classmethod
    def build(
        cls,
        msg_id: bytes,
        topic: str,
        to: str,
        payload: bytes,
        error: str | None = None,
        correlation_id: str | None = None,
    ) -> Self:
        """A responder's REP (the client side); `error` is cut to 1024 characters."""
        extra: dict[str, Any] = {"to": to}
        if error is not None:
            error = error[:1024]
            extra["err"] = error
        raw = encode_pub_header(msg_id, topic, correlation_id, extra=extra)
        return cls(PubHeader(msg_id, topic), to, error, raw, payload)


# -- platform commands -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    """Ask for the broker's statistics; `reset` starts a fresh latency window."""

    COMMAND: ClassVar[bytes] = P.STATS
    rid: int = 0
    reset: bool = False

    def frames(self) -> list[bytes]:
        return [P.STATS, pack({"rid": self.rid, "reset": self.reset})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        if len(frames) != 2:
            return cls()
        body = unpack_map(frames[1], "STATS")
        return cls(_rid(body), body.get("reset") is True)


@dataclass(frozen=True, slots=True)
class StatsOk:
    COMMAND: ClassVar[bytes] = P.STATSOK
    rid: int
    data: dict[str, Any]

    def frames(self) -> list[bytes]:
        return [P.STATSOK, pack({**self.data, "rid": self.rid})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "STATSOK", P.MAX_REPLY_BYTES)
        rid = _rid(body)
        body.pop("rid", None)
        return cls(rid, body)


DlqOp = Literal["list", "replay", "purge"]


@dataclass(frozen=True, slots=True)
class Dlq:
    """List, replay (`entry_id`) or purge the dead-letter queue: purge drops the entries
    `ids` names (those still there), every entry when `ids` is None (absent on the wire)."""

    COMMAND: ClassVar[bytes] = P.DLQ
    op: DlqOp
    entry_id: int = 0
    rid: int = 0
    ids: tuple[int, ...] | None = None

    def frames(self) -> list[bytes]:
        body: dict[str, Any] = {"op": self.op, "rid": self.rid}
        if self.op == "replay":
            body["id"] = self.entry_id
        if self.op == "purge" and self.ids is not None:
            body["ids"] = list(self.ids)
        return [P.DLQ, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "DLQ")
        op = body.get("op")
        if op == "replay":
            return cls("replay", required_int(body, "id", 1, _SEQ_MAX), _rid(body))
        if op == "purge" and "ids" in body:
            return cls("purge", 0, _rid(body), _int_list(body, "ids", "DLQ"))
        if op in ("list", "purge"):
            return cls(op, 0, _rid(body))
        raise ProtocolViolation(Code.BAD_HEADER, "DLQ field 'op' must be list, replay or purge")


@dataclass(frozen=True, slots=True)
class DlqOk:
    """`entries` + `dropped` (list), `replayed` (replay) or `purged` (purge)."""

    COMMAND: ClassVar[bytes] = P.DLQOK
    rid: int
    data: dict[str, Any]

    def frames(self) -> list[bytes]:
        return [P.DLQOK, pack({**self.data, "rid": self.rid})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "DLQOK", P.MAX_REPLY_BYTES)
        rid = _rid(body)
        body.pop("rid", None)
        return cls(rid, body)


# -- the event-stream link (platform services; docs/protocol.md §14) -------------------------


@dataclass(frozen=True, slots=True)
class EvSync:
    """A consumer's cursor: everything up to `wm` is taken (for persistence: stored and
    synced). The consumer is the session's platform identity."""

    COMMAND: ClassVar[bytes] = P.EVSYNC
    wm: int

    def frames(self) -> list[bytes]:
        return [P.EVSYNC, pack({"wm": self.wm})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "EVSYNC"), "wm", 0, _SEQ_MAX))


@dataclass(frozen=True, slots=True)
class EvSyncOk:
    """`next`: the seq the broker numbers next; `epoch`: its start (a new one: restarted).
    `restore` True: the broker waits for EVRESTORE before it serves apps."""

    COMMAND: ClassVar[bytes] = P.EVSYNCOK
    next: int
    epoch: int
    restore: bool = False

    def frames(self) -> list[bytes]:
        body = {"next": self.next, "epoch": self.epoch, "restore": self.restore}
        return [P.EVSYNCOK, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "EVSYNCOK")
        return cls(
            required_int(body, "next", 0, _SEQ_MAX),
            required_int(body, "epoch", 0, _SEQ_MAX),
            body.get("restore", False) is True,
        )


@dataclass(frozen=True, slots=True)
class EvAck:
    """The consumer's watermark moved to `wm` (also its heartbeat)."""

    COMMAND: ClassVar[bytes] = P.EVACK
    wm: int

    def frames(self) -> list[bytes]:
        return [P.EVACK, pack({"wm": self.wm})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "EVACK"), "wm", 0, _SEQ_MAX))


@dataclass(frozen=True, slots=True)
class EvFetch:
    """Re-send retained events from seq `first` (the consumer saw a gap)."""

    COMMAND: ClassVar[bytes] = P.EVFETCH
    first: int

    def frames(self) -> list[bytes]:
        return [P.EVFETCH, pack({"from": self.first})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        return cls(required_int(_body(frames, "EVFETCH"), "from", 1, _SEQ_MAX))


@dataclass(frozen=True, slots=True)
class EvData:
    """A batch of events: the PUB socket's `[EV, head, blob]` and the EVDATA re-send share
    the head (schema version, epoch, first seq) and blob layout (broker.events)."""

    COMMAND: ClassVar[bytes] = P.EVDATA
    head: bytes
    blob: bytes

    def frames(self) -> list[bytes]:
        return [P.EVDATA, self.head, self.blob]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        expect_frames(frames, 3)
        return cls(frames[1], frames[2])


@dataclass(frozen=True, slots=True)
class EvRestore:
    """One page of the durable state a recovering broker rebuilds, sent by persistence
    (which owns the store and the key ring) after EVSYNCOK asked for it.

    `sessions`: [app, session, [[sid, pattern]...]] of durable subscriptions; `deliveries`:
    [app, session, stored_seq, sids, sender, ts_ns, topic, msg_id, header, payload,
    sensitive] unacknowledged, in publish order; `dead_letters`: [entry_id, reason, app,
    session, dead_ns, attempts, error, stored_seq, sender, published_ns, topic, msg_id,
    header, payload, sensitive, sids]; `recent`: [sender, msg_id, seq, ts_ns] of recent
    messages, oldest first (resends are confirmed, not routed again). `done` ends the
    restore. `sids` are lists of ints; payloads are opened (never sealed); `sensitive`
    says the message was stored sealed. Pages are bounded (at most `RESTORE_PAGE_ROWS`
    rows and about `RESTORE_PAGE_BYTES`, so a page fits the broker's frame limit); a
    session's deliveries may span pages.
    """

    COMMAND: ClassVar[bytes] = EVRESTORE
    watermark: int
    sessions: tuple[tuple[str, str, dict[int, str]], ...] = ()
    deliveries: tuple[tuple[Any, ...], ...] = ()
    dead_letters: tuple[tuple[Any, ...], ...] = ()
    recent: tuple[tuple[str, bytes, int, int], ...] = ()
    done: bool = False

    def frames(self) -> list[bytes]:
        body = {
            "wm": self.watermark,
            "sessions": [[a, s, sorted(subs.items())] for a, s, subs in self.sessions],
            "deliveries": [list(d) for d in self.deliveries],
            "dead_letters": [list(d) for d in self.dead_letters],
            "recent": [list(r) for r in self.recent],
            "done": self.done,
        }
        return [EVRESTORE, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        expect_frames(frames, 2)
        body = unpack_map(frames[1], "EVRESTORE", P.MAX_REPLY_BYTES * 2)
        sessions: list[tuple[str, str, dict[int, str]]] = []
        for item in _list(body, "sessions"):
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], str)
                and isinstance(item[2], list)
                and all(
                    isinstance(pair, list)
                    and len(pair) == 2
                    and type(pair[0]) is int
                    and isinstance(pair[1], str)
                    for pair in item[2]
                )
            ):
                raise ProtocolViolation(Code.BAD_HEADER, "EVRESTORE session entry is malformed")
            sessions.append((item[0], item[1], {sid: pattern for sid, pattern in item[2]}))
        deliveries = tuple(
            _row(item, 11, "delivery", _DELIVERY_TYPES) for item in _list(body, "deliveries")
        )
        dead = tuple(
            _row(item, 16, "dead letter", _DEAD_TYPES) for item in _list(body, "dead_letters")
        )
        recent: list[tuple[str, bytes, int, int]] = []
        for item in _list(body, "recent"):
            row = _row(item, 4, "recent id")
            if not (
                isinstance(row[0], str)
                and isinstance(row[1], bytes)
                and type(row[2]) is int
                and type(row[3]) is int
            ):
                raise ProtocolViolation(Code.BAD_HEADER, "EVRESTORE recent id is malformed")
            recent.append((row[0], row[1], row[2], row[3]))
        return cls(
            required_int(body, "wm", 0, _SEQ_MAX),
            tuple(sessions),
            deliveries,
            dead,
            tuple(recent),
            body.get("done", False) is True,
        )


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ProtocolViolation(Code.BAD_HEADER, f"field {key!r} must be a list")
    return value


_S, _I, _B, _F = (str,), (int,), (bytes,), (bool,)
_SIDS = (bytes, list)
_DELIVERY_TYPES: Final = (_S, _S, _I, _SIDS, _S, _I, _S, _B, _B, _B, _F)
"""[app, session, stored_seq, sids, sender, ts_ns, topic, msg_id, header, payload, sensitive]"""
_DEAD_TYPES: Final = (_I, _S, _S, _S, _I, _I, _S, _I, _S, _I, _S, _B, _B, _B, _F, _SIDS)
"""[entry_id, reason, app, session, dead_ns, attempts, error, stored_seq, sender,
published_ns, topic, msg_id, header, payload, sensitive, sids]"""


def dead_letter_row(item: Sequence[Any]) -> tuple[Any, ...]:
    """`item` as an EVRESTORE dead-letter row, else ProtocolViolation: persistence checks a
    stored row with it before sending, so one bad row costs itself, not its page."""
    return _row(list(item), 16, "dead letter", _DEAD_TYPES)


def _row(
    item: Any, width: int, what: str, types: tuple[tuple[type, ...], ...] | None = None
) -> tuple[Any, ...]:
    if not isinstance(item, list) or len(item) != width:
        raise ProtocolViolation(Code.BAD_HEADER, f"EVRESTORE {what} must have {width} fields")
    if types is not None:
        for index, (value, allowed) in enumerate(zip(item, types, strict=True)):
            # bool is an int subclass: an int field takes no bool, a bool field no int
            if type(value) not in allowed:
                raise ProtocolViolation(
                    Code.BAD_HEADER, f"EVRESTORE {what} field {index} has the wrong type"
                )
    return tuple(item)


# -- the query socket (persistence; docs/protocol.md §15) ------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    """The last `last` stored messages of one topic."""

    COMMAND: ClassVar[bytes] = HISTORY
    topic: str
    last: int

    def frames(self) -> list[bytes]:
        return [HISTORY, pack({"topic": self.topic, "last": self.last})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "HISTORY")
        return cls(required_text(body, "topic"), required_int(body, "last", 1, MAX_HISTORY))


@dataclass(frozen=True, slots=True)
class Replay:
    """Stored messages matching `pattern` with since <= ts <= until, after seq `after`."""

    COMMAND: ClassVar[bytes] = REPLAY
    pattern: str
    since: int
    until: int | None = None
    after: int = 0

    def frames(self) -> list[bytes]:
        body: dict[str, Any] = {"pattern": self.pattern, "since": self.since}
        if self.until is not None:
            body["until"] = self.until
        if self.after:
            body["after"] = self.after
        return [REPLAY, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        body = _body(frames, "REPLAY")
        until = body.get("until")
        after = body.get("after", 0)
        return cls(
            required_text(body, "pattern"),
            required_int(body, "since", 0, _SEQ_MAX),
            until if type(until) is int else None,
            after if type(after) is int and after >= 0 else 0,
        )


StoredRow = tuple[int, int, str, bytes, bytes]
"""[seq, ts_ns, sender, header, payload] of one stored message (payload opened)."""


@dataclass(frozen=True, slots=True)
class Result:
    """One page of a query's answer; `done` False: ask again with `after`."""

    COMMAND: ClassVar[bytes] = RESULT
    messages: tuple[StoredRow, ...]
    after: int = 0
    done: bool = True

    def frames(self) -> list[bytes]:
        body = {"messages": [list(m) for m in self.messages], "after": self.after}
        body["done"] = self.done
        return [RESULT, pack(body)]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Self:
        expect_frames(frames, 2)
        body = unpack_map(frames[1], "RESULT", P.MAX_REPLY_BYTES * 2)
        rows: list[StoredRow] = []
        for item in _list(body, "messages"):
            if not (
                isinstance(item, list)
                and len(item) == 5
                and type(item[0]) is int
                and type(item[1]) is int
                and isinstance(item[2], str)
                and isinstance(item[3], bytes)
                and isinstance(item[4], bytes)
            ):
                raise ProtocolViolation(Code.BAD_HEADER, "RESULT message rows are malformed")
            rows.append((item[0], item[1], item[2], item[3], item[4]))
        after = body.get("after", 0)
        return cls(
            tuple(rows),
            after if type(after) is int else 0,
            body.get("done", True) is not False,
        )


Query = History | Replay


def decode_query(frames: list[bytes]) -> Query:
    """A query socket request; UNKNOWN_COMMAND for anything but HISTORY and REPLAY."""
    if len(frames) != 2 or frames[0] not in QUERY_COMMANDS:
        raise ProtocolViolation(Code.UNKNOWN_COMMAND, "send HISTORY or REPLAY with a body")
    return History.decode(frames) if frames[0] == HISTORY else Replay.decode(frames)


CONTROL_RECORDS: Final[dict[bytes, Any]] = {
    record.COMMAND: record
    for record in (
        Hello,
        Welcome,
        Ping,
        Pong,
        Bye,
        Error,
        Subscribe,
        SubscribeOk,
        Unsubscribe,
        UnsubscribeOk,
        Publish,
        Deliver,
        Confirm,
        Credit,
        Ack,
        Nack,
        Request,
        Reply,
        Stats,
        StatsOk,
        Dlq,
        DlqOk,
        EvSync,
        EvSyncOk,
        EvAck,
        EvFetch,
        EvData,
        EvRestore,
        History,
        Replay,
        Result,
    )
}
"""Every record by its command, for generic decoding (tests, fuzzers, tools)."""
