"""Per-app caps against a real broker process (issue 12, threat 8): one app cannot starve
or evict another. Each test performs the attack through real sockets: the app over its
cap gets the coded error (410-415), the broker reports it (a Denied event with action
"limit", a `limit-exceeded` log line) and its neighbour is served as before."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from broker import event_records as R
from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from broker.errors import Code
from clients.bus import Bus, BusError
from tests.conftest import BrokerHandle, authenticate, wait_for
from tests.integration.test_events_socket import StreamConsumer

pytestmark = pytest.mark.timeout(120)

MANIFESTS = {
    "pub": '[permissions]\npublish = ["market.>"]\nsubscribe = ["market.>"]\n',
    "both": '[permissions]\npublish = ["market.>"]\nsubscribe = ["market.>"]\n',
}


def raw_app(broker: BrokerHandle, app_id: str) -> zmq.Socket[bytes]:
    """A bare DEALER authenticated as `app_id`, no session yet: the one place these tests
    take a credential, as tests/integration/test_fuzz_broker.py's `attacker` does."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    authenticate(sock, broker.credentials.mint(app_id))
    sock.connect(broker.endpoint)
    return sock


def hello(sock: zmq.Socket[bytes], session: str) -> list[bytes]:
    sock.send_multipart([P.HELLO, pack({"v": [1], "session": session})])
    return reply(sock)


def reply(sock: zmq.Socket[bytes], skip: tuple[bytes, ...] = (P.CREDIT,)) -> list[bytes]:
    """The next message from the broker that is not one of `skip`."""
    while True:
        assert sock.poll(30_000), "the broker did not answer"
        frames = sock.recv_multipart()
        if frames[0] not in skip:
            return frames


def error_code(frames: list[bytes]) -> int:
    assert frames[0] == P.ERROR, frames
    body = msgpack.unpackb(frames[1], raw=False)
    assert body["hint"] and body["message"]
    return int(body["code"])


def pub_frames(pairs: int, payload_bytes: int, topic: str = "market.big") -> list[bytes]:
    frames = [P.PUB]
    for _ in range(pairs):
        frames += [encode_pub_header(new_message_id(), topic), b"x" * payload_bytes]
    return frames


def denied(consumer: StreamConsumer, cap: str) -> list[R.Denied]:
    def found() -> list[R.Denied]:
        consumer.poll(0.1)
        return [
            e.record
            for e in consumer.events
            if isinstance(e.record, R.Denied)
            and e.record.action == "limit"
            and e.record.target == cap
        ]

    return list(wait_for(found, 20))


@pytest.fixture
def audit(broker: BrokerHandle) -> Iterator[StreamConsumer]:
    consumer = StreamConsumer(broker, "$audit")
    consumer.poll(0.3)
    consumer.sync()
    yield consumer
    consumer.close()


@pytest.fixture
def capped(short_tmp: Path) -> Iterator[BrokerHandle]:
    """A broker whose app "pub" has small caps in its manifest; "both" has the defaults."""
    asks = 'request = ["market.>"]\n'
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": MANIFESTS["pub"]
            + asks
            + "[limits]\nsessions = 2\ndurable_subscriptions = 2\npending_requests = 2\n"
            f"pub_bytes = {2 * 2**20}\n",
            "both": MANIFESTS["both"] + asks,
            "responder": '[permissions]\nsubscribe = ["market.>"]\n',
        },
    )
    handle.start()
    yield handle
    handle.close()


def test_an_app_past_its_session_cap_gets_410_and_its_neighbour_connects(
    broker: BrokerHandle, audit: StreamConsumer
) -> None:
    """One connection opens session after session (each HELLO of a new name leaves the
    last one waiting in its grace period): the 65th is refused, the neighbour is not."""
    sock = raw_app(broker, "pub")
    try:
        for number in range(64):  # the platform default, [limits] sessions = 64
            assert hello(sock, f"s{number}")[0] == P.WELCOME
        assert error_code(hello(sock, "s64")) == Code.SESSION_LIMIT
        assert hello(sock, "s3")[0] == P.WELCOME  # resuming one of its own is no new session
        neighbour = broker.connect("sub")
        assert neighbour.subscribe("market.>") is not None
    finally:
        sock.close()
    [record, *_] = denied(audit, "sessions")
    assert (record.app, record.session, record.code) == ("pub", "s64", Code.SESSION_LIMIT)


def test_manifest_limits_cap_sessions_durable_subscriptions_and_pending_requests(
    capped: BrokerHandle,
) -> None:
    """The manifest's [limits] lowers pub's caps; "both" keeps the platform's."""
    first = capped.connect("pub")
    capped.connect("pub")
    with pytest.raises(BusError) as refused:
        capped.connect("pub", timeout=5.0)
    assert refused.value.code == Code.SESSION_LIMIT
    for _ in range(3):
        capped.connect("both")  # the neighbour is not held to pub's cap

    first.subscribe("market.a", durable=True)
    first.subscribe("market.b", durable=True)
    with pytest.raises(BusError) as too_many:
        first.subscribe("market.c", durable=True)
    assert too_many.value.code == Code.DURABLE_LIMIT
    first.subscribe("market.c")  # a non-durable one is no durable subscription

    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow(message: Any) -> bool:
        entered.release()
        return release.wait(60)

    for _ in range(2):  # two responders, one request each (round robin): both pending
        capped.connect("responder").serve("market.slow", slow)
    capped.connect("responder").serve("market.echo", lambda m: m.data)
    stuck = [
        threading.Thread(target=ask, args=(first, "market.slow"), daemon=True) for _ in range(2)
    ]
    for thread in stuck:
        thread.start()
    try:
        for _ in stuck:
            assert entered.acquire(timeout=30)
        with pytest.raises(BusError) as pending:
            first.request("market.echo", "third", timeout=30.0)
        assert pending.value.code == Code.PENDING_LIMIT
        neighbour = capped.connect("both")  # not held to pub's cap
        assert neighbour.request("market.echo", "mine", timeout=30.0).data == "mine"
    finally:
        release.set()
        for thread in stuck:
            thread.join(30)
    assert first.request("market.echo", "again", timeout=30.0).data == "again"


def ask(bus: Bus, topic: str) -> None:
    with contextlib.suppress(BusError):
        bus.request(topic, "wait", timeout=60.0)


def test_a_64_mib_pub_is_refused_and_the_broker_stays_bounded(
    broker: BrokerHandle, audit: StreamConsumer
) -> None:
    """64 pairs of 1 MiB in one PUB: the broker reads up to its `pub_bytes_max` (16 MiB),
    keeps nothing past it, refuses with 413, and its peak RSS rises by far less than the
    message (it used to take 103 -> 342 MiB); its neighbours are served on."""
    assert broker.process is not None
    proc = psutil.Process(broker.process.pid)
    sub = broker.connect("sub").subscribe("market.>")
    pub = broker.connect("pub")
    pub.publish("market.warm", 0, confirm=True)
    assert sub.get(10) is not None
    before = int(proc.memory_info().rss)
    sock = raw_app(broker, "pub")
    try:
        assert hello(sock, "flood")[0] == P.WELCOME
        sock.send_multipart(pub_frames(64, P.MAX_PAYLOAD_BYTES - 64))
        assert error_code(reply(sock)) == Code.PUB_TOO_LARGE
    finally:
        sock.close()
    peak = peak_rss(proc)
    assert peak - before < 150 * 2**20, (before, peak)
    pub.publish("market.after", 1, confirm=True)
    message = sub.get(10)
    assert message is not None and message.topic == "market.after"
    [record, *_] = denied(audit, "pub_bytes_max")
    assert (record.app, record.session, record.code) == ("pub", "flood", Code.PUB_TOO_LARGE)


def peak_rss(proc: psutil.Process) -> int:
    """The process's peak RSS (Linux VmHWM), else its RSS now."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text(encoding="ascii")
    except OSError:
        return int(proc.memory_info().rss)
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return int(proc.memory_info().rss)


def test_a_pub_over_the_apps_own_pub_bytes_is_refused_its_neighbours_is_not(
    capped: BrokerHandle,
) -> None:
    """pub's manifest allows 2 MiB per PUB: 3 MiB is refused (413, credit back), the same
    3 MiB from "both" (the platform's 8 MiB) is routed."""
    sub = capped.connect("both").subscribe("market.>")
    flooder = raw_app(capped, "pub")
    neighbour = raw_app(capped, "both")
    try:
        assert hello(flooder, "f")[0] == P.WELCOME
        assert hello(neighbour, "n")[0] == P.WELCOME
        flooder.send_multipart(pub_frames(3, 2**20 - 64, "market.flood"))
        assert error_code(reply(flooder)) == Code.PUB_TOO_LARGE
        neighbour.send_multipart(pub_frames(3, 2**20 - 64, "market.fine"))
        flooder.send_multipart(pub_frames(1, 2**20 - 64, "market.small"))  # within its cap
        topics = [m.topic if m is not None else None for m in (sub.get(20) for _ in range(4))]
        assert sorted(map(str, topics)) == ["market.fine"] * 3 + ["market.small"]
    finally:
        flooder.close()
        neighbour.close()


def test_one_app_flooding_its_own_dlq_does_not_evict_its_neighbours_dead_letters(
    broker: BrokerHandle, audit: StreamConsumer
) -> None:
    """ "both" publishes to itself and rejects every message (10,240 of them, more than the
    whole queue holds); "sub" had three dead letters before. They are all still there;
    the flooder keeps its quota (2,500) of its newest, and the drop is reported."""
    operator = broker.connect("$cli", session="dlq-check")
    victim = broker.connect("sub")
    victim.subscribe("market.victim", lambda m: m.reject("no"), manual_ack=True)
    sender = broker.connect("pub")
    for n in range(3):
        sender.publish("market.victim", n, confirm=True)

    def dead_of(app: str) -> list[dict[str, Any]]:
        return [e for e in operator.dead_letters()["entries"] if e["app"] == app]

    wait_for(lambda: len(dead_of("sub")) == 3, 20)
    flooder = broker.connect("both")
    flooder.subscribe("market.flood", lambda m: m.reject("no"), manual_ack=True)
    for n in range(10_240):
        flooder.publish("market.flood", n)
    flooder.flush(timeout=60.0)
    wait_for(lambda: len(dead_of("both")) == 2_500, 60)
    [record, *_] = denied(audit, "dlq_entries")  # the flooder's own oldest went: reported
    assert (record.app, record.code) == ("both", Code.DLQ_QUOTA)
    assert [e["topic"] for e in dead_of("sub")] == ["market.victim"] * 3


def test_while_the_broker_recovers_one_app_cannot_fill_the_hold(short_tmp: Path) -> None:
    """Persistence is late: the broker holds what apps send. "pub" sends 1 MiB messages
    until it is refused with 414 (its held_bytes, 16 MiB: bytes, not only a count); the
    neighbour's HELLO and PUB are still held, and served once recovery is done."""
    handle = BrokerHandle.prepared(short_tmp, MANIFESTS)
    handle.start(persistence=True)
    flooder = raw_app(handle, "pub")
    neighbour = raw_app(handle, "both")
    try:
        flooder.send_multipart([P.HELLO, pack({"v": [1], "session": "f"})])
        refused = None
        for sent in range(1, 40):
            flooder.send_multipart(pub_frames(1, P.MAX_PAYLOAD_BYTES - 64, "market.flood"))
            if flooder.poll(200):
                refused = sent
                assert error_code(flooder.recv_multipart()) == Code.HOLD_LIMIT
                break
        assert refused is not None and refused <= 17, refused
        neighbour.send_multipart([P.HELLO, pack({"v": [1], "session": "n"})])
        neighbour.send_multipart(pub_frames(1, 1000, "market.fine"))
        assert not neighbour.poll(300)  # held, not refused
        handle.start_persistence()
        assert reply(neighbour)[0] == P.WELCOME  # the held HELLO, served after recovery
    finally:
        flooder.close()
        neighbour.close()
        handle.close()
