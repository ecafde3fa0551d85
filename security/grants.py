"""Live credentials as the broker (and the store) hold them: in memory, granted by the
supervisor, bound to a process, taken back at will.

A `Grant` says: the client key `public_key` speaks for `app_id`, from process `pid` or
its descendants (a launched app or a platform service), or from any process of the
platform's user outside the platform's process tree until `expires_at` (an external app
that `plexus env` let in). Only the supervisor registers and revokes grants, over the
private channel it handed the service at launch (`security.grant_channel`); nothing on
disk can add one.

`GrantRegistry.admit` is the whole ZAP decision, pure (the process tree and the clock
are passed in):

    key registered, not expired, process check passes        -> accepted as its app
    key registered, used from another process                -> refused "foreign-process"
    key registered, expired                                  -> refused "expired"
    key unknown, peer of our uid outside the platform tree   -> accepted as the operator
    key unknown otherwise                                    -> refused "unknown-key"

The operator is the person who runs the platform: any process of the platform's OS user
that no supervised app started (docs/security.md has the trust boundary). The
supervisor is a child subreaper, so app descendants stay inside its tree.
"""

from __future__ import annotations

import secrets
from collections.abc import Set
from dataclasses import dataclass
from enum import StrEnum

from security.peers import Peer, ProcessTree, descends_from, lineage

OPERATOR_ID = "$cli"
"""The identity every operator connection gets."""
OPERATOR_GRANT = "operator"
"""The User-Id of operator connections (a grant that is never revoked)."""


class GrantKind(StrEnum):
    APP = "app"
    """A launched app: bound to its process tree, revoked when it exits."""
    SERVICE = "service"
    """A platform service or the supervisor (`$...`): bound to its process."""
    EXTERNAL = "external"
    """`plexus env APP_ID`: any process of the user outside the platform's tree, expiring."""
    OPERATOR = "operator"
    """A key for the operator where the kernel names no process (TCP)."""


class Refusal(StrEnum):
    UNKNOWN_KEY = "unknown-key"
    FOREIGN_PROCESS = "foreign-process"
    EXPIRED = "expired"
    WRONG_USER = "wrong-user"
    NOT_HERE = "not-admitted-here"


@dataclass(frozen=True, slots=True)
class Grant:
    """One live credential (see the module docstring)."""

    grant_id: str
    app_id: str
    public_key: bytes
    kind: GrantKind
    pid: int | None = None
    expires_at: float | None = None
    """Wall-clock seconds (credentials expire by the calendar, like certificates)."""
    issued_at: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """For `plexus credentials list` (no key material)."""
        return {
            "id": self.grant_id,
            "app": self.app_id,
            "kind": self.kind.value,
            "pid": self.pid,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }


def new_grant_id() -> str:
    return "g" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one ZAP request: accepted as `grant`, or refused with `refusal`;
    `claimed` is the identity the key belongs to (when it belongs to one)."""

    grant: Grant | None
    refusal: Refusal | None
    reason: str
    claimed: str = ""

    @property
    def accepted(self) -> bool:
        return self.refusal is None


_OPERATOR = Grant(OPERATOR_GRANT, OPERATOR_ID, b"", GrantKind.OPERATOR)


class GrantRegistry:
    """Every live grant by key and by id, and the admission rules over them."""

    def __init__(self, uid: int, tree: ProcessTree) -> None:
        self.uid = uid
        self.tree = tree
        self.supervisor_pid: int | None = None
        """The root of the platform's process tree (told by the supervisor)."""
        self._by_key: dict[bytes, Grant] = {}
        self._by_id: dict[str, Grant] = {OPERATOR_GRANT: _OPERATOR}

    def __len__(self) -> int:
        return len(self._by_key)

    def grants(self) -> list[Grant]:
        return list(self._by_key.values())

    def identity(self, grant_id: str) -> str | None:
        """The app id of the live grant `grant_id` (None: revoked or never granted)."""
        grant = self._by_id.get(grant_id)
        return None if grant is None else grant.app_id

    def register(self, grant: Grant) -> list[Grant]:
        """Add `grant`; grants already holding its key or its id are revoked (returned)."""
        if grant.grant_id == OPERATOR_GRANT or len(grant.public_key) != 32:
            raise ValueError("a grant needs its own id and a 32-byte key")
        if self._by_id.get(grant.grant_id) == grant:
            return []  # told again (a resend): nothing changes
        replaced = [
            old
            for old in (self._by_key.get(grant.public_key), self._by_id.get(grant.grant_id))
            if old is not None
        ]
        for old in replaced:
            self.revoke(old.grant_id)
        self._by_key[grant.public_key] = grant
        self._by_id[grant.grant_id] = grant
        return replaced

    def revoke(self, grant_id: str) -> Grant | None:
        """Take `grant_id` back; the grant, or None when there was none."""
        if grant_id == OPERATOR_GRANT:
            return None
        grant = self._by_id.pop(grant_id, None)
        if grant is not None:
            self._by_key.pop(grant.public_key, None)
        return grant

    def expired(self, now: float) -> list[Grant]:
        """Revoke and return every grant whose time is over."""
        over = [
            g for g in self._by_key.values() if g.expires_at is not None and g.expires_at <= now
        ]
        for grant in over:
            self.revoke(grant.grant_id)
        return over

    def admit(
        self, key: bytes, peer: Peer, now: float, admitted: Set[str] | None = None
    ) -> Admission:
        """The ZAP decision for client key `key` from `peer`; `admitted` limits the
        identities this socket takes (None: any)."""
        grant = self._by_key.get(key)
        if grant is None:
            return self._operator(peer, admitted)
        claimed = grant.app_id
        if grant.expires_at is not None and grant.expires_at <= now:
            self.revoke(grant.grant_id)
            return Admission(None, Refusal.EXPIRED, f"the credential of {claimed} expired", claimed)
        problem = self._process_problem(grant, peer)
        if problem:
            return Admission(None, Refusal.FOREIGN_PROCESS, problem, claimed)
        if admitted is not None and claimed not in admitted:
            return Admission(None, Refusal.NOT_HERE, f"{claimed} may not connect here", claimed)
        return Admission(grant, None, "OK", claimed)

    def _process_problem(self, grant: Grant, peer: Peer) -> str:
        """Why `peer` may not use `grant` ("" when it may)."""
        if peer.pid is None:  # TCP: the kernel names no process; the key alone decides
            return ""
        if peer.uid != self.uid:
            return f"the credential of {grant.app_id} used by uid {peer.uid}"
        if grant.kind in (GrantKind.APP, GrantKind.SERVICE):
            if grant.pid is None or not descends_from(self.tree, peer.pid, grant.pid):
                return (
                    f"the credential of {grant.app_id} (pid {grant.pid}) used from pid "
                    f"{peer.pid}, not that process or its descendant"
                )
            return ""
        if self._inside_platform(peer.pid):  # an external app's key used by a launched app
            return f"the credential of external app {grant.app_id} used from inside the platform"
        return ""

    def _operator(self, peer: Peer, admitted: Set[str] | None) -> Admission:
        refused = Admission(None, Refusal.UNKNOWN_KEY, "unknown credential")
        if peer.pid is None or self.supervisor_pid is None:
            return refused
        if peer.uid != self.uid:
            return Admission(None, Refusal.WRONG_USER, f"uid {peer.uid} is not the platform's user")
        if self._inside_platform(peer.pid):
            return refused
        if admitted is not None and OPERATOR_ID not in admitted:
            return Admission(
                None, Refusal.NOT_HERE, "the operator may not connect here", OPERATOR_ID
            )
        return Admission(_OPERATOR, None, "OK", OPERATOR_ID)

    def owner_of(self, pid: int | None) -> str:
        """The app (or service) whose process tree `pid` is in ("" when none, or unknown):
        who really made a refused attempt, whatever it claimed."""
        if pid is None:
            return ""
        roots = {g.pid: g.app_id for g in self._by_key.values() if g.pid is not None}
        for ancestor in lineage(self.tree, pid):
            if ancestor in roots and ancestor != self.supervisor_pid:
                return roots[ancestor]
        return ""

    def _inside_platform(self, pid: int) -> bool:
        root = self.supervisor_pid
        return root is not None and descends_from(self.tree, pid, root)
