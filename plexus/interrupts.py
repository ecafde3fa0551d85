"""Ctrl-C as a flag the command's loop checks, never an exception inside the client.

A KeyboardInterrupt raised at an arbitrary bytecode can land inside the client library
(between setting a wake-up flag and writing its byte, say) and leave it unable to close,
so `plexus subscribe` could hang after Ctrl-C. Long-running commands therefore record
SIGINT here (the handler only records, as the supervisor's do), stop at their next check,
close the bus cleanly and exit 130 after what they printed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """An event set by SIGINT while the block runs; the previous handler is restored."""
    interrupted = threading.Event()

    def record(_signum: int, _frame: FrameType | None) -> None:
        interrupted.set()

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
