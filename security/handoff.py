"""Secrets and settings handed from a parent to its child over an inherited pipe.

The supervisor never puts a credential (or the platform config) on a command line or in
the environment: it writes the bytes into a pipe and the child inherits the read end,
whose number it names in an environment variable (`PLEXUS_CREDENTIAL_FD`,
`PLEXUS_CONFIG_FD`). Both ends live here, on the bottom floor, so the broker, the
services and the client library read a descriptor the same way.

A pipe can be read once, so what a process read is kept for later readers in the same
process (two `Bus` objects of one app share its credential).
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Mapping

CREDENTIAL_FD_VARIABLE = "PLEXUS_CREDENTIAL_FD"
"""Names the inherited descriptor holding an app's credential."""
TOKEN_VARIABLE = "PLEXUS_TOKEN"  # noqa: S105 - the name of a variable, not a secret
"""Holds the credential itself, for an external app (`plexus env APP_ID`)."""

MAX_HANDOFF_BYTES = 60 * 1024
"""Written before the child runs, so it must fit a pipe's buffer (64 KiB on Linux)."""
READ_TIMEOUT_S = 5.0
"""A writer that keeps the pipe open but sends nothing is given up on after this."""

_read: dict[int, bytes] = {}
_read_lock = threading.Lock()


class HandoffError(Exception):
    """An inherited descriptor is missing, malformed or unreadable; `hint` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def handoff_pipe(data: bytes) -> int:
    """A pipe holding `data`, write end closed; returns the read end for a child to inherit."""
    if len(data) > MAX_HANDOFF_BYTES:
        raise HandoffError(f"{len(data)} bytes do not fit a pipe (at most {MAX_HANDOFF_BYTES})")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def read_handoff(fd: int) -> bytes:
    """Everything written into the inherited pipe `fd` (until EOF), then close it.

    Cached per descriptor: a second call in the same process returns the same bytes.
    """
    with _read_lock:
        if fd not in _read:
            _read[fd] = _drain(fd)
        return _read[fd]


def _drain(fd: int) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], READ_TIMEOUT_S)
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_fd_variable(name: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The bytes of the descriptor environment variable `name` names; None when unset."""
    text = (environ if environ is not None else os.environ).get(name)
    if not text:
        return None
    try:
        fd = int(text)
    except ValueError:
        raise HandoffError(f"{name}={text!r} is not a descriptor number") from None
    try:
        return read_handoff(fd)
    except OSError as exc:
        raise HandoffError(
            f"cannot read {name} (descriptor {fd}): {exc.strerror}",
            hint="the supervisor hands it over at launch; start the process via `plexus run`",
        ) from None


def credential_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """This process's credential: `PLEXUS_TOKEN`, else the pipe `PLEXUS_CREDENTIAL_FD` names."""
    env = environ if environ is not None else os.environ
    token = env.get(TOKEN_VARIABLE)
    if token:
        return token
    data = read_fd_variable(CREDENTIAL_FD_VARIABLE, env)
    if data is None:
        raise HandoffError(
            f"no credential: neither {CREDENTIAL_FD_VARIABLE} nor {TOKEN_VARIABLE} is set",
            hint="launch the app through `plexus run`, or `eval $(plexus env APP_ID)` first",
        )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise HandoffError(
            f"the credential on {CREDENTIAL_FD_VARIABLE} is not UTF-8 text"
        ) from None
