"""What ZeroMQ frames cost per delivered message: ``python -m perf.bench_frames``.

Why: a DELIVER carries four frames per message (sids, stamp, header, payload) and a PUB
two; every frame is one pyzmq send or recv call (and a RCVMORE check) on each side. This
measures the CPU of a ROUTER sender and a DEALER receiver (separate processes, ipc) for
the same 64-message batches laid out three ways: four frames per message as today, one
msgpack frame per message, and one msgpack frame for the whole batch. The receiver
decodes what it gets, so the comparison is fair to the packed layouts. Medians of
``--repeat`` runs, interleaved; JSON on stdout after a short table on stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import zmq

BATCH = 64
LAYOUTS = ("4-frames", "1-frame-each", "1-frame-batch")
_PAYLOAD, _HEADER, _STAMP, _SIDS = b"x" * 256, b"h" * 60, b"s" * 20, b"\x91\x01"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _batch(layout: str) -> list[bytes]:
    one = [_SIDS, _STAMP, _HEADER, _PAYLOAD]
    if layout == "4-frames":
        return [b"DELIVER", *(one * BATCH)]
    if layout == "1-frame-each":
        return [b"DELIVER", *(msgpack.packb(one) for _ in range(BATCH))]
    return [b"DELIVER", msgpack.packb([one] * BATCH)]


def _count(layout: str, frames: list[bytes]) -> int:
    if layout == "4-frames":
        return (len(frames) - 1) // 4
    if layout == "1-frame-each":
        return sum(1 for f in frames[1:] if msgpack.unpackb(f))
    return len(msgpack.unpackb(frames[1]))


def _receive(endpoint: str, layout: str, messages: int, out: Any) -> None:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.rcvhwm = 0
    dealer.connect(endpoint)
    dealer.send(b"hello")
    got, started = 0, 0.0
    while got < messages:
        frames = dealer.recv_multipart()
        if not started:
            started = _cpu_s()
        got += _count(layout, frames)
    out.send((_cpu_s() - started) / messages * 1e6)
    dealer.close(linger=0)
    ctx.term()


def run_once(layout: str, messages: int) -> dict[str, float]:
    """Sender and receiver CPU µs per delivered message for one layout."""
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{Path(tmp) / 'frames.sock'}"
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.sndhwm = 0
        router.bind(endpoint)
        mine, theirs = mp.Pipe()
        child = mp.get_context("spawn").Process(
            target=_receive, args=(endpoint, layout, messages, theirs)
        )
        child.start()
        router.recv_multipart()
        started = _cpu_s()
        for _ in range(messages // BATCH):
            frames = _batch(layout)
            router.send(b"peer", zmq.SNDMORE)
            router.send_multipart(frames)
        send_us = (_cpu_s() - started) / messages * 1e6
        recv_us = float(mine.recv())
        child.join(30)
        router.close(linger=0)
        ctx.term()
    return {"send_us": send_us, "recv_us": recv_us}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_frames", description=__doc__)
    ap.add_argument("--messages", type=int, default=BATCH * 500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {layout: [] for layout in LAYOUTS}
    for _ in range(args.repeat):  # interleaved: a busy moment hits every layout alike
        for layout in LAYOUTS:
            runs[layout].append(run_once(layout, args.messages))
    result = {
        layout: {k: statistics.median(r[k] for r in rs) for k in ("send_us", "recv_us")}
        for layout, rs in runs.items()
    }
    print(f"{'layout':<15} {'send µs/msg':>12} {'recv µs/msg':>12}", file=sys.stderr)
    for layout, figures in result.items():
        print(
            f"{layout:<15} {figures['send_us']:>12.2f} {figures['recv_us']:>12.2f}",
            file=sys.stderr,
        )
    print(json.dumps({"schema": "plexus-perf/frames/1", "batch": BATCH, "layouts": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
