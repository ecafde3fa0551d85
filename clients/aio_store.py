"""History and replay for `AsyncBus`: the query socket (§15) on zmq.asyncio.

The same requests, answers and rules as `clients.store` (the wire records History,
Replay and Result; one request outstanding at a time, here under an asyncio lock; the
socket dropped after a timeout so a late answer is never taken for the next request's).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from broker.wire import History, Replay, Result
from clients.message import Message
from clients.store import Query, decoded_answer, no_answer, query_socket, stored_message


class AsyncStoreClient:
    """One app's connection to the query socket, for one event loop."""

    def __init__(
        self, endpoint: str, app_id: str, token: str, context: zmq.asyncio.Context
    ) -> None:
        self._endpoint = endpoint
        self._app_id = app_id
        self._token = token
        self._context = context
        self._lock = asyncio.Lock()
        self._socket: Any = None

    async def query(self, request: Query, timeout: float) -> Result:
        """One request and its answer."""
        async with self._lock:
            if self._socket is None:
                self._socket = query_socket(
                    self._context, self._endpoint, self._app_id, self._token
                )
            sock = self._socket
            await sock.send_multipart(request.frames())
            if not await sock.poll(int(timeout * 1000), zmq.POLLIN):
                sock.close(linger=0)
                self._socket = None
                raise no_answer(timeout)
            frames: list[bytes] = await sock.recv_multipart()
        return decoded_answer(frames)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def history(self, topic: str, last: int, timeout: float) -> list[Message]:
        page = await self.query(History(topic, last), timeout)
        return [stored_message(row) for row in page.messages]

    async def replay(
        self, pattern: str, since_ns: int, until_ns: int | None, timeout: float
    ) -> AsyncIterator[Message]:
        after = 0
        while True:
            page = await self.query(Replay(pattern, since_ns, until_ns, after), timeout)
            for row in page.messages:
                yield stored_message(row)
            after = page.after or after
            if page.done:
                return
