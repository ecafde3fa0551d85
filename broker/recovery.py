"""A restarted broker rebuilds what must survive it from the pages persistence sends.

The broker never opens the store nor the key ring: persistence owns both. When the
broker's EVSYNCOK asks for a restore, persistence reads the store and sends the durable
state as EVRESTORE pages (`broker.wire.EvRestore`, docs/protocol.md §14.5), payloads of
sensitive messages already opened. `apply_restore` turns one page into router state; it
is pure (no file, no socket, no key) and the server calls it for every page, ending
recovery on the page marked `done`:

- the watermark: event numbering continues after it;
- durable sessions and their unacknowledged deliveries (in publish order): gathered
  page by page, since one session's backlog may span many pages, and restored, detached
  and waiting for their app, when the last page arrives;
- the dead-letter queue, entry ids kept;
- the ids of recent messages, oldest first, so a publisher resending what was stored
  before the crash is confirmed without the message being routed twice.

A row that does not have the documented types, names a session the broker would refuse at
HELLO (broker.names: a NUL, a control character; an older broker let them through) or holds
a subscription no SUB could have made (a bad sid or pattern) is skipped, logged
(`recovery-row-malformed`, naming the app and session) and counted in the report's
`skipped`, never fatal: the broker recovers all it can.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker import protocol as P
from broker.codec import encode_sids
from broker.delivery import Delivery
from broker.dlq import DeadLetter
from broker.errors import ProtocolViolation
from broker.logs import event
from broker.names import MAX_SESSION_NAME, session_name_problem
from broker.topics import pattern_tokens
from broker.wire import EvRestore

log = logging.getLogger("plexus.broker")

SessionKey = tuple[str, str]

_DELIVERY_TYPES: Final = (str, str, int, list, str, int, str, bytes, bytes, bytes, bool)
"""app, session, stored_seq, sids, sender, ts_ns, topic, msg_id, header, payload, sensitive"""
_DELIVERY_SIDS: Final = 3
_DEAD_LETTER_TYPES: Final = (
    *(int, str, str, str, int, int, str, int),
    *(str, int, str, bytes, bytes, bytes, bool, list),
)
"""entry_id, reason, app, session, dead_ns, attempts, error, stored_seq,
sender, published_ns, topic, msg_id, header, payload, sensitive, sids"""
_DEAD_LETTER_SIDS: Final = 15


class _Numbering(Protocol):
    def start_after(self, seq: int) -> None: ...


class _DeadLetters(Protocol):
    def restore(self, entry: DeadLetter) -> None: ...


class Restorable(Protocol):
    """What recovery needs of the router (broker.router.Router has it)."""

    @property
    def stream(self) -> _Numbering: ...

    @property
    def dlq(self) -> _DeadLetters: ...

    def restore_session(
        self,
        key: SessionKey,
        subscriptions: dict[int, str],
        deliveries: list[Delivery],
        now_ns: int,
    ) -> bool: ...

    def remember_published(
        self, sender: str, msg_id: bytes, stored_seq: int, stored_ts_ns: int
    ) -> None: ...


@dataclass
class RecoveryReport:
    """What a restore brought back; one per recovery, passed to every page's call."""

    watermark: int = 0
    pages: int = 0
    sessions: int = 0
    subscriptions: int = 0
    deliveries: int = 0
    dead_letters: int = 0
    recent_ids: int = 0
    skipped: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        # not a field: asdict(report) stays the counters the broker logs
        self._subscriptions: dict[SessionKey, dict[int, str]] = {}
        self._deliveries: dict[SessionKey, list[Delivery]] = {}
        self._refused: set[SessionKey] = set()


def apply_restore(router: Restorable, page: EvRestore, now_ns: int, report: RecoveryReport) -> None:
    """Apply one EVRESTORE page to `router`; on the `done` page, restore the sessions."""
    report.pages += 1
    report.watermark = max(report.watermark, page.watermark)
    router.stream.start_after(page.watermark)
    for app, session, subscriptions in page.sessions:
        if not _named((app, session), "session", report):
            continue
        valid = {
            sid: pattern
            for sid, pattern in subscriptions.items()
            if _subscription_ok((app, session), sid, pattern, report)
        }
        report._subscriptions.setdefault((app, session), {}).update(valid)
    for row in page.deliveries:
        if not _typed(row, _DELIVERY_TYPES, _DELIVERY_SIDS, "delivery", report):
            continue
        if not _named((row[0], row[1]), "delivery", report):
            continue
        key = (row[0], row[1])
        report._deliveries.setdefault(key, []).append(_delivery(row))
    for row in page.dead_letters:
        if _typed(row, _DEAD_LETTER_TYPES, _DEAD_LETTER_SIDS, "dead letter", report):
            router.dlq.restore(_dead_letter(row))
            report.dead_letters += 1
    for sender, msg_id, seq, ts_ns in page.recent:
        router.remember_published(sender, msg_id, seq, ts_ns)
        report.recent_ids += 1
    if page.done:
        _restore_sessions(router, now_ns, report)


def _restore_sessions(router: Restorable, now_ns: int, report: RecoveryReport) -> None:
    for key, subscriptions in report._subscriptions.items():
        deliveries = report._deliveries.pop(key, [])
        if not subscriptions:  # every one was malformed: its deliveries are orphans
            report._deliveries[key] = deliveries
            continue
        if router.restore_session(key, subscriptions, deliveries, now_ns):
            report.sessions += 1
            report.subscriptions += len(subscriptions)
            report.deliveries += len(deliveries)
        else:
            report.skipped += len(deliveries)
            event(log, "recovery-app-gone", logging.WARNING, app=key[0], session=key[1])
    for key, orphans in report._deliveries.items():  # pending without a durable subscription
        report.skipped += len(orphans)
        event(log, "recovery-orphan-deliveries", logging.WARNING, app=key[0], session=key[1])
    report._subscriptions.clear()
    report._deliveries.clear()
    report.done = True


def _named(key: SessionKey, what: str, report: RecoveryReport) -> bool:
    """Whether a row's (app, session) may be a session key (broker.names); a refused key
    is logged once, naming it, and each of its rows is counted as skipped."""
    app, session = key
    problem = session_name_problem(session)
    if problem is None and (not app or not app.isprintable() or len(app) > MAX_SESSION_NAME):
        problem = f"app id {app!r} is not 1-{MAX_SESSION_NAME} printable characters"
    if problem is None:
        return True
    report.skipped += 1
    if key not in report._refused:
        report._refused.add(key)
        event(
            log,
            "recovery-row-malformed",
            logging.ERROR,
            what=what,
            app=app,
            session=session,
            problem=problem,
        )
    return False


def _subscription_ok(key: SessionKey, sid: int, pattern: str, report: RecoveryReport) -> bool:
    """Whether a stored durable subscription has a sid and a pattern a SUB could have made."""
    problem = None if 0 < sid <= P.MAX_SID else f"sid {sid} is out of range"
    if problem is None:
        try:
            pattern_tokens(pattern)
        except ProtocolViolation as exc:
            problem = exc.detail
    if problem is None:
        return True
    report.skipped += 1
    event(
        log,
        "recovery-row-malformed",
        logging.ERROR,
        what="subscription",
        app=key[0],
        session=key[1],
        sid=sid,
        problem=problem,
    )
    return False


def _typed(
    row: tuple[Any, ...], types: tuple[type, ...], sids_at: int, what: str, report: RecoveryReport
) -> bool:
    """Whether `row` has the documented field types (sids: a list of ints)."""
    ok = (
        len(row) == len(types)
        and all(type(value) is kind for value, kind in zip(row, types, strict=True))
        and all(type(sid) is int for sid in row[sids_at])
    )
    if not ok:
        report.skipped += 1
        event(log, "recovery-row-malformed", logging.ERROR, what=what, fields=len(row))
    return ok


def _delivery(row: tuple[Any, ...]) -> Delivery:
    _app, _session, seq, sids, sender, ts_ns, topic, msg_id, header, payload, sensitive = row
    packed = encode_sids(tuple(sids))
    return Delivery(
        0,
        packed,
        sender,
        ts_ns,
        topic,
        msg_id,
        header,
        payload,
        stored_seq=seq,
        durable_sids=packed,
        sensitive=sensitive,
    )


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    (entry_id, reason, app, session, dead_ns, attempts, error, stored_seq) = row[:8]
    (sender, published_ns, topic, msg_id, header, payload, sensitive, sids) = row[8:]
    delivery = Delivery(
        0,
        encode_sids(tuple(sids)),
        sender,
        published_ns,
        topic,
        msg_id,
        header,
        payload,
        attempt=attempts,
        last_error=error,
        stored_seq=stored_seq,
        sensitive=sensitive,
    )
    return DeadLetter(entry_id, reason, app, session, dead_ns, delivery)
