"""The ZAP handler both servers (broker, persistence query socket) run in their loop.

libzmq asks `inproc://zeromq.zap.01` of the socket's context to authenticate each new
connection; the answer's User-Id is attached to every frame the connection sends, so the
server reads the sender's identity per message and never trusts what the client wrote.
"""

from __future__ import annotations

from typing import Any

import zmq

from security.credentials import CredentialStore

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def bind_zap(context: zmq.Context[Any]) -> zmq.Socket[bytes]:
    zap: zmq.Socket[bytes] = context.socket(zmq.REP)
    zap.linger = 0
    zap.bind(ZAP_ENDPOINT)
    return zap


def answer_zap(
    zap: zmq.Socket[bytes], credentials: CredentialStore, domain: str
) -> tuple[bool, str, str, str]:
    """Answer one ZAP request: (accepted, app id, peer address, mechanism)."""
    request = zap.recv_multipart()
    if len(request) < 6:
        return False, "", "", ""  # not a ZAP request libzmq would send; nothing to answer
    version, request_id, zap_domain, address, _identity, mechanism = request[:6]
    offered = request[6:]
    status, reason, user = b"400", b"bad credential", b""
    app_id = ""
    if version == b"1.0" and mechanism == b"PLAIN" and len(offered) == 2:
        app_id = offered[0].decode("utf-8", "replace")
        token = offered[1].decode("utf-8", "replace")
        if zap_domain == domain.encode() and credentials.verify(app_id, token):
            status, reason, user = b"200", b"OK", app_id.encode()
    zap.send_multipart([version, request_id, status, reason, user, b""])
    return (
        status == b"200",
        app_id,
        address.decode("utf-8", "replace"),
        mechanism.decode("ascii", "replace"),
    )
