"""Consumes `jobs.>` in session CONSUMER_SESSION and appends each message's number to
CONSUMER_OUT before its handler returns (and so before the ack)."""

from __future__ import annotations

import os
import threading

from clients.bus import Bus, Message


def main() -> None:
    out = open(os.environ["CONSUMER_OUT"], "a", encoding="utf-8")  # noqa: SIM115 - for life

    def record(message: Message) -> None:
        out.write(f"{message.data}\n")
        out.flush()

    with Bus.connect(session=os.environ["CONSUMER_SESSION"]) as bus:
        bus.subscribe("jobs.>", record)
        print("ready", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
