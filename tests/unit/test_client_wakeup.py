"""The wake-up pipe never loses a wake-up, and the test below catches the old ordering.

The lost wake-up of the old I/O loop: it cleared its "awake" flag, then emptied the pipe.
A `wake()` landing between the two steps wrote a byte the read then swallowed, leaving the
flag set over an empty pipe, so every later `wake()` skipped its write and publishes
waited for the poll timeout. The seam `between` runs exactly there, deterministically.
"""

from __future__ import annotations

import contextlib
import os
import select

import pytest

from clients.wakeup import Wakeup


class OldOrderWakeup(Wakeup):
    """The old ordering (flag cleared, then the pipe emptied), to prove the test bites."""

    def drain(self) -> None:
        self._pending = False
        if self._between is not None:
            self._between()
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def wake_lands_during_drain(kind: type[Wakeup]) -> bool:
    """An app thread's wake() lands inside drain(); then a new publish wakes again.
    True when that second wake-up reaches the poller (the pipe is readable)."""
    holder: list[Wakeup] = []

    def app_thread_wakes() -> None:
        holder[0].wake()

    wakeup = kind(between=app_thread_wakes)
    holder.append(wakeup)
    try:
        wakeup.wake()  # a publish: the I/O thread's poll returns
        assert readable(wakeup.fd)
        wakeup.drain()  # ... and another wake() lands in the middle of the drain
        # the I/O thread looks at its queues (sees both publishes), flushes, polls again
        while readable(wakeup.fd):  # a spurious wake-up is allowed: drain it
            wakeup._between = None
            wakeup.drain()
        wakeup.wake()  # the next publish
        return readable(wakeup.fd)
    finally:
        wakeup.close()


def test_a_wake_up_during_drain_is_not_lost() -> None:
    assert wake_lands_during_drain(Wakeup)


def test_the_old_ordering_loses_it() -> None:
    assert not wake_lands_during_drain(OldOrderWakeup)


@pytest.mark.parametrize("wakes", [1, 2, 10_000])
def test_repeated_wakes_cost_one_byte_until_drained(wakes: int) -> None:
    wakeup = Wakeup()
    try:
        for _ in range(wakes):
            wakeup.wake()
        assert os.read(wakeup.fd, 4096) == b"!"
        wakeup.drain()
        assert not readable(wakeup.fd)
        wakeup.wake()
        assert readable(wakeup.fd)
    finally:
        wakeup.close()


def test_wake_after_close_is_harmless() -> None:
    wakeup = Wakeup()
    wakeup.close()
    wakeup.wake()
