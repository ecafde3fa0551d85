"""Demo app: publishes a random-walk price for a few symbols on `market.<SYMBOL>.prices`."""

from __future__ import annotations

import os
import random
import time

from clients.bus import Bus
from examples.stopping import stop_on_signals

SYMBOLS = {"AAPL": 187.20, "MSFT": 411.50, "GOOG": 141.80, "AMZN": 178.30}


def main() -> None:
    stop = stop_on_signals()
    interval = float(os.environ.get("TICKER_INTERVAL_S", "0.5"))
    prices = dict(SYMBOLS)
    rng = random.Random()
    with Bus.connect() as bus:
        print(f"connected as {bus.app_id}; publishing {', '.join(prices)}", flush=True)
        while not stop.is_set():
            for symbol, last in prices.items():
                prices[symbol] = round(last * (1 + rng.gauss(0, 0.001)), 2)
                bus.publish(
                    f"market.{symbol}.prices",
                    {"symbol": symbol, "px": prices[symbol], "ts": time.time()},
                )
            stop.wait(interval)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
