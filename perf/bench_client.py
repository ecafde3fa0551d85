"""Client benchmark: what the Python client itself costs on its hot paths.

    python -m perf.bench_client [--messages 50000] [--calls 2000] [--repeat 5] [--json F]
                                [--phases flood,drain]

The routing benchmark's plexus workers speak the protocol on raw sockets, so it never
runs `clients/`. This one does: a real broker process, a publisher `Bus` in this process
and a subscriber `Bus` in a child process, and three phases per repetition:

- **flood**: `publish()` of N 256-byte messages as fast as the client allows, then
  `flush()`; the subscriber's handler counts them (each acked by the client). Figures:
  publish calls/s (until the last `publish` returned), delivered msg/s (first publish to
  last handler call, CLOCK_MONOTONIC is shared by both processes), confirmed msg/s (until
  `flush` returned).
- **confirm**: sequential `publish(confirm=True)`: round-trip latency p50/p99.
- **request**: sequential `request()` to an echo responder in the child: p50/p99.
- **drain** (the subscriber alone): a second child subscribes, with a handler
  (`drain_handler`) or reading `sub.get()` in its main thread (`drain_get`), and holds
  its first delivery while this process publishes N messages and `flush()`es them (a
  broker of its own with flow control off, so nothing holds the publisher); then it
  consumes them all, each acked by the Bus (auto-ack). Figures: delivered msg/s (from
  "go" to the Nth message) and the subscriber process's CPU µs per message over the same
  span (`time.process_time()`, every thread: I/O, dispatcher, reader). Only the broker
  and that subscriber run meanwhile, so this is the subscriber side's cost and ceiling.
  (The Bus always runs an at-least-once session: every delivery is acked, so the ACK
  traffic and the broker's window of 256 in flight are part of the figure.)

Each figure is the median of the repetitions (a fresh broker each time); the JSON keeps
every value.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.paths import PlatformPaths
from clients.bus import Bus, Message
from perf import procutil
from perf.credentials import app_token
from security.handoff import TOKEN_VARIABLE
from supervisor.identity import Identities

MANIFESTS = {
    "bench-pub": '[permissions]\npublish = ["bench.>"]\nrequest = ["bench.>"]\n',
    "bench-sub": '[permissions]\nsubscribe = ["bench.>"]\n',
}
PAYLOAD = b"x" * 256


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _reads_config_document() -> bool:
    """Whether this tree's broker takes its settings on PLEXUS_CONFIG_FD (newer trees) or
    as flags (the tree of 6c93e1d, which the benchmark also runs for comparison)."""
    main = Path(__file__).resolve().parent.parent / "broker" / "__main__.py"
    return "config_from_environment" in main.read_text()


def _broker_flags() -> list[str]:
    if _reads_config_document():
        return []
    # the flood outruns the subscriber for a while: no queue-full dead letters
    return ["--queue-max", "1000000", "--queue-max-bytes", str(2**30)]


def _broker_document(credit: int | None = None) -> bytes | None:
    """Persistence off (the older broker's default), queues above the flood; `credit` 0
    turns flow control off (the drain phase queues everything before it reads)."""
    if not _reads_config_document():
        return None
    from broker.config import PlatformConfig  # absent in older trees
    from broker.delivery import DeliveryConfig

    flow = {} if credit is None else {"credit": credit}
    delivery = DeliveryConfig(queue_max=1_000_000, queue_max_bytes=2**30, **flow)
    return PlatformConfig(persistence=False, delivery=delivery).to_document()


def _child_env(token: str) -> dict[str, str]:
    """A child's environment with its credential (granted to this process, so good in its
    children; never on the command line)."""
    return {**os.environ, TOKEN_VARIABLE: token}


def subscriber(endpoint: str, count: int) -> None:
    """Child process: count flood messages, serve echo requests, print one JSON line."""
    bus = Bus.connect(endpoint, "bench-sub", session="bench-sub")
    seen = 0
    first = last = 0.0
    done = threading.Event()

    def on_flood(message: Message) -> None:
        nonlocal seen, first, last
        now = time.monotonic()
        if seen == 0:
            first = now
        seen += 1
        last = now
        if seen >= count:
            done.set()

    bus.subscribe("bench.flood", on_flood)
    bus.serve("bench.rpc", lambda m: m.payload)
    print("ready", flush=True)
    done.wait(300)
    print(json.dumps({"seen": seen, "first": first, "last": last}), flush=True)
    sys.stdin.readline()  # the parent says when the request phase is over
    bus.close()


@dataclass(frozen=True, slots=True)
class PublishTimes:
    """CLOCK_MONOTONIC seconds of one burst of `publish()` calls and its `flush()`."""

    started: float  # before the first publish
    published: float  # the last publish returned
    confirmed: float  # flush returned: every publish confirmed by the broker

    def calls_per_s(self, messages: int) -> float:
        """Publish calls/s: what the app's thread can hand to the client."""
        return messages / (self.published - self.started)

    def confirmed_per_s(self, messages: int) -> float:
        """Msg/s until the last confirm: what the client and the broker got through."""
        return messages / (self.confirmed - self.started)


def time_publishes(bus: Bus, topic: str, messages: int, payload: bytes = PAYLOAD) -> PublishTimes:
    """`bus.publish(topic, payload)` `messages` times as fast as the client takes them
    (it waits when its window of unconfirmed publishes is full), then `flush()`. Shared
    with the user benchmark's publish section (perf/user/publish.py)."""
    publish = bus.publish
    started = time.monotonic()
    for _ in range(messages):
        publish(topic, payload)
    published = time.monotonic()
    bus.flush(120)
    return PublishTimes(started, published, time.monotonic())


def drain_subscriber(endpoint: str, count: int, mode: str) -> None:
    """Child process of the drain phase: hold the first delivery until the parent says
    "go", then consume `count` messages; print one JSON line (wall and CPU seconds)."""
    bus = Bus.connect(endpoint, "bench-sub", session=f"bench-drain-{mode}")
    go = threading.Event()
    done = threading.Event()
    seen = 0

    def on_message(message: Message) -> None:
        nonlocal seen
        if seen == 0:
            go.wait()
        seen += 1
        if seen >= count:
            done.set()

    sub = bus.subscribe("bench.drain", on_message if mode == "handler" else None)
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu_started = time.monotonic(), time.process_time()
    if mode == "handler":
        go.set()
        done.wait(300)
    else:
        while seen < count and sub.get(timeout=300) is not None:
            seen += 1
    ended, cpu_ended = time.monotonic(), time.process_time()
    result = {"seen": seen, "wall_s": ended - started, "cpu_s": cpu_ended - cpu_started}
    print(json.dumps(result), flush=True)
    bus.close()


@contextlib.contextmanager
def platform(credit: int | None = None) -> Iterator[tuple[str, Identities]]:
    """A broker of its own in a temporary home: (endpoint, the platform's identities).

    This process is the broker's supervisor (perf.credentials): `app_token(identities,
    APP)` is a credential for APP, good here and in the children it starts."""
    with tempfile.TemporaryDirectory(prefix="px-bc-", dir="/tmp") as name:
        root = Path(name)
        (root / "apps").mkdir()
        for app_id, body in MANIFESTS.items():
            (root / "apps" / f"{app_id}.toml").write_text(f'id = "{app_id}"\n{body}')
        paths = PlatformPaths.resolve(root / "home")
        paths.prepare()
        identities = Identities()
        argv = [sys.executable, "-m", "broker", "--home", str(root / "home")]
        argv += ["--apps", str(root / "apps"), *_broker_flags()]
        document = _broker_document(credit)
        broker = procutil.spawn_bounded(
            argv, 600, root / "broker.log", document, identities=identities
        )
        try:
            sock = Path(paths.bus_endpoint().removeprefix("ipc://"))
            deadline = time.monotonic() + 15
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("broker did not start")
                time.sleep(0.02)
            yield paths.bus_endpoint(), identities
        finally:
            procutil.stop_process(broker)
            identities.close()


def drain_run(messages: int, mode: str, child_argv: list[str] | None = None) -> dict[str, float]:
    """One drain phase (`mode` "handler" or "get"): {delivered msg/s, CPU µs per message}.

    `child_argv` replaces `python -m perf.bench_client` for the child (a profiler)."""
    if _broker_document(0) is None:
        raise RuntimeError("the drain phase needs a broker that reads a config document")
    with platform(credit=0) as (endpoint, identities):
        argv = child_argv or [sys.executable, "-m", "perf.bench_client"]
        child = subprocess.Popen(
            [*argv, "--role-drain", endpoint, str(messages), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=_child_env(app_token(identities, "bench-sub")),
        )  # fmt: skip
        try:
            assert child.stdout is not None and child.stdin is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("drain subscriber did not start")
            with Bus.connect(endpoint, "bench-pub", app_token(identities, "bench-pub")) as pub:
                for _ in range(messages):
                    pub.publish("bench.drain", PAYLOAD)
                pub.flush(120)
            child.stdin.write("go\n")
            child.stdin.flush()
            result = json.loads(child.stdout.readline())
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
    if result["seen"] < messages:
        raise RuntimeError(f"drain subscriber saw {result['seen']} of {messages}")
    return {
        f"drain_{mode}_delivered_per_s": messages / result["wall_s"],
        f"drain_{mode}_cpu_us_per_msg": result["cpu_s"] * 1e6 / messages,
    }


def one_run(messages: int, calls: int) -> dict[str, float]:
    with platform() as (endpoint, identities):
        child = subprocess.Popen(
            [sys.executable, "-m", "perf.bench_client", "--role-sub", endpoint, str(messages)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=_child_env(app_token(identities, "bench-sub")),
        )  # fmt: skip
        try:
            assert child.stdout is not None and child.stdin is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("subscriber did not start")
            token = app_token(identities, "bench-pub")
            pub = Bus.connect(endpoint, "bench-pub", token, session="bench-pub")
            times = time_publishes(pub, "bench.flood", messages)
            result = json.loads(child.stdout.readline())
            if result["seen"] < messages:
                raise RuntimeError(f"subscriber saw {result['seen']} of {messages}")
            confirm_us: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                pub.publish("bench.confirm", PAYLOAD, confirm=True)
                confirm_us.append((time.perf_counter() - t0) * 1e6)
            request_us: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                pub.request("bench.rpc", PAYLOAD, timeout=10)
                request_us.append((time.perf_counter() - t0) * 1e6)
            pub.close()
            child.stdin.write("\n")
            child.stdin.flush()
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
    return {
        "publish_calls_per_s": times.calls_per_s(messages),
        "delivered_per_s": messages / (result["last"] - times.started),
        "confirmed_per_s": times.confirmed_per_s(messages),
        "confirm_p50_us": _percentile(confirm_us, 0.50),
        "confirm_p99_us": _percentile(confirm_us, 0.99),
        "request_p50_us": _percentile(request_us, 0.50),
        "request_p99_us": _percentile(request_us, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--phases", default="flood,drain", help="flood (also confirm, request), drain, or both"
    )
    parser.add_argument("--role-sub", nargs=2, metavar=("ENDPOINT", "COUNT"))
    parser.add_argument("--role-drain", nargs=3, metavar=("ENDPOINT", "COUNT", "MODE"))
    args = parser.parse_args(argv)
    if args.role_sub:
        endpoint, count = args.role_sub
        subscriber(endpoint, int(count))
        return 0
    if args.role_drain:
        endpoint, count, mode = args.role_drain
        drain_subscriber(endpoint, int(count), mode)
        return 0
    phases = set(args.phases.split(","))
    runs: list[dict[str, float]] = []
    for rep in range(args.repeat):
        run = one_run(args.messages, args.calls) if "flood" in phases else {}
        if "drain" in phases:
            for mode in ("handler", "get"):
                run.update(drain_run(args.messages, mode))
        runs.append(run)
        print(
            f"rep {rep + 1}: " + ", ".join(f"{k} {v:,.0f}" for k, v in run.items()), file=sys.stderr
        )
    medians: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    document = {"schema": "plexus-perf/client/1", "medians": medians, "runs": runs}
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2))
    for key, value in medians.items():
        print(f"{key:30} {value:>12,.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
