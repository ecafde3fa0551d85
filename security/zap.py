"""The ZAP handler both servers (the broker, the store's query socket) run in their loop.

libzmq asks `inproc://zeromq.zap.01` of the socket's context to authenticate each new
connection; the answer's User-Id (the grant id) is attached to every frame the connection
sends, so the server reads the sender's grant per message, looks its identity up in the
`GrantRegistry`, and never trusts what the client wrote. A revoked grant's connection is
refused at its next message.

Only CURVE is accepted (every server here is a CurveZMQ server, so libzmq refuses other
mechanisms before ZAP). One handler serves every socket of a context, told apart by ZAP
domain; a `ZapPolicy` says per domain which identities may connect (None: any granted
one). Before refusing a key it does not know, the handler reads the grant channel once
more (`refresh`): the supervisor sends a grant before it hands the app its key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any

import zmq

from security.grants import Admission, GrantRegistry, Refusal
from security.peers import Peer, peer_of

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

ZapPolicy = Mapping[str, Set[str] | None]
"""ZAP domain -> the identities admitted there (None: every granted identity)."""


@dataclass(frozen=True, slots=True)
class ZapAnswer:
    """What one ZAP request asked and what it was told."""

    admission: Admission
    peer: Peer
    mechanism: str
    domain: str

    @property
    def accepted(self) -> bool:
        return self.admission.accepted

    @property
    def reason(self) -> str:
        return self.admission.reason


def bind_zap(context: zmq.Context[Any]) -> zmq.Socket[bytes]:
    zap: zmq.Socket[bytes] = context.socket(zmq.REP)
    zap.linger = 0
    zap.bind(ZAP_ENDPOINT)
    return zap


def decide(
    request: list[bytes],
    registry: GrantRegistry,
    policy: ZapPolicy,
    refresh: Callable[[], None] = lambda: None,
    now: float | None = None,
) -> tuple[ZapAnswer, bytes]:
    """The answer to one ZAP request (frames as libzmq sends them) and the User-Id."""
    version, _rid, zap_domain, address, _identity, mechanism = request[:6]
    offered = request[6:]
    domain = zap_domain.decode("utf-8", "replace")
    peer = peer_of(address.decode("utf-8", "replace"))
    mech = mechanism.decode("ascii", "replace")
    if version != b"1.0" or mechanism != b"CURVE" or len(offered) != 1 or len(offered[0]) != 32:
        admission = Admission(None, Refusal.UNKNOWN_KEY, "only CurveZMQ with a client key")
    elif domain not in policy:
        admission = Admission(None, Refusal.NOT_HERE, f"unknown ZAP domain {domain[:32]!r}")
    else:
        key = offered[0]
        clock = time.time() if now is None else now
        admission = registry.admit(key, peer, clock, policy[domain])
        if admission.refusal is Refusal.UNKNOWN_KEY:
            refresh()  # a grant sent just before the app got its key
            admission = registry.admit(key, peer, clock, policy[domain])
    user = admission.grant.grant_id.encode() if admission.grant is not None else b""
    return ZapAnswer(admission, peer, mech, domain), user


def answer(
    zap: zmq.Socket[bytes],
    registry: GrantRegistry,
    policy: ZapPolicy,
    refresh: Callable[[], None] = lambda: None,
) -> ZapAnswer | None:
    """Answer one waiting ZAP request; None for something libzmq would never send."""
    request = zap.recv_multipart()
    if len(request) < 6:
        return None
    got, user = decide(request, registry, policy, refresh)
    status = b"200" if got.accepted else b"400"
    zap.send_multipart([request[0], request[1], status, got.reason.encode()[:255], user, b""])
    return got
