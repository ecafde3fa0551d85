"""The two drivers without a broker: the window, `publish_nowait` and `WouldBlock`.

Neither constructor opens a socket, so the window logic is tested on its own: a full
window makes `publish_nowait` raise `WouldBlock` (nothing queued) and `publish` wait,
and room comes back with a confirmation.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker.wire import Confirm, Welcome
from clients.aio import AsyncBus
from clients.bus import Bus, BusError, WouldBlock
from clients.connection import Connection, ConnectSettings
from clients.events import Confirmed
from clients.outbound import encoded_publish

SETTINGS = ConnectSettings("ipc:///nonexistent", "app", "token", outbox_limit=2)


def test_would_block_is_a_bus_error_exported_by_the_bus() -> None:
    assert issubclass(WouldBlock, BusError)
    from clients import bus

    assert "WouldBlock" in bus.__all__


def test_threaded_window_full_raises_would_block_and_publish_waits_for_room() -> None:
    io = Connection(SETTINGS, {}, lambda batch: None, lambda error: None)
    first, second, third = (encoded_publish("market.x", n) for n in range(3))
    io.enqueue_publish(*first)
    io.enqueue_publish(*second, block=False)
    with pytest.raises(WouldBlock):
        io.enqueue_publish(*third, block=False)
    assert io.unconfirmed == 2
    waiting = threading.Thread(target=io.enqueue_publish, args=third)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # publish() blocks on the full window (backpressure)
    io._confirmed((first[0],))  # what the I/O thread does on a Confirmed event
    waiting.join(5)
    assert not waiting.is_alive() and io.unconfirmed == 2


def test_asyncio_window_full_raises_would_block_and_publish_waits_for_room() -> None:
    async def scenario() -> None:
        bus = AsyncBus(SETTINGS)
        session = bus._session
        session.receive(
            Welcome(1, "app", "main", False, (), 2000, 10_000, 30_000, 256).frames(), 0.0
        )
        first = bus.publish_nowait("market.x", 1)
        bus.publish_nowait("market.x", 2)
        with pytest.raises(WouldBlock):
            bus.publish_nowait("market.x", 3)
        assert bus.unconfirmed == 2
        waiting = asyncio.ensure_future(bus.publish("market.x", 4))
        await asyncio.sleep(0)
        assert not waiting.done()
        session.receive(Confirm((bytes.fromhex(first),)).frames(), 0.0)
        events = session.take_events()
        assert any(isinstance(e, Confirmed) for e in events)
        bus._changed.fire()  # what _handle_events does on Confirmed
        await asyncio.wait_for(waiting, 5)
        assert bus.unconfirmed == 2

    asyncio.run(scenario())


def test_bus_publish_nowait_refuses_when_closed() -> None:
    bus = Bus(SETTINGS)
    bus._closed = True
    with pytest.raises(BusError):
        bus.publish_nowait("market.x", 1)
