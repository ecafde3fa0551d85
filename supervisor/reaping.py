"""The supervisor as child subreaper: escaped app descendants stay in its tree.

An app that double-forks would leave a grandchild re-parented to init, outside every
supervised tree, where the broker would take it for the operator
(`security.grants`). With PR_SET_CHILD_SUBREAPER (Linux) such orphans are re-parented to
the supervisor instead: still inside the platform's tree, refused as the operator, and
reaped here (never left as zombies). Elsewhere the call does nothing, and docs/security.md
says what that leaves open.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

import psutil

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process a child subreaper; whether the OS did."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def reap_adopted(owned: Iterable[int]) -> int:
    """Reap finished children this process adopted (not the ones in `owned`, which their
    owners wait for); how many were reaped."""
    keep = set(owned)
    reaped = 0
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return 0
    for child in children:
        if child.pid in keep:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                continue
            pid, _status = os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError, OSError):
            continue
        reaped += 1 if pid else 0
    return reaped
