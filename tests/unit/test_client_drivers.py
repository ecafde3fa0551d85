"""The two drivers without a broker: the window, `publish_nowait` and `WouldBlock`;
deliveries handed over in batches and settlements that cost no wake-up each.

Neither constructor opens a socket, so the window logic is tested on its own: a full
window makes `publish_nowait` raise `WouldBlock` (nothing queued) and `publish` wait,
and room comes back with a confirmation. The batch hand-over, a get() subscription's
queue, the dispatcher's handling of a raising handler and the I/O thread's settlement
poll are tested the same way, without a clock or sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import pytest

from broker.codec import Envelope, pack
from broker.wire import Confirm, Welcome
from clients.aio import AsyncBus
from clients.bus import Bus, BusError, WouldBlock
from clients.connection import Connection, ConnectSettings, hand_over
from clients.events import Confirmed
from clients.message import Message, Receipt, Subscription
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


# -- deliveries in batches, settlements without a wake-up each --------------------------------


class Settled:
    """A `settle` that records what each Receipt reported."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None, bool]] = []

    def __call__(self, seq: int, error: str | None, requeue: bool) -> None:
        self.calls.append((seq, error, requeue))


def messages(settle: Settled, sid: int, seqs: range) -> list[Message]:
    return [
        Message(
            Envelope(bytes(16), "a.b", "pub", 1, seq, 1, None, None, False, pack(seq)),
            sid,
            Receipt(seq, 1, settle),
        )
        for seq in seqs
    ]


def test_offer_all_queues_a_batch_in_order_and_overflow_is_counted_and_nacked() -> None:
    settle = Settled()
    sub = Subscription(1, "a.>", limit=3)
    assert sub.offer_all(messages(settle, 1, range(1, 6))) == 2
    assert (sub.overflowed, sub.pending()) == (2, 3)
    assert settle.calls == [
        (4, "the subscriber's local queue is full", True),
        (5, "the subscriber's local queue is full", True),
    ]
    got = [sub.get(timeout=0) for _ in range(3)]
    assert [m.envelope.seq for m in got if m is not None] == [1, 2, 3]
    assert settle.calls[2:] == [(1, None, True), (2, None, True), (3, None, True)]  # acked
    assert sub.get(timeout=0) is None and sub.get_nowait() is None
    assert sub.offer(messages(settle, 1, range(6, 7))[0])


def test_one_offer_all_wakes_a_waiting_reader_and_manual_ack_leaves_the_ack_to_the_app() -> None:
    settle = Settled()
    sub = Subscription(1, "a.>", manual_ack=True)
    got: list[Message | None] = []
    reader = threading.Thread(target=lambda: got.extend(sub.get(timeout=10) for _ in range(2)))
    reader.start()
    sub.offer_all(messages(settle, 1, range(1, 3)))
    reader.join(10)
    assert not reader.is_alive()
    assert [m.envelope.seq for m in got if m is not None] == [1, 2]
    assert settle.calls == []  # manual_ack: nothing acked by get()


class Counting(Subscription):
    """A get() subscription that records each batch offered to it."""

    offered: list[list[int]]

    def offer_all(self, messages: Iterable[Message]) -> int:
        batch = list(messages)
        self.offered = [*getattr(self, "offered", []), [m.envelope.seq for m in batch]]
        return super().offer_all(batch)


def test_hand_over_makes_one_batch_per_turn_in_order() -> None:
    settle = Settled()
    handled = Subscription(1, "a.>", handler=lambda m: None)
    read = Counting(2, "b.>")
    gone = Subscription(3, "c.>", active=False)
    subs = {1: handled, 2: read, 3: gone}
    turn = [
        *messages(settle, 1, range(1, 3)),
        *messages(settle, 2, range(3, 5)),
        *messages(settle, 1, range(5, 6)),
        *messages(settle, 3, range(6, 7)),
        *messages(settle, 9, range(7, 8)),  # an unknown sid
    ]
    batches: list[list[tuple[Subscription, Message]]] = []
    hand_over(turn, subs, batches.append)
    assert [[(s.sid, m.envelope.seq) for s, m in batch] for batch in batches] == [
        [(1, 1), (1, 2), (1, 5)]
    ]
    assert read.offered == [[3, 4]]  # one call for the get() subscription's two
    assert settle.calls == [(6, None, True), (7, None, True)]  # consumed: nobody will


def test_a_handler_that_raises_spares_the_rest_of_its_batch() -> None:
    settle = Settled()
    seen: list[int] = []

    def handler(message: Message) -> None:
        seen.append(message.envelope.seq)
        if message.envelope.seq == 2:
            raise ValueError("bad price")

    bus = Bus(SETTINGS)
    sub = Subscription(1, "a.>", handler=handler)
    bus._dispatch([(sub, m) for m in messages(settle, 1, range(1, 5))])
    bus._dispatch_queue.put(None)
    bus._run_handlers()  # returns at the None
    assert seen == [1, 2, 3, 4]
    assert settle.calls == [
        (1, None, True),
        (2, "ValueError: bad price", True),
        (3, None, True),
        (4, None, True),
    ]


def test_acks_wake_the_io_thread_only_for_a_full_batch_a_nack_or_a_backed_off_poll() -> None:
    io = Connection(SETTINGS, {}, lambda batch: None, lambda error: None)
    wakeup = io._wakeup
    io._backed_off = False  # the I/O thread is polling the settlements itself
    for seq in range(1, io._ack_batch):
        io.settle(seq, None)
    assert not wakeup._pending  # 63 ACKs: not one wake-up
    io.settle(io._ack_batch, None)
    assert wakeup._pending  # a batch: the I/O thread should send it now
    wakeup.drain()
    io._settlements.clear()
    io.settle(1, "boom")
    assert wakeup._pending  # a NACK goes at once
    wakeup.drain()
    io._settlements.clear()
    io._backed_off = True
    io.settle(2, None)
    assert wakeup._pending  # nobody looks soon: wake it
    wakeup.close()


def test_the_settlement_poll_backs_off_when_idle_and_raises_the_flag_first() -> None:
    io = Connection(SETTINGS, {}, lambda batch: None, lambda error: None)
    io._pace_settle_poll(active=True, woken=True)
    intervals = []
    while io._settle_poll is not None:
        intervals.append(io._settle_poll)
        io._pace_settle_poll(active=False, woken=False)
    assert intervals == [0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.5]
    io._pace_settle_poll(active=True, woken=False)
    assert io._settle_poll == 0.004
    assert io._wait_s() <= 0.004 and not io._backed_off  # it looks within 4 ms itself
    io._settle_poll = 0.008
    assert io._wait_s() == 0.008 and io._backed_off  # longer: settle() must wake it
    io._settlements.append((1, None, True))  # appended before the flag went up
    assert io._wait_s() == 0.0  # seen by the last look before the poll
    io._wakeup.close()
