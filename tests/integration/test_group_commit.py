"""Confirms at disk speed: a lone confirmed publish costs one commit, not a batch window.

A real broker and a real persistence service (LMDB, synced). The broker's event batch
window is configured far longer than a commit (50 ms), so a confirm that waited for any
fixed window, the broker's or the store's, would make 200 sequential confirmed publishes
take at least 200 windows (10 s); confirmed at once, they take a small fraction of that.
The bound is a quarter of the windows, not a wall-clock figure: generous for a loaded
2-core machine, and still four times below what waiting would cost.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import BrokerHandle

WINDOW_MS = 50.0
PUBLISHES = 200


def test_sequential_confirms_do_not_wait_for_a_batch_window(short_tmp: Path) -> None:
    handle = BrokerHandle.prepared(short_tmp, {"pub": '[permissions]\npublish = ["gc.>"]\n'})
    try:
        handle.start(persistence=True, event_batch_ms=WINDOW_MS)
        handle.start_persistence(event_batch_ms=WINDOW_MS)
        bus = handle.connect("pub")
        bus.publish("gc.warm", {"n": -1}, confirm=True, timeout=30)  # recovery is over
        started = time.monotonic()
        for n in range(PUBLISHES):
            bus.publish("gc.one", {"n": n}, confirm=True, timeout=30)
        elapsed = time.monotonic() - started
        stats = handle.connect("$cli", session="check").broker_stats()
    finally:
        handle.close()
    windows = PUBLISHES * WINDOW_MS / 1000
    assert elapsed < windows / 4, (
        f"{PUBLISHES} confirms took {elapsed:.2f} s ({windows} s of windows)"
    )
    # and they were stored: a confirm means stored and synced
    assert stats["events"]["stored_watermark"] >= PUBLISHES
