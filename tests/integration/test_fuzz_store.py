"""Hostile input to the persistence query socket: random frames from an authenticated app.

Every malformed query gets an ERROR with a code, the service keeps running, and a proper
query still works afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import wire
from tests.conftest import BrokerHandle, authenticate

MANIFESTS = {"app": '[permissions]\npublish = ["a.>"]\nsubscribe = ["a.>"]\n'}

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
bodies = st.dictionaries(
    st.sampled_from(["topic", "last", "pattern", "since", "until", "after", "x"]), values
).map(lambda d: msgpack.packb(d, use_bin_type=True))
frames = st.lists(
    st.sampled_from([wire.HISTORY, wire.REPLAY, b"NOPE", b""]) | st.binary(max_size=32),
    min_size=1,
    max_size=3,
) | st.tuples(st.sampled_from([wire.HISTORY, wire.REPLAY]), bodies | st.binary(max_size=64)).map(
    list
)


@pytest.fixture(scope="module")
def store_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zmq.Socket[Any]]:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="px-fz-", dir="/tmp"))
    handle = BrokerHandle.prepared(root, MANIFESTS)
    handle.start(persistence=True)
    handle.start_persistence()
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    authenticate(sock, handle.credentials.mint("app"), store=True)
    sock.connect(handle.paths.store_endpoint())
    yield sock
    sock.close()
    handle.close()


def ask(sock: zmq.Socket[Any], request: list[bytes]) -> list[bytes]:
    sock.send_multipart(request)
    assert sock.poll(5000), "the persistence service stopped answering"
    return sock.recv_multipart()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=frames)
def test_every_malformed_query_gets_an_answer(
    store_socket: zmq.Socket[Any], request: list[bytes]
) -> None:
    answer = ask(store_socket, request)
    assert answer[0] in (wire.RESULT, wire.Error.COMMAND)
    if answer[0] == wire.Error.COMMAND:
        error = wire.Error.decode(answer)
        assert 100 <= error.code < 600 and error.hint
    else:
        wire.Result.decode(answer)


def test_a_good_query_still_works(store_socket: zmq.Socket[Any]) -> None:
    answer = ask(store_socket, wire.History("a.b", 3).frames())
    assert wire.Result.decode(answer) == wire.Result((), done=True)
