"""An app that talks, waits for a file to appear (`TRIGGER`), says one line more and
crashes with a traceback: what `plexus logs` and the supervisor's terminal must show."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main() -> None:
    trigger = Path(os.environ["TRIGGER"])
    print("hello from talker", flush=True)
    print("an error line, on stderr", file=sys.stderr, flush=True)
    print("waiting for the trigger", flush=True)
    deadline = time.monotonic() + 60.0
    while not trigger.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("the trigger came", flush=True)
    raise ValueError("boom on purpose")


if __name__ == "__main__":
    main()
