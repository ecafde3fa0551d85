"""The admission rules (security.grants), the grant channel's decoding, the ZAP decision
over random requests, and the credential token format: pure, with an injected process
tree."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import ProtocolViolation
from broker.wire import Hello
from security.credentials import Credential, CredentialError, ServerKeys
from security.grant_channel import GrantChannelError, GrantReceiver, GrantSender, apply_command
from security.grants import OPERATOR_ID, Grant, GrantKind, GrantRegistry, Refusal
from security.peers import Peer, descends_from, peer_of
from security.zap import decide

UID = 1000
SUPERVISOR, APP, CHILD, ESCAPED, OUTSIDER, OTHER_APP = 100, 200, 201, 202, 300, 400


class Tree:
    """init(1) -> supervisor -> app -> child; supervisor -> escaped (adopted orphan);
    init -> outsider (the user's shell); supervisor -> other app."""

    parents = {SUPERVISOR: 1, APP: SUPERVISOR, CHILD: APP, ESCAPED: SUPERVISOR, OUTSIDER: 1}
    parents |= {OTHER_APP: SUPERVISOR, 1: 0}

    def parent(self, pid: int) -> int | None:
        return self.parents.get(pid)


def registry() -> GrantRegistry:
    reg = GrantRegistry(UID, Tree())
    reg.supervisor_pid = SUPERVISOR
    return reg


def key(n: int) -> bytes:
    return bytes([n]) * 32


def peer(pid: int, uid: int = UID) -> Peer:
    return Peer(uid, pid, f"localhost:{uid}:{uid}:{pid}")


def test_a_launched_apps_key_works_from_its_tree_only() -> None:
    reg = registry()
    reg.register(Grant("g1", "ticker", key(1), GrantKind.APP, pid=APP))
    for pid in (APP, CHILD):
        got = reg.admit(key(1), peer(pid), 0.0)
        assert got.accepted and got.grant is not None and got.grant.app_id == "ticker"
    for pid in (ESCAPED, OUTSIDER, OTHER_APP, SUPERVISOR):
        got = reg.admit(key(1), peer(pid), 0.0)
        assert got.refusal is Refusal.FOREIGN_PROCESS and got.claimed == "ticker"
    assert reg.admit(key(1), peer(APP, uid=0), 0.0).refusal is Refusal.FOREIGN_PROCESS
    assert reg.owner_of(CHILD) == "ticker" and reg.owner_of(OUTSIDER) == ""


def test_the_operator_is_the_users_process_outside_the_platform_tree() -> None:
    reg = registry()
    got = reg.admit(key(9), peer(OUTSIDER), 0.0)
    assert got.accepted and got.grant is not None and got.grant.app_id == OPERATOR_ID
    for pid in (APP, CHILD, ESCAPED, SUPERVISOR):  # inside: an unknown key is nobody
        assert reg.admit(key(9), peer(pid), 0.0).refusal is Refusal.UNKNOWN_KEY
    assert reg.admit(key(9), peer(OUTSIDER, uid=0), 0.0).refusal is Refusal.WRONG_USER
    assert reg.admit(key(9), Peer(None, None, "127.0.0.1"), 0.0).refusal is Refusal.UNKNOWN_KEY
    before = GrantRegistry(UID, Tree())  # the supervisor has not said who it is yet
    assert before.admit(key(9), peer(OUTSIDER), 0.0).refusal is Refusal.UNKNOWN_KEY
    events_only = reg.admit(key(9), peer(OUTSIDER), 0.0, frozenset({"$persistence"}))
    assert events_only.refusal is Refusal.NOT_HERE


def test_external_keys_expire_and_are_refused_inside_the_platform() -> None:
    reg = registry()
    reg.register(Grant("g2", "excel", key(2), GrantKind.EXTERNAL, expires_at=100.0))
    assert reg.admit(key(2), peer(OUTSIDER), 99.0).accepted
    assert reg.admit(key(2), peer(CHILD), 99.0).refusal is Refusal.FOREIGN_PROCESS
    assert reg.admit(key(2), peer(OUTSIDER), 100.0).refusal is Refusal.EXPIRED
    assert reg.identity("g2") is None  # expired is revoked: its connections are refused


def test_revoke_and_replace() -> None:
    reg = registry()
    reg.register(Grant("g1", "a", key(1), GrantKind.APP, pid=APP))
    assert reg.register(Grant("g1", "a", key(1), GrantKind.APP, pid=APP)) == []  # a resend
    replaced = reg.register(Grant("g3", "a", key(1), GrantKind.APP, pid=CHILD))
    assert [g.grant_id for g in replaced] == ["g1"] and reg.identity("g1") is None
    assert reg.revoke("g3") is not None and reg.revoke("g3") is None
    assert reg.revoke("operator") is None and reg.identity("operator") == OPERATOR_ID
    with pytest.raises(ValueError):
        reg.register(Grant("operator", "$cli", key(4), GrantKind.SERVICE))


def test_descends_from_stops_on_loops_and_unknown_parents() -> None:
    class Loop:
        def parent(self, pid: int) -> int | None:
            return pid + 1

    assert not descends_from(Loop(), 5, 1)
    assert descends_from(Tree(), CHILD, SUPERVISOR)
    assert not descends_from(Tree(), 999, SUPERVISOR)


@given(st.text(max_size=40))
def test_peer_addresses_never_raise(address: str) -> None:
    got = peer_of(address)
    assert (got.pid is None) == (got.uid is None)


def test_the_channel_carries_grants_and_revocations_in_order() -> None:
    ours, theirs = socket.socketpair()
    sender, receiver = GrantSender(ours), GrantReceiver(os.dup(theirs.fileno()))
    theirs.close()
    reg = GrantRegistry(UID, Tree())
    sender.platform(SUPERVISOR)
    sender.grant(Grant("g1", "a", key(1), GrantKind.APP, pid=APP, issued_at=5.0))
    sender.grant(Grant("g2", "b", key(2), GrantKind.EXTERNAL, expires_at=9.0))
    sender.revoke("g1")
    applied = receiver.apply(reg)
    assert reg.supervisor_pid == SUPERVISOR and [g.grant_id for g in applied.revoked] == ["g1"]
    assert reg.identity("g2") == "b" and reg.identity("g1") is None
    sender.close()
    assert receiver.apply(reg).closed
    receiver.close()


@given(st.binary(max_size=200))
def test_garbage_on_the_channel_is_a_channel_error_never_a_crash(body: bytes) -> None:
    with contextlib.suppress(GrantChannelError):
        apply_command(GrantRegistry(UID, Tree()), body)


_frames = st.lists(st.binary(max_size=40), max_size=4)


@given(
    version=st.sampled_from([b"1.0", b"0.9", b""]),
    domain=st.sampled_from([b"plexus", b"plexus.events", b"other", b"\xff"]),
    address=st.one_of(st.just(b"localhost:1000:1000:300"), st.binary(max_size=30)),
    mechanism=st.sampled_from([b"CURVE", b"PLAIN", b"NULL", b"GSSAPI", b"\x00"]),
    offered=_frames,
    known=st.booleans(),
)
def test_any_zap_request_gets_a_coded_answer(
    version: bytes,
    domain: bytes,
    address: bytes,
    mechanism: bytes,
    offered: list[bytes],
    known: bool,
) -> None:
    reg = registry()
    if known and offered:
        reg.register(Grant("g1", "a", offered[0][:32].ljust(32, b"k"), GrantKind.APP, pid=APP))
    policy = {"plexus": None, "plexus.events": frozenset({"$persistence"})}
    request = [version, b"1", domain, address, b"", mechanism, *offered]
    got, user = decide(request, reg, policy, now=0.0)
    assert got.accepted == (got.admission.refusal is None)
    assert got.accepted == bool(user)
    if got.accepted:
        assert mechanism == b"CURVE" and version == b"1.0"
    else:
        assert isinstance(got.admission.refusal, Refusal) and got.reason


@given(
    body=st.dictionaries(
        st.sampled_from(["v", "session", "ack", "client", "app", "x"]),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.text(max_size=80),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
        ),
    )
)
def test_any_hello_body_is_decoded_or_refused_with_a_code(body: dict[str, object]) -> None:
    from broker.codec import pack

    try:
        hello = Hello.decode([b"HELLO", pack(body)])
    except ProtocolViolation as exc:
        assert int(exc.code) >= 100
    else:
        assert isinstance(hello.app, str) and len(hello.app) <= 256


def test_tokens_round_trip_and_malformed_ones_are_refused() -> None:
    broker, store = ServerKeys.generate(), ServerKeys.generate()
    credential = Credential.mint(broker.public, store.public)
    again = Credential.parse(credential.token)
    assert again == credential and len(again.public) == 32
    assert ServerKeys.decoded(broker.encoded()) == broker
    for bad in ("", "px1.", "px1.!!!", "px2." + credential.token[4:], credential.token[:-4]):
        with pytest.raises(CredentialError):
            Credential.parse(bad)
