"""The supervisor's side of the operator's door (wire and rule: `security.operator_door`).

A thread accepts on `RUN/operator`; each connection gets a thread of its own that reads
the key, asks the kernel who connected, and refuses a process of another user or one
inside the platform's tree (a supervised app or its descendant, escaped ones included:
the supervisor is their subreaper). An admitted key is granted through `grant`, which the
supervisor runs on its main loop (grants are the main loop's alone); the thread then waits
for the connection to close and revokes the grant through `revoke`. Connections at once are
bounded, so a flood of idle connections costs at most `MAX_OPEN` threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from broker.logs import event
from security.operator_door import (
    KEY_BYTES,
    DoorPeer,
    encode_answer,
    peer_of_connection,
    read_exactly,
)
from security.peers import LiveProcessTree, ProcessTree, descends_from

log = logging.getLogger("plexus.supervisor")

MAX_OPEN = 64
"""Door connections held at once (each is a live operator command)."""
READ_TIMEOUT_S = 5.0


def door_refusal(peer: DoorPeer, uid: int, root: int, tree: ProcessTree) -> str:
    """Why `peer` gets no operator grant ("" when it does): the platform user's process
    outside the tree rooted at the supervisor `root`."""
    if peer.uid != uid:
        return f"uid {peer.uid} is not the platform's user"
    if peer.pid <= 0:
        return "the kernel named no process"
    if descends_from(tree, peer.pid, root):
        return f"pid {peer.pid} is inside the platform (a supervised app or its descendant)"
    return ""


class OperatorDoor:
    """Listens on `path` until `close`; `grant(key, pid)` returns a grant id or raises
    ValueError with the reason, `revoke(grant_id)` takes it back."""

    def __init__(
        self,
        path: Path,
        grant: Callable[[bytes, int], str],
        revoke: Callable[[str], None],
        tree: ProcessTree | None = None,
    ) -> None:
        self.path = path
        self._grant = grant
        self._revoke = revoke
        self._tree = tree or LiveProcessTree()
        self._open = threading.BoundedSemaphore(MAX_OPEN)
        self._closed = threading.Event()
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_mask = os.umask(0o177)  # the socket file is 0600 from its first moment
        try:
            listener.bind(os.fspath(path))
        finally:
            os.umask(old_mask)
        listener.listen(MAX_OPEN)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="operator-door", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open.acquire(blocking=False):
                self._answer(conn, {"ok": False, "error": "too many operator commands at once"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(READ_TIMEOUT_S)
            grant_id = self._admit(conn)
            if grant_id is None:
                return
            conn.settimeout(None)
            try:
                while conn.recv(4096):  # anything more is ignored; the end revokes
                    pass
            except OSError:
                pass
            self._revoke(grant_id)
            event(log, "operator-grant-ended", grant=grant_id)
        finally:
            conn.close()
            self._open.release()

    def _admit(self, conn: socket.socket) -> str | None:
        try:
            key = read_exactly(conn, KEY_BYTES)
            peer = peer_of_connection(conn)
        except OSError:
            return None
        if len(key) != KEY_BYTES:
            self._answer(conn, {"ok": False, "error": f"send a {KEY_BYTES}-byte public key"})
            return None
        why = door_refusal(peer, os.getuid(), os.getpid(), self._tree)
        if why:
            event(log, "operator-refused", logging.WARNING, pid=peer.pid, uid=peer.uid, reason=why)
            self._answer(conn, {"ok": False, "error": why})
            return None
        try:
            grant_id = self._grant(key, peer.pid)
        except ValueError as exc:
            self._answer(conn, {"ok": False, "error": str(exc)})
            return None
        event(log, "operator-granted", pid=peer.pid, grant=grant_id)
        if not self._answer(conn, {"ok": True, "grant": grant_id}):
            self._revoke(grant_id)
            return None
        return grant_id

    @staticmethod
    def _answer(conn: socket.socket, answer: dict[str, object]) -> bool:
        try:
            conn.sendall(encode_answer(answer))
        except OSError:
            return False
        return True
