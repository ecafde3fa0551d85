"""Secrets and settings handed from a parent to its child over an inherited pipe.

The supervisor never puts a credential (or the platform config) on a command line or in
the environment: it writes the bytes into a pipe and the child inherits the read end,
whose number it names in an environment variable (`PLEXUS_CREDENTIAL_FD`,
`PLEXUS_CONFIG_FD`). Both ends live here, on the bottom floor, so the broker, the
services and the client library read a descriptor the same way.

A pipe can be read once, so the credential a process read is kept for later readers in
the same process (two `Bus` objects of one app share it); other handed-over bytes (the
config) are read once, at start, by their one reader.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Mapping

CREDENTIAL_FD_VARIABLE = "PLEXUS_CREDENTIAL_FD"
"""Names the inherited descriptor holding an app's credential."""
SERVER_KEY_FD_VARIABLE = "PLEXUS_SERVER_KEY_FD"
"""Names the inherited descriptor holding a server's CurveZMQ secret key (broker, store)."""
TOKEN_VARIABLE = "PLEXUS_TOKEN"  # noqa: S105 - the name of a variable, not a secret
"""Holds the credential itself, for an external app (`plexus env APP_ID`)."""

MAX_HANDOFF_BYTES = 60 * 1024
"""Written before the child runs, so it must fit a pipe's buffer (64 KiB on Linux)."""
READ_TIMEOUT_S = 5.0
"""A writer that keeps the pipe open but sends nothing is given up on after this."""

_credentials: dict[int, str] = {}
_credentials_lock = threading.Lock()


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
    """Everything written into the inherited pipe `fd` (until EOF), then close it."""
    chunks: list[bytes] = []
    can_wait = os.name != "nt"  # Windows' select takes sockets only: read, blocking, there
    try:
        while True:
            if can_wait and not select.select([fd], [], [], READ_TIMEOUT_S)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _descriptor(name: str, environ: Mapping[str, str]) -> int | None:
    text = environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise HandoffError(f"{name}={text!r} is not a descriptor number") from None


def read_fd_variable(name: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The bytes in the descriptor environment variable `name` names (None when unset),
    read to the end and closed: call it once."""
    fd = _descriptor(name, environ if environ is not None else os.environ)
    return None if fd is None else _read_named(name, fd)


def _read_named(name: str, fd: int) -> bytes:
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
    fd = _descriptor(CREDENTIAL_FD_VARIABLE, env)
    if fd is None:
        raise HandoffError(
            f"no credential: neither {CREDENTIAL_FD_VARIABLE} nor {TOKEN_VARIABLE} is set",
            hint="launch the app through `plexus run`, or `eval $(plexus env APP_ID)` first",
        )
    with _credentials_lock:  # the pipe can be read once; later Bus objects reuse it
        if fd not in _credentials:
            _credentials[fd] = _decoded(_read_named(CREDENTIAL_FD_VARIABLE, fd))
        return _credentials[fd]


def _decoded(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise HandoffError(
            f"the credential on {CREDENTIAL_FD_VARIABLE} is not UTF-8 text"
        ) from None
