"""What an `AsyncBus` app reads: `AsyncSubscription`, a stream of `Message`s.

The asyncio twin of `clients.message.Subscription`: read with `await sub.get(timeout)` or
`async for message in sub`, or have the bus call `handler` for each message. The local
queue is bounded (`limit`); a delivery beyond it is counted in `overflowed` and nacked,
so the broker retries it later. Everything here runs on the bus's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from clients.message import Message

AsyncHandler = Callable[[Message], Any | Awaitable[Any]]
"""Called with each message; may be a plain function or a coroutine function."""


@dataclass(eq=False)
class AsyncSubscription:
    sid: int
    pattern: str
    handler: AsyncHandler | None = None
    limit: int = 100_000
    overflowed: int = 0
    durable: bool = False
    manual_ack: bool = False
    serve: bool = False
    active: bool = True
    _queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    _unsubscribe: Callable[[AsyncSubscription], Awaitable[None]] | None = None

    async def get(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to `timeout` seconds (None: until unsubscribed);
        None on timeout or at the end. Acknowledged when handed over, unless `manual_ack`."""
        try:
            message = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if message is None:  # the end: leave the marker for other readers
            self._queue.put_nowait(None)
            return None
        if not self.manual_ack:
            message.ack()
        return message

    def get_nowait(self) -> Message | None:
        try:
            message = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if message is None:
            self._queue.put_nowait(None)
            return None
        if not self.manual_ack:
            message.ack()
        return message

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            message = await self.get()
            if message is None:
                return
            yield message

    def pending(self) -> int:
        return self._queue.qsize()

    async def unsubscribe(self) -> None:
        if self._unsubscribe is not None:
            await self._unsubscribe(self)

    def offer(self, message: Message) -> bool:
        """Queue a delivery (the bus); False when the local queue is full."""
        return self.offer_all((message,)) == 0

    def offer_all(self, messages: Iterable[Message]) -> int:
        """Queue a batch of deliveries in order (the bus); each one beyond `limit` is
        counted in `overflowed` and nacked. Returns how many overflowed."""
        queue, limit = self._queue, self.limit
        overflowed = 0
        for message in messages:
            if queue.qsize() >= limit:
                overflowed += 1
                message.nack("the subscriber's local queue is full")
            else:
                queue.put_nowait(message)
        self.overflowed += overflowed
        return overflowed

    def end(self) -> None:
        """No more messages will come: wake every reader once the queue is read."""
        self.active = False
        self._queue.put_nowait(None)
