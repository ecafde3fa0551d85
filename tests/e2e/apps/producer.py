"""Publishes PRODUCER_COUNT numbered messages on PRODUCER_TOPIC (confirmed), then idles."""

from __future__ import annotations

import os
import signal
import threading

from clients.bus import Bus


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    count = int(os.environ["PRODUCER_COUNT"])
    topic = os.environ["PRODUCER_TOPIC"]
    wait_for = os.environ.get("PRODUCER_WAIT_FILE")
    with Bus.connect() as bus:
        if wait_for:  # start once every consumer said it is subscribed
            paths = wait_for.split(":")
            while not stop.is_set() and not all(os.path.exists(p) for p in paths):
                stop.wait(0.05)
        for i in range(count):
            bus.publish(topic, {"seq": i}, confirm=(i == count - 1))
        print(f"[producer] published {count} on {topic}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
