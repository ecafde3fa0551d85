"""TRANSITIONAL, deleted in this branch's last commit: the query protocol now lives in
broker.wire (§15); this re-export only keeps clients/store.py importable until the client
engineer's switch to broker.wire is merged."""

from broker.protocol import ERROR
from broker.wire import (
    HISTORY,
    MAX_HISTORY,
    PAGE_BYTES,
    PAGE_MESSAGES,
    QUERY_COMMANDS,
    REPLAY,
    RESULT,
)

COMMANDS = QUERY_COMMANDS
__all__ = [
    "COMMANDS",
    "ERROR",
    "HISTORY",
    "MAX_HISTORY",
    "PAGE_BYTES",
    "PAGE_MESSAGES",
    "REPLAY",
    "RESULT",
]
