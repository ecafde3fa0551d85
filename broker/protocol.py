"""Wire-protocol constants, in one small module so the codec, the broker and every client agree.

The protocol is documented in docs/protocol.md; a change here is a change there.
"""

from typing import Final

PROTOCOL_VERSIONS: Final = (1, 2)
"""Versions this implementation speaks, oldest first. HELLO negotiates the highest common one.
Version 2 packs a batch into one frame: the broker sends a DELIVER as [DELIVER, packed]
(every frame is a pyzmq call on each side, so four per message cost more than the routing
itself); a PUB may be sent packed whatever the version (docs/protocol.md §3.5, §3.6)."""
PACKED_VERSION: Final = 2
"""The first version whose DELIVERs are packed."""

# Commands, client -> broker
HELLO: Final = b"HELLO"
SUB: Final = b"SUB"
UNSUB: Final = b"UNSUB"
PUB: Final = b"PUB"
PING: Final = b"PING"
BYE: Final = b"BYE"
STATS: Final = b"STATS"
ACK: Final = b"ACK"
NACK: Final = b"NACK"
DLQ: Final = b"DLQ"
REQ: Final = b"REQ"
REP: Final = b"REP"

# Commands, broker -> client
WELCOME: Final = b"WELCOME"
SUBOK: Final = b"SUBOK"
UNSUBOK: Final = b"UNSUBOK"
DELIVER: Final = b"DELIVER"
PONG: Final = b"PONG"
ERROR: Final = b"ERROR"
STATSOK: Final = b"STATSOK"
CONFIRM: Final = b"CONFIRM"
DLQOK: Final = b"DLQOK"
CREDIT: Final = b"CREDIT"
"""{n}: the session may send `n` more PUB messages (publish credit, docs/protocol.md §3.17)."""

# Commands of an event-stream consumer's link, consumer -> broker (EVENT_CONSUMERS only)
EVSYNC: Final = b"EVSYNC"
"""{wm}: register (or re-register) with cursor wm; from `$persistence`: everything up to wm
is stored, and a recovering broker asks for its durable state (EVSYNCOK restore)."""
EVACK: Final = b"EVACK"
"""{wm}: taken up to wm (for persistence: stored and synced, which releases CONFIRMs)."""
EVFETCH: Final = b"EVFETCH"
"""{from}: re-send retained events from seq `from` (a gap was seen)."""
EVRESTORE: Final = b"EVRESTORE"
"""persistence -> a recovering broker: one page of the durable state (broker.wire.EvRestore)."""
# ... and broker -> consumer
EVSYNCOK: Final = b"EVSYNCOK"
EVDATA: Final = b"EVDATA"
EVENT_COMMANDS: Final = frozenset({EVSYNC, EVACK, EVFETCH, EVRESTORE})

CLIENT_COMMANDS: Final = frozenset(
    {HELLO, SUB, UNSUB, PUB, PING, BYE, STATS, ACK, NACK, DLQ, REQ, REP}
)

# Limits a peer must respect; anything beyond them is a protocol error, never a crash.
MAX_HEADER_BYTES: Final = 8 * 1024
MAX_PAYLOAD_BYTES: Final = 1024 * 1024
MAX_FRAME_BYTES: Final = MAX_PAYLOAD_BYTES + 64 * 1024
"""Set as ZMQ_MAXMSGSIZE: libzmq disconnects a peer that sends a larger frame."""
MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
"""Largest broker answer (STATSOK, DLQOK, WELCOME) a client decodes."""
MAX_ACK_BATCH: Final = 512
"""Most sequence numbers a client puts in one ACK (the header must stay under 8 KiB)."""
MAX_CONFIRM_IDS: Final = 256
"""Most message ids one CONFIRM carries (16 bytes each: the header stays under 8 KiB)."""
MAX_PUB_BATCH: Final = 1024
"""Most (header, payload) pairs one PUB may carry."""
MAX_FRAMES: Final = 1 + 2 * MAX_PUB_BATCH
CLIENT_BATCH: Final = 128
"""Most publishes the Python client coalesces into one PUB: bounds in-broker latency per batch."""
MAX_TOPIC_BYTES: Final = 255
MAX_SUBSCRIPTIONS_PER_SESSION: Final = 10_000
MAX_SID: Final = 2**31 - 1

MESSAGE_ID_BYTES: Final = 16

# Reserved identities and topics
RESERVED_PREFIX: Final = "$"
SYS_TOPIC_PREFIX: Final = "$sys."
SUPERVISOR_ID: Final = "$supervisor"
CLI_ID: Final = "$cli"
PERSISTENCE_ID: Final = "$persistence"
AUDIT_ID: Final = "$audit"
GATEWAY_ID: Final = "$gateway"
TRACING_ID: Final = "$tracing"
EVENT_CONSUMERS: Final = frozenset({PERSISTENCE_ID, AUDIT_ID, GATEWAY_ID, TRACING_ID})
"""Platform services that may follow the event stream (EV* commands, the events socket)."""
ZAP_DOMAIN: Final = "plexus"
EVENTS_ZAP_DOMAIN: Final = "plexus.events"
"""ZAP domain of the events PUB socket: only EVENT_CONSUMERS with a valid credential."""

DEFAULT_HEARTBEAT_MS: Final = 2_000
DEFAULT_PEER_TIMEOUT_MS: Final = 10_000
DEFAULT_GRACE_MS: Final = 30_000
"""How long a disconnected session keeps its subscriptions and queues its messages."""
DEFAULT_SESSION: Final = "main"
REPLY_SID: Final = 0
"""Subscription id of replies delivered to a requester (never a real subscription)."""
DEFAULT_REQUEST_TTL_MS: Final = 60_000
BROKER_ID: Final = "$broker"
UNRESPONSIVE_TOPIC: Final = "$sys.apps.unresponsive"
EVENTS_ALERT_TOPIC: Final = "$sys.alerts.events"
"""Broker notice: an event-stream consumer fell behind the retention bound (then skipped)."""
LIFECYCLE_TOPIC_PREFIX: Final = "$sys.audit.apps."
"""The supervisor's lifecycle reports (`$sys.audit.apps.<kind>`), also Lifecycle events."""
METRICS_TOPIC: Final = "$sys.metrics.apps"
"""The supervisor's per-app resource samples."""
SUPERVISOR_CONTROL_TOPIC: Final = "$sys.supervisor.apps"
"""The supervisor serves app commands (start, stop, restart) here, as requests."""
STORAGE_ALERT_TOPIC: Final = "$sys.alerts.storage"
"""Persistence's notice that storage is failing or behind."""
