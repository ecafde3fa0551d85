"""The baseline broker: the "hand-rolled robust loop" of PERF-NOTES, nothing more.

One ROUTER, exact-topic routing, no auth, no validation beyond frame counting.
Each frame is read with a plain recv() and followed by getsockopt(RCVMORE); each
copy goes out with three send() calls using the plain int SNDMORE (2), which
PERF-NOTES measured as the cheapest robust pyzmq idiom.

Wire format (DEALER side): [topic, payload] publishes; a single frame [topic]
subscribes; a single frame starting with "$" is a harness command: "$ping",
"$dump" (reply: receive times and routing durations as two int64 arrays) and
"$stop". The instrumentation is two perf_counter_ns() calls and two array
appends per message (~0.2 us against ~17 us of loop time); the samples go to the
harness only on "$dump", outside the measured windows.

Run as: python -m perf.systems._bare_broker ENDPOINT MAX_SECONDS
"""

from __future__ import annotations

import sys
import time
from array import array

import zmq

from perf.control import die_with_parent

SNDMORE = 2  # zmq.SNDMORE as a plain int: IntFlag arithmetic costs ~1 us per call
POLL_MS = 200  # idle wake-up to check the deadline


def serve(endpoint: str, max_seconds: float) -> None:
    """Route until "$stop" or until max_seconds have passed."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, POLL_MS)
    router.bind(endpoint)
    subscribers: dict[bytes, list[bytes]] = {}
    received_at = array("q")
    durations = array("q")
    recv, send, getsockopt = router.recv, router.send, router.getsockopt
    rcvmore = int(zmq.RCVMORE)
    clock = time.perf_counter_ns
    deadline = clock() + int(max_seconds * 1e9)
    while True:
        try:
            peer = recv()
        except zmq.Again:
            if clock() > deadline:
                break
            continue
        t0 = clock()
        if not getsockopt(rcvmore):
            continue  # an empty message: nothing to route
        topic = recv()
        if getsockopt(rcvmore):
            payload = recv()
            while getsockopt(rcvmore):  # tolerate extra frames: drop them
                recv()
            for sub in subscribers.get(topic, ()):
                send(sub, SNDMORE)
                send(topic, SNDMORE)
                send(payload)
            t1 = clock()
            received_at.append(t0)
            durations.append(t1 - t0)
            if t1 > deadline:
                break
        elif topic[:1] != b"$":
            subscribers.setdefault(topic, []).append(peer)
        elif topic == b"$ping":
            router.send_multipart([peer, b"pong"])
        elif topic == b"$dump":
            router.send_multipart([peer, received_at.tobytes(), durations.tobytes()])
        elif topic == b"$stop":
            router.send_multipart([peer, b"bye"])
            break
    router.close(0)
    ctx.term()


def main(argv: list[str]) -> int:
    """Command-line entry: ENDPOINT MAX_SECONDS."""
    die_with_parent()
    serve(argv[0], float(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
