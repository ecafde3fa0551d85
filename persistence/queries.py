"""The query protocol of the persistence service's socket (`ipc://$RUN/store`).

A client (the Python `Bus`, the CLI) connects a DEALER with the same PLAIN credential it
uses for the bus and sends `[command, msgpack body]`; the service answers one
`[RESULT, msgpack body]` or `[ERROR, error body]` (the bus's error bodies and codes).

    HISTORY {topic, last}                    -> RESULT {messages, done: true}
    REPLAY  {pattern, since, until?, after?} -> RESULT {messages, after, done}

Replay is paged so nothing has to fit in memory on either side: each RESULT carries at
most `PAGE_MESSAGES` messages (and about `PAGE_BYTES`), the client asks for the next page
with `after` = the last seq it received, and `done` says the range is exhausted. `since`
and `until` are broker timestamps in ns, `since` inclusive (>=), `until` inclusive.
A message is `[seq, ts_ns, sender, header, payload]`: the publisher's header as sent, the
payload opened if it was stored encrypted.
"""

from __future__ import annotations

from typing import Final

HISTORY: Final = b"HISTORY"
REPLAY: Final = b"REPLAY"
RESULT: Final = b"RESULT"
ERROR: Final = b"ERROR"
COMMANDS: Final = frozenset({HISTORY, REPLAY})

PAGE_MESSAGES: Final = 1000
PAGE_BYTES: Final = 4 * 2**20
MAX_HISTORY: Final = 100_000
