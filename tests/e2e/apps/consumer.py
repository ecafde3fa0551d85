"""Subscribes CONSUMER_PATTERN and appends each message as a JSON line to CONSUMER_OUT."""

from __future__ import annotations

import json
import os
import signal
import threading

from clients.bus import Bus


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = os.environ["CONSUMER_OUT"]
    with Bus.connect() as bus, open(out, "a", encoding="utf-8") as sink:
        sub = bus.subscribe(os.environ["CONSUMER_PATTERN"])
        with open(out + ".ready", "w", encoding="utf-8"):
            pass
        while not stop.is_set():
            message = sub.get(timeout=0.2)
            if message is not None:
                record = {"topic": message.topic, "sender": message.sender, "data": message.data}
                sink.write(json.dumps(record) + "\n")
                sink.flush()


if __name__ == "__main__":
    main()
