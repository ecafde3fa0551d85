"""The persistence service's query socket: HISTORY and REPLAY answered from the store.

The protocol is the wire module's (`broker.wire.History`, `Replay`, `Result`,
`decode_query`; docs/protocol.md §15). What this adds is the policy: an app may read what
its subscribe permissions allow (the manifests, through `ManifestCatalog`), replay pages
are bounded by `PAGE_MESSAGES` and `PAGE_BYTES`, and sealed payloads are opened for the
reader; a record that does not open makes the whole answer an ERROR (502/504), never a
partial page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from broker import wire
from broker.catalog import ManifestCatalog
from broker.errors import Code, WireError
from broker.permissions import Authorizer, permissions_of
from broker.topics import is_literal, pattern_matches, pattern_tokens, validate_topic
from persistence.errors import storage_failure
from persistence.sealing import open_message
from persistence.segments import StoredMessage
from persistence.store import MessageStore
from security.keyring import KeyRing, SealedRecordError

log = logging.getLogger("plexus.persistence")

_QUERIES_PER_TURN = 8


class QueryAnswers:
    """Answers queries for one store; `serve(socket)` takes what waits on the ROUTER."""

    def __init__(
        self,
        messages: MessageStore,
        keys: KeyRing,
        catalog: ManifestCatalog,
        identity: Callable[[str], str | None] = lambda grant: grant,
    ) -> None:
        self._messages = messages
        self._keys = keys
        self._catalog = catalog
        self._identity = identity
        """Grant id (the connection's ZAP User-Id) -> app id; None: revoked."""

    def serve(self, query: zmq.Socket[bytes]) -> None:
        """Answer up to a few waiting queries (the loop has other sockets to serve)."""
        for _ in range(_QUERIES_PER_TURN):
            try:
                first = query.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer = first.bytes
            frames = query.recv_multipart(copy=False)
            user_id = frames[0].get("User-Id")
            app_id = (self._identity(user_id) if isinstance(user_id, str) else None) or ""
            query.send_multipart([peer, *self.answer(app_id, [f.bytes for f in frames])])

    def answer(self, app_id: str, frames: list[bytes]) -> list[bytes]:
        """The reply frames to one query from `app_id` (RESULT or ERROR)."""
        try:
            return self._result(app_id, wire.decode_query(frames)).frames()
        except WireError as exc:
            return wire.Error.of(exc).frames()
        except Exception:  # a bug or a broken store costs one answer, never the service
            log.exception("query failed for %s", app_id)
            failed = wire.Error.for_code(
                Code.INTERNAL, "the persistence service failed on this query"
            )
            return failed.frames()

    def _result(self, app_id: str, query: wire.Query) -> wire.Result:
        authorizer = Authorizer(app_id, permissions_of(app_id, self._catalog.permissions))
        if isinstance(query, wire.History):
            validate_topic(query.topic)
            authorizer.check_subscribe(query.topic)
            found = self._messages.history(query.topic, query.last)
            return wire.Result(tuple(self._row(m) for m in found), done=True)
        pattern_tokens(query.pattern)
        authorizer.check_subscribe(query.pattern)
        return self._replay_page(query)

    def _replay_page(self, query: wire.Replay) -> wire.Result:
        rows: list[wire.StoredRow] = []
        size = 0
        last_seq = query.after
        literal = query.pattern if is_literal(query.pattern) else None
        scan = self._messages.scan(query.since, query.after, _matcher(query.pattern), literal)
        for message in scan:
            if query.until is not None and message.ts_ns > query.until:
                return wire.Result(tuple(rows), last_seq, done=True)
            rows.append(self._row(message))
            last_seq = message.seq
            size += len(message.payload) + len(message.header)
            if len(rows) >= wire.PAGE_MESSAGES or size >= wire.PAGE_BYTES:
                return wire.Result(tuple(rows), last_seq, done=False)
        return wire.Result(tuple(rows), last_seq, done=True)

    def _row(self, message: StoredMessage) -> wire.StoredRow:
        try:
            header, payload = open_message(self._keys, message)
        except SealedRecordError as exc:
            raise storage_failure(exc) from exc
        return (message.seq, message.ts_ns, message.sender, header, payload)


def _matcher(pattern: str) -> Callable[[str], bool]:
    if is_literal(pattern):
        return pattern.__eq__
    return lambda topic: pattern_matches(pattern, topic)
