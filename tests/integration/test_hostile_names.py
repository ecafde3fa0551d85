"""Client-chosen names that become keys, against a real broker and real LMDB files.

Issue 12, threat 7: a NUL byte in a session name once reached the durable-state key
`app NUL session NUL sid` and, split on NUL at recovery, crash-looped the platform across
restarts. What must hold now: the broker refuses such a HELLO with 112
`BAD_SESSION_NAME` and keeps serving; and a bad row already in the durable state (planted
here into a real state.mdb) is skipped and reported by a restarting broker and its
persistence service, which then serve, the good rows restored.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.codec import pack
from broker.errors import Code
from broker.names import session_name_problem
from persistence.state import StateStore
from tests.conftest import BrokerHandle, authenticate, wait_for

pytestmark = pytest.mark.timeout(180)

MANIFESTS = {
    "pub": '[permissions]\npublish = ["market.>"]\n',
    "sub": '[permissions]\nsubscribe = ["market.>"]\n',
}


def raw_dealer(broker: BrokerHandle, app_id: str) -> zmq.Socket[bytes]:
    """A bare DEALER authenticated as `app_id`, for frames the client library never sends.

    The one place these tests obtain a credential (the fuzz tests' way): when credentials
    change, only this changes."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    authenticate(sock, broker.credentials.mint(app_id))
    sock.connect(broker.endpoint)
    return sock


def hello(sock: zmq.Socket[bytes], session: Any) -> tuple[bytes, dict[str, Any]]:
    """Send HELLO naming `session`; the broker's answer (command, body)."""
    sock.send_multipart([P.HELLO, pack({"v": [1], "session": session})])
    assert sock.poll(20_000), "the broker did not answer HELLO"
    command, body = sock.recv_multipart()
    return command, msgpack.unpackb(body, raw=False)


def assert_serves(broker: BrokerHandle, tag: str) -> None:
    """A publish reaches a subscriber through the broker."""
    sub = broker.connect("sub", session=f"check-{tag}").subscribe("market.check")
    pub = broker.connect("pub", session=f"check-{tag}")
    pub.publish("market.check", tag, confirm=True)
    message = sub.get(20)
    assert message is not None and message.data == tag


@pytest.mark.parametrize(
    "name",
    ["a\x00b", "\x00", "line\nbreak", "tab\there", "bell\x07", "a\u00a0b", "\u2028", "x" * 65, ""],
    ids=repr,
)
def test_a_hello_with_a_bad_session_name_is_refused_and_the_broker_serves(
    broker: BrokerHandle, name: str
) -> None:
    sock = raw_dealer(broker, "sub")
    try:
        command, body = hello(sock, name)
        assert command == P.ERROR, body
        assert body["code"] == Code.BAD_SESSION_NAME
        assert body["code"] == 112
        assert body["name"] == "BAD_SESSION_NAME" and "session" in body["message"]
        assert "printable" in body["hint"]
        command, body = hello(sock, "fine")  # the same connection may still say HELLO
        assert command == P.WELCOME and body["session"] == "fine"
    finally:
        sock.close()
    assert_serves(broker, "after")
    assert broker.process is not None and broker.process.poll() is None


@pytest.fixture
def stored(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(short_tmp, MANIFESTS)
    yield handle
    handle.close()


def dead_letter(**changes: Any) -> dict[str, Any]:
    """A stored dead letter (persistence.writer's form), `changes` applied."""
    fields: dict[str, Any] = {
        "entry_id": 7,
        "app": "sub",
        "session": "keep",
        "reason": "nacked",
        "attempts": 4,
        "error": "boom",
        "stored_seq": 0,
        "sender": "pub",
        "published_ns": 1,
        "topic": "market.x",
        "msg_id": b"\x07" * 16,
        "sensitive": False,
        "header": b"\x80",
        "payload": b"dead",
        "sids": b"",
        "sealed": False,
        "dead_ns": 2,
    }
    return fields | changes


def plant_rows(state_path: Path) -> None:
    """Rows no broker should have written: a session with a NUL (the historical attack,
    subscription and pending delivery), one with a control character, keys of no layout,
    a pattern that is not one, a pattern that is not UTF-8, dead letters of wrong types,
    missing fields or no msgpack at all; and a good durable session, `keep`, and a good
    dead letter, which must come back."""
    u32, u64 = struct.Struct(">I").pack, struct.Struct(">Q").pack
    state = StateStore(state_path, readonly=False)
    try:
        with state.env.begin(write=True) as txn:
            txn.put(b"sub\0a\0b\0" + u32(1), b"market.>", db=state.subs)
            txn.put(b"sub\0a\0b\0" + u64(5), msgpack.packb([1]), db=state.pending)
            txn.put(b"sub\0bell\x07\0" + u32(1), b"market.>", db=state.subs)
            txn.put(b"garbage", b"market.>", db=state.subs)
            txn.put(b"sub\0short\0" + b"\x01", b"market.>", db=state.subs)
            txn.put(b"sub\0pat\0" + u32(1), b"market..x", db=state.subs)
            txn.put(b"sub\0utf\0" + u32(1), b"\xff\xfe", db=state.subs)
            txn.put(b"sub\0keep\0" + u32(1), b"market.>", db=state.subs)
            txn.put(b"sub\0keep\0" + b"\x07", msgpack.packb([1]), db=state.pending)
            txn.put(u64(7), msgpack.packb(dead_letter(), use_bin_type=True), db=state.dlq)
            wrong = dead_letter(reason=5, error=["x"], published_ns="soon")
            txn.put(u64(8), msgpack.packb(wrong, use_bin_type=True), db=state.dlq)
            txn.put(u64(9), msgpack.packb({"reason": "x"}), db=state.dlq)
            txn.put(u64(10), b"\xc1", db=state.dlq)
    finally:
        state.close()


def log_events(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def test_bad_rows_in_the_durable_state_are_skipped_and_reported_and_the_broker_serves(
    stored: BrokerHandle, capfd: pytest.CaptureFixture[str]
) -> None:
    """The broker and persistence start on a state holding bad rows: both report what
    they skipped, the good durable session is restored, and the broker serves. Before
    the fix persistence died on the first bad key at every restart, and the broker waited
    for a restore that never came."""
    plant_rows(stored.paths.state_path)
    stored.start(persistence=True)
    stored.start_persistence()
    seen: list[dict[str, Any]] = []

    def recovered() -> dict[str, Any] | None:
        seen.extend(log_events(capfd.readouterr().err))
        return next((e for e in seen if e.get("event") == "broker-recovered"), None)

    report = wait_for(recovered, 60)
    assert report["sessions"] == 1 and report["subscriptions"] == 1  # `keep`
    assert report["dead_letters"] == 1
    malformed = [e for e in seen if e.get("event") == "recovery-row-malformed"]
    named = {(e.get("app"), e.get("session")) for e in malformed}
    assert ("sub", "a\x00b") in named and ("sub", "bell\x07") in named, malformed
    assert report["skipped"] >= 3, report  # two bad names, one bad pattern
    restore = next(e for e in seen if e.get("event") == "restore-sent")
    # two keys of no layout, the pattern not UTF-8, a bad pending row, three dead letters
    assert restore["skipped"] >= 7, restore
    assert any(e.get("event") == "state-row-malformed" for e in seen), seen

    sock = raw_dealer(stored, "sub")
    try:
        command, body = hello(sock, "keep")
        assert command == P.WELCOME and body["resumed"] is True, body
        assert body["subs"] == [[1, "market.>"]]
    finally:
        sock.close()
    entries = stored.connect("$cli", session="dlq").dead_letters()["entries"]
    assert [e["id"] for e in entries] == [7]
    assert_serves(stored, "recovered")
    for process in (stored.process, stored.persistence):
        assert process is not None and process.poll() is None


@pytest.fixture
def dealer(broker: BrokerHandle) -> Iterator[zmq.Socket[bytes]]:
    sock = raw_dealer(broker, "sub")
    yield sock
    sock.close()


@settings(
    max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(
    name=st.text(max_size=70)
    | st.sampled_from(["a\x00b", "\x00" * 64, "\x1b[2J", "a\u2028b"])
    | st.integers(-9, 9)
    | st.binary(max_size=8)
)
def test_any_session_name_gets_a_welcome_or_a_coded_refusal(
    broker: BrokerHandle, dealer: zmq.Socket[bytes], name: Any
) -> None:
    """On a live broker: a name the rule accepts is welcomed as itself, any other is
    refused with 112; the connection (one for every example) and the broker carry on."""
    command, body = hello(dealer, name)
    if session_name_problem(name) is None:
        assert command == P.WELCOME and body["session"] == name, body
    else:
        assert command == P.ERROR and body["code"] == Code.BAD_SESSION_NAME, body
    assert broker.process is not None and broker.process.poll() is None
