"""The private channel on which the supervisor grants and revokes credentials.

A socket pair: the supervisor keeps one end, the service (the broker, the store) inherits
the other as `PLEXUS_GRANTS_FD`. No path names it, so no other process can write to it;
it is the only way a grant enters a service's memory. Messages are msgpack maps, each
behind a 4-byte length:

    {"op": "platform", "supervisor_pid": N}       the root of the platform's process tree
    {"op": "grant", "id", "app", "key", "kind", "pid", "expires_at", "issued_at"}
    {"op": "revoke", "id"}

The service reads without blocking from its poll loop, and drains the channel before it
refuses an unknown key, so a grant the supervisor sent before handing an app its key is
always seen first.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from security.grants import Grant, GrantKind, GrantRegistry

GRANTS_FD_VARIABLE = "PLEXUS_GRANTS_FD"
_HEADER = struct.Struct(">I")
MAX_MESSAGE_BYTES = 64 * 1024
SEND_TIMEOUT_S = 5.0


class GrantChannelError(Exception):
    """The channel is missing or sent something that is not a grant command."""


def channel_pair() -> tuple[socket.socket, int]:
    """(the supervisor's end, the descriptor the child inherits; close it after spawning)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(SEND_TIMEOUT_S)
    child = theirs.detach()
    os.set_inheritable(child, True)
    return ours, child


def grant_message(grant: Grant) -> dict[str, Any]:
    return {
        "op": "grant",
        "id": grant.grant_id,
        "app": grant.app_id,
        "key": grant.public_key,
        "kind": grant.kind.value,
        "pid": grant.pid,
        "expires_at": grant.expires_at,
        "issued_at": grant.issued_at,
    }


class GrantSender:
    """The supervisor's end: send commands; a dead service is noted, never fatal."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.alive = True

    def platform(self, supervisor_pid: int) -> None:
        self._send({"op": "platform", "supervisor_pid": supervisor_pid})

    def grant(self, grant: Grant) -> None:
        self._send(grant_message(grant))

    def revoke(self, grant_id: str) -> None:
        self._send({"op": "revoke", "id": grant_id})

    def close(self) -> None:
        self.alive = False
        self._sock.close()

    def _send(self, message: Mapping[str, Any]) -> None:
        if not self.alive:
            return
        body = msgpack.packb(message, use_bin_type=True)
        try:
            self._sock.sendall(_HEADER.pack(len(body)) + body)
        except OSError:  # the service died; its successor gets every live grant again
            self.close()


@dataclass(frozen=True, slots=True)
class Applied:
    """What one read changed: grants revoked (their sessions must end)."""

    revoked: tuple[Grant, ...] = ()
    closed: bool = False


class GrantReceiver:
    """The service's end: `apply` reads what is waiting into the registry."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._buffer = b""
        self.closed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> GrantReceiver | None:
        text = (environ if environ is not None else os.environ).get(GRANTS_FD_VARIABLE)
        if not text:
            return None
        try:
            return cls(int(text))
        except (ValueError, OSError) as exc:
            raise GrantChannelError(f"{GRANTS_FD_VARIABLE}={text!r} is not usable: {exc}") from None

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    def apply(self, registry: GrantRegistry) -> Applied:
        """Apply every complete command waiting on the channel."""
        if self.closed:
            return Applied(closed=True)
        while True:
            try:
                chunk = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True  # the supervisor is gone: keep what was granted
                break
            self._buffer += chunk
        revoked: list[Grant] = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_MESSAGE_BYTES:
                raise GrantChannelError(f"a grant command of {size} bytes")
            if len(self._buffer) < _HEADER.size + size:
                break
            body = self._buffer[_HEADER.size : _HEADER.size + size]
            self._buffer = self._buffer[_HEADER.size + size :]
            revoked += apply_command(registry, body)
        return Applied(tuple(revoked), self.closed)


def apply_command(registry: GrantRegistry, body: bytes) -> list[Grant]:
    """One command into `registry`; the grants it revoked."""
    try:
        message = msgpack.unpackb(body, raw=False)
        op = message["op"]
        if op == "platform":
            registry.supervisor_pid = int(message["supervisor_pid"])
            return []
        if op == "revoke":
            gone = registry.revoke(str(message["id"]))
            return [gone] if gone is not None else []
        if op == "grant":
            key = message["key"]
            if not isinstance(key, bytes) or len(key) != 32:
                raise GrantChannelError("a grant's key must be 32 bytes")
            pid = message.get("pid")
            expires = message.get("expires_at")
            grant = Grant(
                grant_id=str(message["id"]),
                app_id=str(message["app"]),
                public_key=key,
                kind=GrantKind(message["kind"]),
                pid=int(pid) if pid is not None else None,
                expires_at=float(expires) if expires is not None else None,
                issued_at=float(message.get("issued_at") or 0.0),
            )
            return registry.register(grant)
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise GrantChannelError(f"not a grant command: {exc}") from None
    raise GrantChannelError(f"unknown grant command {op!r}")
