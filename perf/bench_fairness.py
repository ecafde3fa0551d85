"""Fairness benchmark: a well-behaved app's latency while a neighbour floods the broker.

    python -m perf.bench_fairness [--repeat 5] [--calls 500] [--json F]

A real broker process (bench_client.platform: persistence off) and three apps, each its
own process: "calm" (this process) sends sequential requests to "echo" (a child that
answers them) and times each round trip, request → broker → responder → broker → reply;
"flood" (a child) floods the broker meanwhile with PUBs of 64 small messages on a topic
nobody subscribes to (so the broker reads and routes them but never queues them). Three
phases per repetition, interleaved, each with a fresh flooder:

- **alone**: no flooder, the baseline;
- **bus flood**: the flooder publishes with the Python client as fast as it lets it
  (publish credit, coalesced batches: what a busy but well-written app does);
- **raw flood**: the flooder writes PUBs on a bare DEALER as fast as libzmq takes them,
  ignoring credit (what a hostile app does; the broker's receive HWM bounds its queue).

Figures: calm's request p50 and p99 (µs) in each phase, and the flooder's accepted rate
(messages the broker counted as published per second, from STATS). Each figure is the
median over the repetitions; the JSON keeps every value. Everything shares the box's
cores, so the p99 under flood includes the scheduler: compare phases of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import zmq

from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from clients.bus import Bus
from perf import bench_client
from perf.bench_client import _child_env, _percentile, platform
from perf.credentials import app_token
from security.credentials import Credential

MANIFESTS = {
    "calm": '[permissions]\nrequest = ["fair.rpc"]\n',
    "echo": '[permissions]\nsubscribe = ["fair.rpc"]\n',
    "flood": '[permissions]\npublish = ["fair.flood.>"]\n',
}
BATCH = 64
PAYLOAD = b"f" * 64
PHASES = ("alone", "bus_flood", "raw_flood")


def stop_on_stdin(stop: threading.Event) -> None:
    """Set `stop` once the parent writes a line (or closes stdin)."""
    sys.stdin.readline()
    stop.set()


def echo(endpoint: str) -> None:
    """Child: answer requests on fair.rpc until stdin closes."""
    bus = Bus.connect(endpoint, "echo", session="echo")
    bus.serve("fair.rpc", lambda m: m.payload)
    print("ready", flush=True)
    sys.stdin.readline()
    bus.close()


def flood_bus(endpoint: str) -> None:
    """Child: publish as fast as the Python client allows until stdin closes."""
    bus = Bus.connect(endpoint, "flood", session="flood")
    stop = threading.Event()
    threading.Thread(target=stop_on_stdin, args=(stop,), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        for _ in range(1000):
            bus.publish("fair.flood.x", PAYLOAD)
    bus.close(timeout=1.0)


def flood_raw(endpoint: str, token: str) -> None:
    """Child: PUBs of BATCH messages on a bare DEALER, credit ignored, until stdin closes."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 1000
    Credential.parse(token).connect_to_broker(sock)
    sock.connect(endpoint)
    sock.send_multipart([P.HELLO, pack({"v": [1], "session": "flood"})])
    assert sock.poll(10_000) and sock.recv_multipart()[0] == P.WELCOME
    stop = threading.Event()
    threading.Thread(target=stop_on_stdin, args=(stop,), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        frames = [P.PUB]
        for _ in range(BATCH):
            frames += [encode_pub_header(new_message_id(), "fair.flood.x"), PAYLOAD]
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.0005)
        while sock.poll(0):
            sock.recv_multipart()  # CREDITs: read and ignored
    sock.close(0)


def child(endpoint: str, role: str, token: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "perf.bench_fairness", "--role", role, endpoint],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env(token),
    )  # fmt: skip
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError(f"{role} did not start")
    return process


def stop(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    try:
        process.stdin.write("\n")
        process.stdin.flush()
        process.wait(10)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait(5)


def timed_requests(bus: Bus, calls: int) -> list[float]:
    out: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        bus.request("fair.rpc", b"ping", timeout=30)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def one_run(calls: int) -> dict[str, float]:
    """One repetition: the three phases on one broker, each flooder fresh."""
    saved = bench_client.MANIFESTS
    bench_client.MANIFESTS = MANIFESTS
    try:
        with platform() as (endpoint, creds):
            responder = child(endpoint, "echo", app_token(creds, "echo"))
            calm = Bus.connect(endpoint, "calm", app_token(creds, "calm"), session="calm")
            operator = Bus.connect(endpoint, P.CLI_ID, app_token(creds, P.CLI_ID), session="op")
            result: dict[str, float] = {}
            try:
                timed_requests(calm, 50)  # warm-up
                for phase in PHASES:
                    flooder = None
                    if phase != "alone":
                        role = "flood-bus" if phase == "bus_flood" else "flood-raw"
                        flooder = child(endpoint, role, app_token(creds, "flood"))
                        time.sleep(0.5)  # the flood is under way
                    before = operator.broker_stats()["published"]
                    started = time.monotonic()
                    latencies = timed_requests(calm, calls)
                    elapsed = time.monotonic() - started
                    published = operator.broker_stats()["published"] - before
                    if flooder is not None:
                        stop(flooder)
                    result[f"{phase}_p50_us"] = _percentile(latencies, 0.50)
                    result[f"{phase}_p99_us"] = _percentile(latencies, 0.99)
                    result[f"{phase}_flood_per_s"] = published / elapsed
            finally:
                calm.close()
                operator.close()
                stop(responder)
    finally:
        bench_client.MANIFESTS = saved
    return result


def table(medians: dict[str, float]) -> str:
    rows = ["| phase | calm request p50 | calm request p99 | flood accepted msg/s |"]
    rows.append("| --- | --- | --- | --- |")
    for phase in PHASES:
        rows.append(
            f"| {phase.replace('_', ' ')} | {medians[f'{phase}_p50_us'] / 1000:.2f} ms "
            f"| {medians[f'{phase}_p99_us'] / 1000:.2f} ms "
            f"| {medians[f'{phase}_flood_per_s']:,.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("endpoint", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        token = os.environ["PLEXUS_TOKEN"]
        roles: dict[str, Any] = {
            "echo": lambda: echo(args.endpoint),
            "flood-bus": lambda: flood_bus(args.endpoint),
            "flood-raw": lambda: flood_raw(args.endpoint, token),
        }
        roles[args.role]()
        return 0
    runs = [one_run(args.calls) for _ in range(args.repeat)]
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    document = {"calls": args.calls, "batch": BATCH, "median": medians, "runs": runs}
    text = json.dumps(document, indent=2)
    print(text)
    print(table(medians))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
