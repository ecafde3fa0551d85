"""Who may connect: the supervisor is the only one who grants, and it grants in memory.

It keeps the platform's two server key pairs (the broker's and the store's, made at
platform start, kept across service restarts so clients reconnect to the key they
pinned), the book of every live grant, and one private channel to each service that
authenticates (the broker, the store). A grant goes to every such service; a service
that restarts gets the whole book again on its new channel.

A launched process gets its credential only after its grant is registered, bound to its
pid: the supervisor spawns it with the read end of an empty pipe, registers, and only
then writes the token (`CredentialGate`), so the app cannot connect before the broker
knows it, and a copy of its key is useless from any other process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from security.credentials import Credential, ServerKeys
from security.grant_channel import GrantSender, channel_pair
from security.grants import Grant, GrantKind, new_grant_id
from security.handoff import handoff_pipe


@dataclass
class CredentialGate:
    """A pipe the child inherits empty; `open` writes the token once the grant is in."""

    read_end: int
    write_end: int

    @classmethod
    def new(cls) -> CredentialGate:
        read_end, write_end = os.pipe()
        return cls(read_end, write_end)

    def child_spawned(self) -> None:
        """The child holds the read end now; ours goes."""
        os.close(self.read_end)

    def open(self, credential: Credential) -> None:
        try:
            os.write(self.write_end, credential.token.encode())
        except OSError:  # the child died before reading: its grant is revoked at its exit
            pass
        finally:
            os.close(self.write_end)

    def abandon(self) -> None:
        for fd in (self.read_end, self.write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class ServiceChannel:
    """What one authenticating service is handed: its server key and its grant channel."""

    key_fd: int
    channel_fd: int
    ours: socket.socket

    def fds(self) -> list[int]:
        return [self.key_fd, self.channel_fd]

    def child_spawned(self) -> None:
        for fd in self.fds():
            os.close(fd)


@dataclass
class Identities:
    """The platform's keys, its live grants and the channels they are sent on."""

    broker_keys: ServerKeys = field(default_factory=ServerKeys.generate)
    store_keys: ServerKeys = field(default_factory=ServerKeys.generate)
    wall_clock: Callable[[], float] = time.time
    platform_root: int | None = None
    """The process whose descendants are the platform's (None: this one, the supervisor);
    the operator is whoever of the user is outside it."""
    grants: dict[str, Grant] = field(default_factory=dict)
    _senders: dict[str, GrantSender] = field(default_factory=dict)

    # -- channels to the services ---------------------------------------------------------

    def service_channel(self, service: str) -> ServiceChannel:
        """The key pipe and grant channel for a launch of `service` ("broker" or
        "persistence"); after the spawn, `attach` it."""
        keys = self.broker_keys if service == "broker" else self.store_keys
        ours, theirs = channel_pair()
        return ServiceChannel(handoff_pipe(keys.encoded()), theirs, ours)

    def attach(self, service: str, channel: ServiceChannel) -> None:
        """`service` runs with `channel`: tell it the platform and every live grant."""
        channel.child_spawned()
        old = self._senders.pop(service, None)
        if old is not None:
            old.close()
        sender = GrantSender(channel.ours)
        self._senders[service] = sender
        sender.platform(self.platform_root or os.getpid())
        for grant in list(self.grants.values()):
            sender.grant(grant)

    def service_started(
        self,
        service: str,
        channel: ServiceChannel,
        pid: int,
        gate: CredentialGate | None = None,
        identity: str | None = None,
    ) -> Grant | None:
        """`service` was spawned as `pid` with `channel` (and, for a bus client, `gate`):
        attach the channel, then grant `identity` to that pid and only then open the gate.
        The grant, or None for a service that is no bus client."""
        self.attach(service, channel)
        if gate is None or identity is None:
            return None
        gate.child_spawned()
        grant, credential = self.grant(identity, GrantKind.SERVICE, pid=pid)
        gate.open(credential)
        return grant

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()

    # -- grants ---------------------------------------------------------------------------

    def mint(self) -> Credential:
        return Credential.mint(self.broker_keys.public, self.store_keys.public)

    def grant(
        self,
        app_id: str,
        kind: GrantKind,
        pid: int | None = None,
        ttl_s: float | None = None,
    ) -> tuple[Grant, Credential]:
        """A new credential for `app_id`, registered with every service."""
        credential = self.mint()
        return self.grant_key(app_id, kind, credential.public, pid, ttl_s), credential

    def grant_key(
        self,
        app_id: str,
        kind: GrantKind,
        public_key: bytes,
        pid: int | None = None,
        ttl_s: float | None = None,
    ) -> Grant:
        """Register `public_key` (whose secret someone else holds) for `app_id`."""
        now = self.wall_clock()
        grant = Grant(
            grant_id=new_grant_id(),
            app_id=app_id,
            public_key=public_key,
            kind=kind,
            pid=pid,
            expires_at=now + ttl_s if ttl_s is not None else None,
            issued_at=now,
        )
        self.grants[grant.grant_id] = grant
        for sender in self._senders.values():
            sender.grant(grant)
        return grant

    def revoke(self, grant_id: str) -> Grant | None:
        grant = self.grants.pop(grant_id, None)
        if grant is not None:
            for sender in self._senders.values():
                sender.revoke(grant_id)
        return grant

    def expire(self) -> list[Grant]:
        """Forget grants whose time is over (the services expire them on their own)."""
        now = self.wall_clock()
        over = [g for g in self.grants.values() if g.expires_at is not None and g.expires_at <= now]
        for grant in over:
            self.revoke(grant.grant_id)
        return over

    def external(self) -> list[Grant]:
        return [g for g in self.grants.values() if g.kind is GrantKind.EXTERNAL]
