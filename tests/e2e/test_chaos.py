"""kill -9 a consumer in the middle of a numbered stream and bring it back within the grace
period: nothing is lost, order holds, duplicates only from its unacknowledged window."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, BrokerHandle, wait_for
from tests.e2e.queue_checker import check_queue

COUNT = 5000
WINDOW = 64


@pytest.fixture
def chaos_broker(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": '[permissions]\npublish = ["jobs.>"]\n',
            "worker": '[permissions]\nsubscribe = ["jobs.>"]\n',
        },
    )
    handle.start(
        heartbeat_ms=200,
        peer_timeout_ms=1000,
        grace_ms=20000,
        window=WINDOW,
        queue_max=2 * COUNT,
    )
    yield handle
    handle.close()


def start_consumer(broker: BrokerHandle, out: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PLEXUS_ENDPOINT": broker.endpoint,
        "PLEXUS_APP_ID": "worker",
        "PLEXUS_TOKEN": broker.credentials.mint("worker"),
        "CONSUMER_OUT": str(out),
        "CONSUMER_SESSION": "chaos",
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.apps.seq_consumer"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def received(out: Path) -> list[int]:
    return [int(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(300)  # its own deadlines add up to 150 s on a slow machine
@pytest.mark.parametrize("round_", range(3))
def test_kill_9_consumer_mid_stream_loses_nothing(
    chaos_broker: BrokerHandle, short_tmp: Path, round_: int
) -> None:
    out = short_tmp / "received.txt"
    out.touch()
    consumer = start_consumer(chaos_broker, out)
    pub = chaos_broker.connect("pub")
    done = threading.Event()

    def publish_all() -> None:
        for i in range(COUNT):
            pub.publish("jobs.seq", i, confirm=(i % 250 == 249))
        done.set()

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    try:
        wait_for(lambda: len(received(out)) >= COUNT // 4 + 300 * round_, 30)
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(5)
        killed_at = len(received(out))
        consumer = start_consumer(chaos_broker, out)
        publisher.join(60)
        assert done.is_set()
        wait_for(lambda: len(set(received(out))) >= COUNT, 60)
    finally:
        consumer.kill()
        consumer.wait(5)
    report = check_queue(range(COUNT), received(out))
    assert report.lost == frozenset(), f"lost {sorted(report.lost)[:20]}"
    assert report.unexpected == frozenset()
    assert report.out_of_order == 0
    assert report.duplicates <= WINDOW, report.duplicated
    print(f"killed after {killed_at}: lost 0, duplicates {report.duplicates}, in order")
