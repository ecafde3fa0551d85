"""The operator's door: an operator grant where the bus cannot name the process (TCP).

Over ipc the broker reads the connecting process from the kernel (the ZAP address) and
admits a key nobody registered as the operator when that process is the platform user's
and outside every supervised app's tree. Over TCP the ZAP address is only an IP, so the
same rule is applied at a door instead: the supervisor listens on a Unix socket in the
private run dir (`RUN/operator`); a command connects, sends the 32-byte public key of a key
pair it just made, and the supervisor asks the kernel who connected (SO_PEERCRED), applies
the rule, and registers an operator grant for that key with the broker and the store.
The grant lasts as long as the connection: the command keeps it open for its lifetime and
the supervisor revokes the grant when it closes. No secret crosses the door.

    request  the client's CurveZMQ public key, 32 bytes
    answer   one JSON line: {"ok": true, "grant": ID} or {"ok": false, "error": TEXT}

This module is the wire both ends share and the client's side (`open_door`); the
supervisor's side is `supervisor.operator_door`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEY_BYTES = 32
MAX_ANSWER_BYTES = 4096
TIMEOUT_S = 10.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class OperatorDoorError(Exception):
    """No operator grant: the door is missing, refused, or answered nonsense."""


@dataclass(frozen=True, slots=True)
class DoorPeer:
    """Who the kernel says is on the other end of a door connection."""

    pid: int
    uid: int


def doors_supported() -> bool:
    """Whether this OS has Unix sockets whose peer the kernel names (Linux)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")


def peer_of_connection(conn: socket.socket) -> DoorPeer:
    """The kernel's word on the process at the other end of the Unix socket `conn`."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return DoorPeer(pid, uid)


def encode_answer(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, separators=(",", ":")).encode() + b"\n"


def read_exactly(conn: socket.socket, count: int) -> bytes:
    """`count` bytes from `conn`, or fewer when the peer closed first."""
    chunks: list[bytes] = []
    got = 0
    while got < count:
        chunk = conn.recv(count - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_answer(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(MAX_ANSWER_BYTES)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            break
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise OperatorDoorError(f"the supervisor's door answered {data[:80]!r}; restart plexus")
    return answer


_held: list[socket.socket] = []
"""Doors this process holds open: its operator grants live until it exits."""


def open_door(path: Path, public_key: bytes, timeout: float = TIMEOUT_S) -> str:
    """Ask the door at `path` for an operator grant of `public_key`; returns the grant id
    and keeps the connection open (the grant's life) until this process exits."""
    if not doors_supported():
        raise OperatorDoorError(
            f"the operator's door needs Unix sockets with peer credentials, which "
            f"{sys.platform} lacks; run the platform on ipc"
        )
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(os.fspath(path))
        conn.sendall(public_key)
        answer = _read_answer(conn)
    except OSError as exc:
        conn.close()
        raise OperatorDoorError(
            f"cannot reach the supervisor's operator door {path}: {exc.strerror or exc}; "
            "is the platform running (`plexus status`)?"
        ) from None
    except OperatorDoorError:
        conn.close()
        raise
    if not answer.get("ok"):
        conn.close()
        raise OperatorDoorError(f"the supervisor refused an operator grant: {answer.get('error')}")
    conn.settimeout(None)
    _held.append(conn)
    return str(answer.get("grant", ""))
