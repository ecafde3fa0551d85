"""The broker's statistics: counters, the STATS command, and the snapshot it answers with.

Counters only ever grow (since start); `snapshot` turns them and the current sizes
(sessions, queues, DLQ, the event stream's consumers) into plain data for STATS and
`plexus status`. The answer echoes the request's `rid` so concurrent callers never take
each other's answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.errors import Code, PermissionViolation
from broker.wire import Stats, StatsOk

if TYPE_CHECKING:
    from broker.router import Outbound, Router
    from broker.sessions import Session

ExtraStats = Callable[[bool], dict[str, Any]]
"""The server's own figures (latency, CPU, uptime); the flag resets the latency window."""


@dataclass(slots=True)
class RouterStats:
    """Counters since start."""

    published: int = 0
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    duplicates: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    sessions_opened: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    discarded_on_close: int = 0
    """Deliveries a session still held when it closed cleanly (BYE): dropped, not dead."""
    unresponsive: int = 0
    undeliverable: int = 0
    denied: int = 0


def stats_command(
    core: Router, session: Session, frames: list[bytes], now_ns: int
) -> list[Outbound]:
    """STATS from a platform identity: the snapshot, echoing `rid`."""
    if not session.authorizer.platform:
        raise PermissionViolation(Code.COMMAND_DENIED, "STATS is for platform identities")
    request = Stats.decode(frames)
    assert session.peer is not None
    return [(session.peer, StatsOk(request.rid, snapshot(core, now_ns, request.reset)).frames())]


def snapshot(core: Router, now_ns: int, reset: bool = False) -> dict[str, Any]:
    """Plain-data statistics; `reset` restarts the server's latency measurement."""
    apps: dict[str, dict[str, Any]] = {}
    queued = 0
    sessions = core.sessions
    for session in sessions.by_key.values():
        entry = apps.setdefault(
            session.app_id, {"sessions": 0, "last_seen_s_ago": None, "queued": 0}
        )
        entry["queued"] += len(session.mailbox)
        queued += len(session.mailbox)
        if session.peer is None:
            continue
        entry["sessions"] += 1
        age = round((now_ns - session.last_seen_ns) / 1e9, 1)
        if entry["last_seen_s_ago"] is None or age < entry["last_seen_s_ago"]:
            entry["last_seen_s_ago"] = age
    stats = core.stats
    stream = core.stream
    data: dict[str, Any] = {
        "sessions": len(sessions.by_peer),
        "sessions_detached": len(sessions.by_key) - len(sessions.by_peer),
        "apps": apps,
        "subscriptions": len(core.subscriptions),
        "published": stats.published,
        "delivered": stats.delivered,
        "acked": stats.acked,
        "retried": stats.retried,
        "duplicates": stats.duplicates,
        "queued": queued,
        "dlq_size": len(core.dlq),
        "dlq_dropped": core.dlq.dropped,
        "dlq_by_reason": dict(core.dlq.by_reason),
        "discarded_on_close": stats.discarded_on_close,
        "undeliverable": stats.undeliverable,
        "denied": stats.denied,
        "errors": {str(k): v for k, v in sorted(stats.errors.items())},
        "sessions_opened": stats.sessions_opened,
        "sessions_resumed": stats.sessions_resumed,
        "sessions_expired": stats.sessions_expired,
        "unresponsive": stats.unresponsive,
        "pending_requests": len(core.requests),
        "flow_held": len(core.flow.held),
        "flow_holds": core.flow.holds,
        "flow_granted": core.flow.granted,
        "seq": core.delivery_seq,
        "events": {
            "last_seq": stream.last_seq,
            "stored_watermark": stream.watermark,
            "backlog_bytes": stream.backlog_bytes,
            "retained": stream.retained,
            "confirms_waiting": stream.confirms_waiting,
            "consumers": dict(stream.cursors),
        },
    }
    if core.extra_stats is not None:
        data.update(core.extra_stats(reset))
    return data
