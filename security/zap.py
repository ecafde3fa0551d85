"""The ZAP handler both servers (broker, persistence query socket) run in their loop.

libzmq asks `inproc://zeromq.zap.01` of the socket's context to authenticate each new
connection; the answer's User-Id is attached to every frame the connection sends, so the
server reads the sender's identity per message and never trusts what the client wrote.

One handler serves every authenticated socket of a context, told apart by their ZAP
domain. A `ZapPolicy` says, per domain, which identities may connect there (None: any
identity with a valid credential): the broker's events socket admits only the platform
services that consume the stream, so no app can read other apps' payloads on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

import zmq

from security.credentials import CredentialStore

ZAP_ENDPOINT = "inproc://zeromq.zap.01"

ZapPolicy = Mapping[str, Set[str] | None]
"""ZAP domain -> the identities admitted there (None: every valid credential)."""


@dataclass(frozen=True, slots=True)
class ZapAnswer:
    """What one ZAP request asked and what it was told."""

    accepted: bool
    app_id: str
    address: str
    mechanism: str
    domain: str
    reason: str


def bind_zap(context: zmq.Context[Any]) -> zmq.Socket[bytes]:
    zap: zmq.Socket[bytes] = context.socket(zmq.REP)
    zap.linger = 0
    zap.bind(ZAP_ENDPOINT)
    return zap


def answer(zap: zmq.Socket[bytes], credentials: CredentialStore, policy: ZapPolicy) -> ZapAnswer:
    """Answer one ZAP request under `policy`: PLAIN only, a valid credential, a known
    domain, and an identity that domain admits."""
    request = zap.recv_multipart()
    if len(request) < 6:  # not a ZAP request libzmq would send; nothing to answer
        return ZapAnswer(False, "", "", "", "", "not a ZAP request")
    version, request_id, zap_domain, address, _identity, mechanism = request[:6]
    offered = request[6:]
    domain = zap_domain.decode("utf-8", "replace")
    status, user = b"400", b""
    app_id = ""
    reason = "bad credential"
    if version != b"1.0" or mechanism != b"PLAIN" or len(offered) != 2:
        reason = "only PLAIN with a user name and a credential is accepted"
    else:
        app_id = offered[0].decode("utf-8", "replace")
        token = offered[1].decode("utf-8", "replace")
        if domain not in policy:
            reason = f"unknown ZAP domain {domain[:32]!r}"
        elif not credentials.verify(app_id, token):
            reason = "bad, revoked or foreign credential"
        elif (admitted := policy[domain]) is not None and app_id not in admitted:
            reason = f"{app_id[:64]!r} may not connect to this socket"
        else:
            status, user, reason = b"200", app_id.encode(), "OK"
    zap.send_multipart([version, request_id, status, reason.encode()[:255], user, b""])
    return ZapAnswer(
        status == b"200",
        app_id,
        address.decode("utf-8", "replace"),
        mechanism.decode("ascii", "replace"),
        domain,
        reason,
    )


def answer_zap(
    zap: zmq.Socket[bytes], credentials: CredentialStore, domain: str
) -> tuple[bool, str, str, str]:
    """Answer one ZAP request for one domain open to every valid credential:
    (accepted, app id, peer address, mechanism)."""
    got = answer(zap, credentials, {domain: None})
    return got.accepted, got.app_id, got.address, got.mechanism
