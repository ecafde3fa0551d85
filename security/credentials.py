"""An app's credential: its own CurveZMQ key pair and the platform's pinned server keys.

Every connection to the bus, the event stream and the store is CurveZMQ, over ipc as over
TCP, so a credential is never sent to anyone: the client proves it holds the secret key,
and it talks only to a server that proves it holds the broker's (or the store's) secret
key. A process that binds the bus path in the broker's place learns nothing (the client's
handshake fails against the pinned key).

A credential travels as one token, `px1.` + base64url of three 32-byte keys: the client's
secret key, the broker's public key, the store's public key. The supervisor mints it at
each launch (`mint`) and hands it over an inherited pipe; `plexus env` prints one for an
external app. What the broker accepts is decided by the grant registered for the public
key (`security.grants`), never by the token itself: a token nobody registered is refused.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from security.handoff import SERVER_KEY_FD_VARIABLE, HandoffError, read_fd_variable

TOKEN_PREFIX = "px1."  # noqa: S105 - a format marker, not a secret
_KEY_BYTES = 32


class CredentialError(Exception):
    """A token that is not a Plexus credential (wrong prefix, length or encoding)."""


def _z85(raw: bytes) -> bytes:
    encoded: bytes = z85.encode(raw)
    return encoded


def public_of(secret: bytes) -> bytes:
    """The raw 32-byte public key of the raw 32-byte `secret` key."""
    public: bytes = z85.decode(zmq.curve_public(_z85(secret)))
    return public


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """A server's key pair (raw 32 bytes each): the broker's or the store's."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> ServerKeys:
        public, secret = zmq.curve_keypair()
        return cls(z85.decode(public), z85.decode(secret))

    def encoded(self) -> bytes:
        """The secret key as handed to the service over its descriptor."""
        return base64.urlsafe_b64encode(self.secret)

    @classmethod
    def decoded(cls, data: bytes) -> ServerKeys:
        try:
            secret = base64.urlsafe_b64decode(data.strip())
        except (binascii.Error, ValueError):
            raise CredentialError("the server key handed over is not base64") from None
        if len(secret) != _KEY_BYTES:
            raise CredentialError("the server key handed over is not 32 bytes")
        return cls(public_of(secret), secret)

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CurveZMQ server with this key."""
        sock.curve_server = True
        sock.curve_secretkey = _z85(self.secret)


@dataclass(frozen=True, slots=True)
class Credential:
    """A client key pair and the server keys it pins."""

    secret: bytes
    broker_key: bytes
    store_key: bytes

    @classmethod
    def mint(cls, broker_key: bytes, store_key: bytes) -> Credential:
        """A fresh client key pair pinning `broker_key` and `store_key` (raw public keys)."""
        _public, secret = zmq.curve_keypair()
        return cls(z85.decode(secret), broker_key, store_key)

    @property
    def public(self) -> bytes:
        return public_of(self.secret)

    @property
    def token(self) -> str:
        raw = self.secret + self.broker_key + self.store_key
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, token: str) -> Credential:
        """The credential a token holds; `CredentialError` for anything else."""
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise CredentialError("not a Plexus credential (expected a token starting px1.)")
        body = token[len(TOKEN_PREFIX) :].strip()
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise CredentialError("the credential is not base64url") from None
        if len(raw) != 3 * _KEY_BYTES:
            raise CredentialError("the credential has the wrong length")
        return cls(raw[:32], raw[32:64], raw[64:])

    def connect_to_broker(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CurveZMQ client of the broker with this key pair."""
        self._client(sock, self.broker_key)

    def connect_to_store(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a CurveZMQ client of the store with this key pair."""
        self._client(sock, self.store_key)

    def _client(self, sock: zmq.Socket[Any], server: bytes) -> None:
        sock.curve_serverkey = _z85(server)
        sock.curve_publickey = _z85(self.public)
        sock.curve_secretkey = _z85(self.secret)


def server_keys_from_environment() -> ServerKeys:
    """The server key pair the supervisor handed this service (`PLEXUS_SERVER_KEY_FD`)."""
    data = read_fd_variable(SERVER_KEY_FD_VARIABLE)
    if data is None:
        raise HandoffError(
            f"no server key: {SERVER_KEY_FD_VARIABLE} is not set",
            hint="platform services are started by the supervisor (`plexus run`)",
        )
    try:
        return ServerKeys.decoded(data)
    except CredentialError as exc:
        raise HandoffError(str(exc)) from None
