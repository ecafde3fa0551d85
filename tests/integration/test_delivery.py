"""Reliable delivery with a real broker: retries, dead letters, grace periods, resume,
slow consumers, unresponsive peers and resends after a broker restart."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import protocol as P
from broker.codec import pack
from clients.bus import AuthenticationError, Message
from tests.conftest import REPO, BrokerHandle, authenticate, plexus_cli, wait_for

FAST = {
    "heartbeat_ms": 100,
    "peer_timeout_ms": 600,
    "grace_ms": 1500,
    "backoff_base_ms": 100,
    "ack_timeout_ms": 2000,
}


@pytest.fixture
def fast_broker(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": '[permissions]\npublish = ["jobs.>"]\n',
            "sub": '[permissions]\nsubscribe = ["jobs.>"]\n',
        },
    )
    handle.start(**FAST, window=10, queue_max=100)
    handle.write_state()
    yield handle
    handle.close()


@pytest.fixture
def overflow_broker(short_tmp: Path) -> Iterator[BrokerHandle]:
    """The fast broker without flow control (credit 0): publishers are never held, so a
    receiver that never acknowledges overflows into the dead-letter queue ("sub" may keep
    all of it: its DLQ quota, [limits] dlq_entries and dlq_bytes, is raised above the defaults)."""
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": '[permissions]\npublish = ["jobs.>"]\n',
            "sub": '[permissions]\nsubscribe = ["jobs.>"]\n'
            "[limits]\ndlq_entries = 10000\ndlq_bytes = 67108864\n",
        },
    )
    handle.start(**FAST, window=10, queue_max=100, credit=0)
    yield handle
    handle.close()


def raw_session(broker: BrokerHandle, app: str, session: str, pattern: str) -> zmq.Socket[bytes]:
    """A subscriber that can vanish without BYE (closing the socket says nothing)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    authenticate(sock, broker.credentials.mint(app))
    sock.connect(broker.endpoint)
    sock.send_multipart([P.HELLO, pack({"v": [1], "session": session})])
    assert sock.recv_multipart()[0] == P.WELCOME
    sock.send_multipart([P.SUB, pack({"sid": 1, "pattern": pattern})])
    assert sock.recv_multipart()[0] == P.SUBOK
    return sock


def test_failing_handler_is_retried_with_backoff_then_dead_lettered(
    fast_broker: BrokerHandle,
) -> None:
    attempts: list[tuple[int, float]] = []

    def handler(message: Message) -> None:
        attempts.append((message.attempt, time.monotonic()))
        raise RuntimeError("cannot process")

    fast_broker.connect("sub").subscribe("jobs.>", handler)
    fast_broker.connect("pub").publish("jobs.one", {"n": 1}, confirm=True)
    home = str(fast_broker.home)

    def listed() -> list[dict[str, Any]]:
        result = plexus_cli("dlq", "list", "--home", home, "--json")
        assert result.returncode == 0, result.stderr
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return entries

    entries = wait_for(listed, 10)
    assert [a for a, _ in attempts] == [1, 2, 3, 4]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    # backoff 100, 200, 400 ms (base 100 ms, doubling); timer ticks add up to ~50 ms each
    assert gaps[0] >= 0.09 and gaps[1] >= 0.18 and gaps[2] >= 0.36, gaps  # lower bounds only
    (entry,) = entries
    assert entry["reason"] == "nacked" and entry["attempts"] == 4
    assert entry["topic"] == "jobs.one" and entry["sender"] == "pub"
    assert "cannot process" in entry["last_error"]
    replayed = plexus_cli("dlq", "replay", "--home", home, str(entry["id"]))
    assert replayed.returncode == 0, replayed.stderr
    wait_for(lambda: len(attempts) >= 5, 5)
    assert attempts[4][0] == 1  # a replay starts a fresh delivery


def test_resume_within_grace_gets_everything_in_order(fast_broker: BrokerHandle) -> None:
    gone = raw_session(fast_broker, "sub", "worker", "jobs.>")
    gone.close()
    pub = fast_broker.connect("pub")
    for i in range(99):  # the session's queue holds 100 (queue_max), all kept for it
        pub.publish("jobs.seq", i)
    pub.publish("jobs.seq", 99, confirm=True)
    back = fast_broker.connect("sub", session="worker")
    sub = back.subscribe("jobs.>")
    got: list[object] = []
    while len(got) < 100:
        message = sub.get(5)
        assert message is not None, f"stalled after {len(got)}: {got[:3]}..{got[-3:]}"
        got.append(message.data)
    assert got == list(range(100))
    assert sub.get(timeout=0.3) is None


def test_session_gone_past_grace_dead_letters_its_queue(fast_broker: BrokerHandle) -> None:
    gone = raw_session(fast_broker, "sub", "absent", "jobs.>")
    gone.close()
    pub = fast_broker.connect("pub")
    for i in range(5):
        pub.publish("jobs.lost", i, confirm=True)
    operator = fast_broker.connect("$cli")

    def expired() -> list[dict[str, object]]:
        return [e for e in operator.dead_letters()["entries"] if e["reason"] == "expired"]

    entries = wait_for(lambda: len(expired()) == 5 and expired(), 10)
    assert {e["session"] for e in entries} == {"absent"}


def test_slow_consumer_overflow_goes_to_the_dlq(overflow_broker: BrokerHandle) -> None:
    """Without flow control, a subscriber that never acks holds its window and queue (110),
    and every further message becomes a queue-full dead letter, none lost or kept
    elsewhere. That memory then stays bounded is checked on the router itself with
    tracemalloc (tests/unit/test_router_memory.py); an RSS ceiling here measured the
    allocator. With flow control the publisher is held instead (test_flow_control.py)."""
    fast_broker = overflow_broker
    slow = fast_broker.connect("sub", session="slow")
    slow.subscribe("jobs.>", manual_ack=True)  # never acks: window 10, queue 100
    pub = fast_broker.connect("pub")
    payload = b"x" * 4096
    for i in range(5000):
        pub.publish("jobs.flood", payload, confirm=(i % 500 == 499))
    stats = fast_broker.connect("$cli").broker_stats()
    assert stats["published"] == 5000
    assert stats["queued"] <= 110
    assert stats["dlq_by_reason"]["queue-full"] == stats["dlq_size"] >= 5000 - 110
    assert stats["queued"] + stats["dlq_size"] == 5000, stats
    assert stats["dlq_dropped"] == 0


def test_frozen_subscriber_is_declared_unresponsive(fast_broker: BrokerHandle) -> None:
    watcher = fast_broker.connect("$cli").subscribe("$sys.apps.unresponsive")
    env = {
        **os.environ,
        "PLEXUS_ENDPOINT": fast_broker.endpoint,
        "PLEXUS_APP_ID": "sub",
        "PLEXUS_TOKEN": fast_broker.credentials.mint("sub"),
    }
    code = (
        "import sys, time\n"
        "from clients.bus import Bus\n"
        "bus = Bus.connect(session='frozen')\n"
        "bus.subscribe('jobs.>')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGSTOP)
        notice = watcher.get(timeout=10)  # peer timeout 0.6 s: generous
        assert notice is not None
        assert notice.data["app"] == "sub" and notice.data["session"] == "frozen"
        assert notice.sender == "$broker"
        assert notice.data["silent_ms"] >= 600  # declared only after the peer timeout
    finally:
        child.kill()
        child.wait(5)


def test_publish_during_broker_outage_is_resent_and_deduplicated(
    fast_broker: BrokerHandle,
) -> None:
    pub = fast_broker.connect("pub")
    pub.publish("jobs.before", 0, confirm=True)
    fast_broker.kill()
    outcome: list[str] = []

    def publish_while_down() -> None:
        outcome.append(pub.publish("jobs.during", 1, confirm=True, timeout=20))

    thread = threading.Thread(target=publish_while_down)
    thread.start()
    wait_for(lambda: pub.unconfirmed == 1, 5)  # queued while nothing listens
    fast_broker.start(**FAST)
    thread.join(25)
    assert outcome, "the publish made during the outage was never confirmed"
    stats = fast_broker.connect("$cli").broker_stats()
    assert stats["published"] == 1  # resent once into the new broker, not lost


def test_durable_subscription_outlives_the_grace_period(fast_broker: BrokerHandle) -> None:
    """A session whose only subscription is durable is kept past the grace period. A
    non-durable witness session, gone just after it, shows when the grace is over: it
    expires, the durable one does not (no fixed sleep guessing the broker's timers)."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 5000
    authenticate(sock, fast_broker.credentials.mint("sub"))
    sock.connect(fast_broker.endpoint)
    sock.send_multipart([P.HELLO, pack({"v": [1], "session": "keeper"})])
    assert sock.recv_multipart()[0] == P.WELCOME
    sock.send_multipart([P.SUB, pack({"sid": 1, "pattern": "jobs.>", "durable": True})])
    assert sock.recv_multipart()[0] == P.SUBOK
    sock.close()
    raw_session(fast_broker, "sub", "witness", "jobs.>").close()
    operator = fast_broker.connect("$cli")
    wait_for(lambda: operator.broker_stats()["sessions_detached"] >= 2, 5)

    def witness_expired() -> dict[str, Any] | None:
        stats = operator.broker_stats()
        return stats if stats["sessions_expired"] >= 1 else None

    stats = wait_for(witness_expired, 10)
    assert stats["sessions_expired"] == 1 and stats["sessions_detached"] == 1  # the keeper
    fast_broker.connect("pub").publish("jobs.kept", "still here", confirm=True)
    back = fast_broker.connect("sub", session="keeper")
    message = back.subscribe("jobs.>", durable=True).get(5)
    assert message is not None and message.data == "still here"
    assert operator.broker_stats()["dlq_size"] == 0


def test_rejected_message_is_dead_lettered_at_once(fast_broker: BrokerHandle) -> None:
    seen: list[int] = []

    def handler(message: Message) -> None:
        seen.append(message.attempt)
        message.reject("schema version 9 is unknown")

    fast_broker.connect("sub").subscribe("jobs.>", handler, manual_ack=True)
    fast_broker.connect("pub").publish("jobs.poison", {"v": 9}, confirm=True)
    operator = fast_broker.connect("$cli")
    (entry,) = wait_for(lambda: operator.dead_letters()["entries"], 5)
    assert entry["reason"] == "rejected" and entry["attempts"] == 1
    assert entry["last_error"] == "schema version 9 is unknown"
    assert seen == [1]


def test_a_taken_over_session_stays_with_the_newer_connection(fast_broker: BrokerHandle) -> None:
    first = fast_broker.connect("sub", session="desk")
    first.subscribe("jobs.>")
    second = fast_broker.connect("sub", session="desk")
    sub = second.subscribe("jobs.>")

    def first_told_it_was_taken_over() -> bool:
        try:
            first.flush(1)  # nothing to flush: raises what ended its connection, if anything
        except AuthenticationError as exc:
            return exc.code == 203
        return False

    wait_for(first_told_it_was_taken_over, 5)
    time.sleep(0.5)  # not a wait for anything: five heartbeats in which it must stay out
    fast_broker.connect("pub").publish("jobs.x", 1, confirm=True)
    message = sub.get(5)
    assert message is not None and message.data == 1
    with pytest.raises(AuthenticationError) as taken:
        first.publish("jobs.y", 2)
    assert taken.value.code == 203
    assert fast_broker.connect("$cli").broker_stats()["sessions_resumed"] == 1


def test_big_dead_letter_listing_is_readable(overflow_broker: BrokerHandle) -> None:
    fast_broker = overflow_broker
    slow = fast_broker.connect("sub", session="slow")
    slow.subscribe("jobs.>", manual_ack=True)
    pub = fast_broker.connect("pub")
    for i in range(400):  # window 10 + queue 100 kept, ~290 dead letters
        pub.publish("jobs.many", i, confirm=(i == 399))
    listing = fast_broker.connect("$cli").dead_letters()
    assert len(listing["entries"]) >= 280
