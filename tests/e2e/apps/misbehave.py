"""An app that misbehaves on purpose, as MODE says: crash, hog (memory), fork, count, idle."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from clients.bus import Bus


def main() -> None:
    mode = os.environ["MODE"]
    with Bus.connect() as bus:
        if mode == "crash":
            time.sleep(0.2)
            sys.exit(3)
        if mode == "hog":
            hoard = []
            while True:  # 10 MiB more every 50 ms, touched so it is resident
                hoard.append(bytearray(10 * 2**20))
                time.sleep(0.05)
        if mode == "fork":
            sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
            child = subprocess.Popen(sleeper)
            detached = subprocess.Popen(sleeper, start_new_session=True)
            bus.publish("count.fork", {"children": [child.pid, detached.pid]}, confirm=True)
        if mode == "count":
            seq = 0
            while True:
                bus.publish("count.tick", seq)
                seq += 1
                time.sleep(0.01)
        threading.Event().wait()


if __name__ == "__main__":
    main()
