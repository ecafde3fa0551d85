"""Flow control with a real broker: a fast publisher is slowed, not dead-lettered.

A `Bus` publisher floods a subscriber whose handler is slow. The broker holds the
publisher's credit (protocol §3.17) while the subscriber's queue is above its high mark,
so the publisher waits instead of overflowing the queue: nothing becomes a `queue-full`
dead letter, and every message arrives once, in publish order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.bus import Message
from tests.conftest import BrokerHandle, wait_for

COUNT = 3000
QUEUE_MAX = 1000  # high mark 500 (half of it), low 125; + credit 256 stays below the bound


@pytest.fixture
def flow_broker(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": '[permissions]\npublish = ["jobs.>"]\n',
            "sub": '[permissions]\nsubscribe = ["jobs.>"]\n',
        },
    )
    handle.start(window=32, queue_max=QUEUE_MAX)
    yield handle
    handle.close()


def test_fast_publisher_is_slowed_and_nothing_is_dead_lettered(flow_broker: BrokerHandle) -> None:
    got: list[int] = []
    done = threading.Event()

    def slow(message: Message) -> None:
        time.sleep(0.0005)  # a consumer well below the publisher's pace
        got.append(message.data)
        if len(got) == COUNT:
            done.set()

    flow_broker.connect("sub").subscribe("jobs.>", slow)
    pub = flow_broker.connect("pub")
    operator = flow_broker.connect("$cli")
    deepest = 0
    for i in range(COUNT):
        pub.publish("jobs.flood", i)
        if i % 250 == 0:
            deepest = max(deepest, operator.broker_stats()["queued"])
    assert done.wait(90), f"{len(got)} of {COUNT} arrived"
    pub.flush(30)
    stats = operator.broker_stats()
    assert got == list(range(COUNT))  # every message, once, in publish order
    assert stats["dlq_size"] == 0 and stats["dlq_by_reason"] == {}, stats
    assert stats["flow_holds"] >= 1, stats  # the publisher was held at least once
    assert deepest < QUEUE_MAX
    assert wait_for(lambda: operator.broker_stats()["flow_held"] == 0, 10)
