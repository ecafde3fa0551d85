"""A started nats-server and one nats-py connection on an event loop of its own.

The single-publisher sections (confirms, publish calls) time nats-py from plain code,
one call at a time, as they time the threaded `Bus`: this keeps the loop, runs each
coroutine to completion on it, and closes connection, loop and server in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from perf.systems import BrokerHandle

T = TypeVar("T")


class NatsSession:
    """`server` (already started) and a connection to it; the server is stopped if the
    connection cannot be made."""

    def __init__(self, server: BrokerHandle) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        try:
            self.nc: Any = self.loop.run_until_complete(self._connect())
        except BaseException:
            self.loop.close()
            server.stop()
            raise

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(self.server.endpoint, allow_reconnect=False, connect_timeout=10)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine on the session's loop, to completion."""
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        """Close the connection, the loop, then stop the server; never raises from the
        close of a benchmark peer (a failure there changes nothing, the server stops)."""
        try:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(asyncio.wait_for(self.nc.close(), 5.0))
        finally:
            self.loop.close()
            self.server.stop()
