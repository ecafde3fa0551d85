"""A race-free wake-up pipe: app threads make the I/O thread look at its queues.

An app thread appends to a queue, then calls `wake()`; the I/O thread polls the pipe's
read end, calls `drain()` when it is readable, then looks at every queue. `wake()` writes
one byte only when no wake-up is pending, so a busy publisher costs a flag test, not a
syscall per message.

The order inside `drain()` is the whole point. The flag means "a byte is in the pipe, or
the I/O thread has yet to look at its queues". Clearing it *before* emptying the pipe
(the old `clients/connection.py` did) loses wake-ups: a `wake()` landing between the two
steps sets the flag and writes a byte, the read then swallows that byte, and the flag
stays set with an empty pipe, so every later `wake()` is skipped and publishes wait for
the poll timeout. `drain()` therefore empties the pipe first and clears the flag second;
a `wake()` in between sees the flag still set and skips its write, which is safe because
the caller looks at the queues after `drain()` returns, and one after the clear writes
a byte that makes the next poll return at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable


class Wakeup:
    """One pipe and one flag; `wake()` from any thread, the rest from the owner's."""

    def __init__(self, between: Callable[[], None] | None = None) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self._pending = False
        self._closed = False
        self._between = between
        """Test seam: runs between emptying the pipe and clearing the flag."""

    def wake(self) -> None:
        """Make the owner look at its queues soon (append to the queue first)."""
        if not self._pending and not self._closed:
            self._pending = True
            try:
                os.write(self._write_fd, b"!")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already
            except OSError:
                pass  # closed meanwhile: the owner has ended

    def drain(self) -> None:
        """Owner: empty the pipe, then allow the next wake-up; look at the queues after."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)  # at most a byte or two: the flag gates the writes
        if self._between is not None:
            self._between()
        self._pending = False

    def close(self) -> None:
        self._closed = True
        os.close(self.fd)
        os.close(self._write_fd)
