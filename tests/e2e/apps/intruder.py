"""Tries what its manifest forbids and writes each outcome as a JSON line to INTRUDER_OUT."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable

from clients.bus import Bus, BusError


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    outcomes = []
    with Bus.connect() as bus:
        attempts: list[tuple[str, Callable[[], object]]] = [
            ("publish", lambda: bus.publish("orders.secret", 1, confirm=True)),
            ("subscribe", lambda: bus.subscribe("orders.>")),
            ("sys", lambda: bus.publish("$sys.apps.launched", {"app": "x"}, confirm=True)),
            ("allowed", lambda: bus.publish("chatter.hello", "hi", confirm=True)),
        ]
        for name, attempt in attempts:
            try:
                attempt()
                outcomes.append({"try": name, "ok": True})
            except BusError as exc:
                outcomes.append(
                    {
                        "try": name,
                        "ok": False,
                        "code": exc.code,
                        "kind": type(exc).__name__,
                        "message": str(exc),
                    }
                )
    with open(os.environ["INTRUDER_OUT"], "w", encoding="utf-8") as sink:
        json.dump(outcomes, sink)
    stop.wait()


if __name__ == "__main__":
    main()
