"""Demo app: subscribes to `market.*.prices` and prints each price it receives."""

from __future__ import annotations

import time

from clients.bus import Bus
from examples.stopping import stop_on_signals


def main() -> None:
    stop = stop_on_signals()
    with Bus.connect() as bus:
        sub = bus.subscribe("market.*.prices")
        print(f"connected as {bus.app_id}; watching {sub.pattern}", flush=True)
        while not stop.is_set():
            message = sub.get(timeout=0.5)
            if message is None:
                continue
            data = message.data
            stamp = time.strftime("%H:%M:%S", time.localtime(message.timestamp))
            print(
                f"{stamp} {data.get('symbol', '?'):<5} {data.get('px')!s:>9}"
                f"  (from {message.sender}, topic {message.topic})",
                flush=True,
            )
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
