"""The same integration tests with both drivers of the client core, `Bus` and `AsyncBus`.

A real broker process, real ipc sockets. `AsyncBus` runs on an event loop in a helper
thread behind a small blocking facade (`AsyncDriver`) with `Bus`'s method names, so each
test body is written once and runs against both. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from clients.aio import AsyncBus, AsyncSubscription
from clients.bus import (
    Bus,
    BusError,
    DeliveryError,
    Message,
    NoResponders,
    PermissionDenied,
    RequestTimeout,
)
from tests.conftest import BrokerHandle, wait_for

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop in a daemon thread; `run` waits for one coroutine, bounded."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class AsyncSub:
    def __init__(self, loop: LoopThread, sub: AsyncSubscription) -> None:
        self._loop, self.sub = loop, sub

    def get(self, timeout: float | None = None) -> Message | None:
        return self._loop.run(self.sub.get(timeout))

    def unsubscribe(self) -> None:
        self._loop.run(self.sub.unsubscribe())


class AsyncDriver:
    """`AsyncBus` behind `Bus`'s blocking method names (for shared test bodies)."""

    def __init__(self, loop: LoopThread, bus: AsyncBus) -> None:
        self._loop, self.bus = loop, bus

    def publish(self, topic: str, data: Any, **kwargs: Any) -> str:
        return self._loop.run(self.bus.publish(topic, data, **kwargs))

    def publish_nowait(self, topic: str, data: Any, **kwargs: Any) -> str:
        async def call() -> str:
            return self.bus.publish_nowait(topic, data, **kwargs)

        return self._loop.run(call())

    def flush(self, timeout: float = 30.0) -> None:
        self._loop.run(self.bus.flush(timeout))

    def subscribe(self, pattern: str, handler: Any = None, **kwargs: Any) -> AsyncSub:
        return AsyncSub(self._loop, self._loop.run(self.bus.subscribe(pattern, handler, **kwargs)))

    def serve(self, pattern: str, handler: Any) -> AsyncSub:
        return AsyncSub(self._loop, self._loop.run(self.bus.serve(pattern, handler)))

    def request(self, topic: str, data: Any, timeout: float = 5.0, **kwargs: Any) -> Message:
        return self._loop.run(self.bus.request(topic, data, timeout, **kwargs))

    def broker_stats(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._loop.run(self.bus.broker_stats(timeout))

    def dead_letters(self, timeout: float = 5.0) -> dict[str, Any]:
        return self._loop.run(self.bus.dead_letters(timeout))

    def next_error(self, timeout: float = 5.0) -> BusError:
        return self._loop.run(asyncio.wait_for(self.bus.errors.get(), timeout))

    @property
    def reconnects(self) -> int:
        return self.bus.reconnects

    def close(self) -> None:
        self._loop.run(self.bus.close(0.5))


class BusDriver:
    """`Bus` itself, plus the one helper the facade needs (`next_error`)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    def next_error(self, timeout: float = 5.0) -> BusError:
        return self.bus.errors.get(timeout=timeout)

    def close(self) -> None:
        self.bus.close(0.5)


Connect = Callable[..., Any]


@pytest.fixture(params=["Bus", "AsyncBus"])
def connect(request: pytest.FixtureRequest, broker: BrokerHandle) -> Iterator[Connect]:
    """connect(app_id, **kwargs) -> a driver of the parametrized kind, closed at the end."""
    loop = LoopThread() if request.param == "AsyncBus" else None
    made: list[Any] = []

    def make(app_id: str, **kwargs: Any) -> Any:
        kwargs.setdefault("session", f"drv-{len(made)}")
        token = broker.credentials.mint(app_id)
        if loop is None:
            driver: Any = BusDriver(Bus.connect(broker.endpoint, app_id, token, **kwargs))
        else:
            bus = loop.run(AsyncBus.connect(broker.endpoint, app_id, token, **kwargs))
            driver = AsyncDriver(loop, bus)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        with contextlib.suppress(Exception):  # a killed broker: closing may time out
            driver.close()
    if loop is not None:
        loop.stop()


def test_publish_subscribe_ack_with_broker_stamped_sender(connect: Connect) -> None:
    pub, sub_bus = connect("pub"), connect("sub")
    sub = sub_bus.subscribe("market.*.prices")
    msg_id = pub.publish("market.AAPL.prices", {"px": 187.2}, correlation_id="c-1", confirm=True)
    message = sub.get(timeout=5)
    assert message is not None
    assert (message.id, message.topic, message.data) == (
        msg_id,
        "market.AAPL.prices",
        {"px": 187.2},
    )
    assert (message.sender, message.correlation_id, message.attempt) == ("pub", "c-1", 1)
    for i in range(300):  # more than the broker's window: only flows if acks go back
        pub.publish_nowait("market.AAPL.prices", i)
    pub.flush(10)
    got = [sub.get(timeout=5) for _ in range(300)]
    assert [m.data for m in got if m is not None] == list(range(300))


def test_handler_subscription(connect: Connect) -> None:
    seen: list[Any] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        seen.append(message.data)
        if len(seen) == 3:
            done.set()

    connect("sub").subscribe("market.>", handler)
    pub = connect("pub")
    for i in range(3):
        pub.publish("market.x", i, confirm=True)
    assert done.wait(5)
    assert seen == [0, 1, 2]


def test_confirm_and_refusals(connect: Connect) -> None:
    pub = connect("pub")
    pub.publish("market.ok", 1, confirm=True)
    with pytest.raises(PermissionDenied) as denied:
        pub.publish("news.headlines", "x", confirm=True)
    assert denied.value.code == 300
    pub.publish("news.other", "x")  # fire and forget: reported on errors
    assert pub.next_error(5).code == 300
    pub.publish("market.ok", 2, confirm=True)


def test_wildcards(connect: Connect) -> None:
    patterns = ["market.>", "market.*.prices", "market.AAPL.*", "market.MSFT.>"]
    subs = [(p, connect("sub").subscribe(p)) for p in patterns]
    pub = connect("pub")
    topics = ["market.AAPL.prices", "market.MSFT.prices", "market.AAPL.trades", "market.GOOG"]
    for topic in topics:
        pub.publish(topic, topic, confirm=True)
    from broker.topics import pattern_matches

    for pattern, sub in subs:
        want = [t for t in topics if pattern_matches(pattern, t)]
        got = [sub.get(timeout=5) for _ in want]
        assert [m.topic for m in got if m is not None] == want, pattern
        assert sub.get(timeout=0.05) is None


def test_request_reply(connect: Connect, broker: BrokerHandle) -> None:
    broker.manifest("quoter", '[permissions]\nsubscribe = ["pricing.>"]\n')
    broker.manifest("trader", '[permissions]\nrequest = ["pricing.>", "slow.>"]\n')
    broker.manifest("sleepy", '[permissions]\nsubscribe = ["slow.>"]\n')

    def quote(message: Message) -> dict[str, Any]:
        if message.data["sym"] == "BAD":
            raise ValueError("unknown symbol")
        return {"sym": message.data["sym"], "asked_by": message.sender}

    connect("quoter").serve("pricing.>", quote)
    trader = connect("trader")
    reply = trader.request("pricing.quote", {"sym": "AAPL"}, timeout=5, correlation_id="q-1")
    assert reply.data == {"sym": "AAPL", "asked_by": "trader"}
    assert reply.sender == "quoter" and reply.correlation_id == "q-1"
    with pytest.raises(DeliveryError, match="unknown symbol"):
        trader.request("pricing.quote", {"sym": "BAD"}, timeout=5)
    with pytest.raises(NoResponders):
        trader.request("slow.op", {}, timeout=5)
    release = threading.Event()
    connect("sleepy").serve("slow.>", lambda m: release.wait(0.2) and None)
    with pytest.raises(RequestTimeout):
        trader.request("slow.op", {}, timeout=0.1)
    release.set()


def test_reconnect_after_broker_restart(connect: Connect, broker: BrokerHandle) -> None:
    sub_bus = connect("sub", heartbeat_ms=200)
    sub = sub_bus.subscribe("market.>")
    broker.kill()
    broker.start()
    pub = connect("pub")

    def delivered() -> bool:
        pub.publish("market.after", "back", confirm=True)
        return sub.get(timeout=0.2) is not None

    wait_for(delivered, timeout=15)
    assert sub_bus.reconnects >= 1


def test_concurrent_calls_each_get_their_own_answer(connect: Connect, broker: BrokerHandle) -> None:
    """Many STATS, DLQ and request calls at once, from several threads (tasks for
    AsyncBus): every one is answered, with its own answer."""
    broker.manifest("echo", '[permissions]\nsubscribe = ["echo.>"]\n')
    broker.manifest("asker", '[permissions]\nrequest = ["echo.>"]\n')
    connect("echo").serve("echo.>", lambda m: m.data)
    operator, asker = connect("$cli"), connect("asker")
    jobs: list[tuple[str, int]] = [(kind, i) for i in range(20) for kind in ("stats", "dlq", "req")]

    def run(job: tuple[str, int]) -> bool:
        kind, i = job
        if kind == "stats":
            return "sessions" in operator.broker_stats(timeout=10)
        if kind == "dlq":
            return "entries" in operator.dead_letters(timeout=10)
        return bool(asker.request("echo.x", {"i": i}, timeout=10).data == {"i": i})

    if isinstance(operator, AsyncDriver):
        loop = operator._loop

        async def all_at_once() -> list[bool]:
            async def one(job: tuple[str, int]) -> bool:
                kind, i = job
                if kind == "stats":
                    return "sessions" in await operator.bus.broker_stats(timeout=10)
                if kind == "dlq":
                    return "entries" in await operator.bus.dead_letters(timeout=10)
                reply = await asker.bus.request("echo.x", {"i": i}, timeout=10)
                return bool(reply.data == {"i": i})

            return list(await asyncio.gather(*(one(job) for job in jobs)))

        results = loop.run(all_at_once())
    else:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(run, jobs, timeout=30))
    assert results == [True] * len(jobs)


# -- deliveries in batches, ACKs coalesced -------------------------------------------------


def backlog(connect: Connect, count: int) -> None:
    """`count` messages queued at the broker for the durable session `batch` of app "sub"
    while it is away: the next connect("sub", session="batch") that subscribes again gets
    them in DELIVERs as full as the window allows, handed over in batches."""
    away = connect("sub", session="batch")
    away.subscribe("market.batch", durable=True)
    away.close()
    pub = connect("pub")
    for i in range(count):
        pub.publish_nowait("market.batch", i)
    pub.flush(10)


def acked_by_the_broker(connect: Connect, count: int) -> None:
    """Every one of `count` deliveries acknowledged at the broker, with the session still
    open: the last, partial batch of ACKs went out on its own (nothing waits for a close)."""
    operator = connect("$cli")
    wait_for(lambda: operator.broker_stats()["acked"] >= count, 10)
    stats = operator.broker_stats()
    assert stats["acked"] == count and stats["dlq_size"] == 0


@pytest.mark.timeout(60)
def test_a_backlog_reaches_the_handler_in_order_and_a_raising_handler_spares_the_rest(
    connect: Connect,
) -> None:
    """More than a window of messages, so the broker only sends on as the coalesced ACKs
    come back; a handler that raises (one message in ten, first attempt) gets that message
    nacked and retried, and every other message of its batch is still handled, in order,
    one call at a time."""
    count = 600
    backlog(connect, count)
    seen: list[tuple[int, int]] = []
    running: list[int] = []
    done = threading.Event()

    def handler(message: Message) -> None:
        running.append(1)
        assert len(running) == 1, "two handler calls at once"
        seen.append((message.data, message.attempt))
        running.pop()
        if len(seen) == count + count // 10:
            done.set()
        if message.data % 10 == 3 and message.attempt == 1:
            raise ValueError("not yet")

    back = connect("sub", session="batch")
    back.subscribe("market.batch", handler, durable=True)
    assert done.wait(30), f"{len(seen)} handler calls"
    assert [data for data, attempt in seen if attempt == 1] == list(range(count))
    assert [data for data, attempt in seen if attempt == 2] == list(range(3, count, 10))
    acked_by_the_broker(connect, count)


@pytest.mark.timeout(60)
def test_a_backlog_read_with_get_comes_in_order_and_every_ack_reaches_the_broker(
    connect: Connect,
) -> None:
    count = 600
    backlog(connect, count)
    back = connect("sub", session="batch")
    sub = back.subscribe("market.batch", durable=True)
    got = [sub.get(timeout=5) for _ in range(count)]
    assert [m.data for m in got if m is not None] == list(range(count))
    assert all(m is not None and m.attempt == 1 for m in got)
    acked_by_the_broker(connect, count)
    assert sub.get(timeout=0.05) is None  # nothing redelivered
