"""Who is on the other end of a connection: the kernel's word, and the process tree.

On ipc, libzmq's ZAP request carries the peer's credentials as the kernel gave them
(SO_PEERCRED) in its address frame, `localhost:UID:GID:PID` (checked with pyzmq 27 and
libzmq 4.3.5). Nothing the client sends can change it. Over TCP there is no such word:
the address is an IP, and `Peer.pid` is None.

`ProcessTree` answers "is this pid the launched app or one of its descendants?" by
following parent links; the supervisor makes itself a child subreaper, so a process that
escapes its app's tree by double-forking is re-parented to the supervisor and stays inside
the platform's tree, never outside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import psutil

MAX_DEPTH = 64
"""Parent links followed at most (a real tree is a handful deep)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """What the kernel says about a connecting process (None: not known, e.g. TCP)."""

    uid: int | None
    pid: int | None
    address: str


def peer_of(address: str) -> Peer:
    """The peer an ipc ZAP address `localhost:UID:GID:PID` names; anything else: unknown."""
    parts = address.split(":")
    if len(parts) == 4 and parts[0] == "localhost":
        try:
            uid, _gid, pid = (int(p) for p in parts[1:])
        except ValueError:
            return Peer(None, None, address)
        if uid >= 0 and pid > 0:
            return Peer(uid, pid, address)
    return Peer(None, None, address)


class ProcessTree(Protocol):
    """Parent links of live processes (injected, so the decisions are testable)."""

    def parent(self, pid: int) -> int | None: ...


class LiveProcessTree:
    """The machine's process table, read through psutil at each question."""

    def parent(self, pid: int) -> int | None:
        try:
            parent: int = psutil.Process(pid).ppid()
        except (psutil.Error, ValueError):
            return None
        return parent


def lineage(tree: ProcessTree, pid: int) -> Iterator[int]:
    """`pid`, its parent, its grandparent, ... up to init (at most MAX_DEPTH; a loop or an
    unknown parent ends it)."""
    current: int | None = pid
    for _ in range(MAX_DEPTH):
        if current is None or current <= 0:
            return
        yield current
        parent = tree.parent(current)
        if parent == current:
            return
        current = parent


def descends_from(tree: ProcessTree, pid: int, root: int) -> bool:
    """Whether `pid` is `root` or one of its descendants."""
    return root in lineage(tree, pid)
