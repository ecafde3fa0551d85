"""The DLQ command (platform identities only): list, replay one entry, purge chosen ones or all.

A replayed dead letter goes back to its session when that still exists (tracked as
pending again for a durable subscription), else it is routed by topic afresh. Replays and
purges are events naming the operator who asked (`actor`), for the audit trail; every
answer echoes the request's `rid`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.codec import decode_sids
from broker.delivery import Delivery
from broker.errors import Code, PermissionViolation, ProtocolViolation
from broker.event_records import DlqPurged, DlqReplayed
from broker.wire import Dlq, DlqOk

if TYPE_CHECKING:
    from broker.dlq import DeadLetter
    from broker.router import Outbound, Router
    from broker.sessions import Session, SessionKey


class DeadLetterCommands:
    """The DLQ command over the router's dead-letter queue."""

    def __init__(self, core: Router) -> None:
        self._core = core

    def handle(self, session: Session, frames: list[bytes], now_ns: int) -> list[Outbound]:
        core = self._core
        if not session.authorizer.platform:
            raise PermissionViolation(Code.COMMAND_DENIED, "DLQ is for platform identities")
        command = Dlq.decode(frames)
        peer = session.peer
        assert peer is not None
        dlq = core.dlq
        actor = session.app_id
        if command.op == "list":
            listing = {"entries": [e.describe() for e in dlq.entries()], "dropped": dlq.dropped}
            return [(peer, DlqOk(command.rid, listing).frames())]
        if command.op == "purge":
            ids = dlq.purge(command.ids)
            if ids:
                core.emit(DlqPurged(ids, actor))
            return [(peer, DlqOk(command.rid, {"purged": len(ids)}).frames())]
        entry = dlq.take(command.entry_id)
        if entry is None:
            raise ProtocolViolation(
                Code.UNKNOWN_DLQ_ENTRY, f"no dead letter {command.entry_id}", rid=command.rid
            )
        answer = (peer, DlqOk(command.rid, {"replayed": command.entry_id}).frames())
        return [answer, *self._replay(entry, actor, now_ns)]

    def _replay(self, entry: DeadLetter, actor: str, now_ns: int) -> list[Outbound]:
        """Deliver a dead letter again: to its session if it still exists, else by topic."""
        core = self._core
        d = entry.delivery
        key: SessionKey = (entry.app_id, entry.session)
        target = core.sessions.by_key.get(key)
        if target is None:
            core.emit(DlqReplayed(entry.entry_id, entry.app_id, entry.session, 0, b"", actor))
            return core.route_again(d, now_ns)
        fresh = Delivery(
            core.next_delivery_seq(),
            d.sids,
            d.sender,
            d.timestamp_ns,
            d.topic,
            d.msg_id,
            d.header,
            d.payload,
            stored_seq=d.stored_seq,
            sensitive=d.sensitive,
        )
        if d.stored_seq and not target.mailbox.auto_ack:
            fresh.durable_sids = core.subscriptions.durable_sids(key, decode_sids(d.sids))
        stored = d.stored_seq if fresh.durable_sids else 0
        core.emit(
            DlqReplayed(
                entry.entry_id, entry.app_id, entry.session, stored, fresh.durable_sids, actor
            )
        )
        return core.enqueue(target, fresh, now_ns)
