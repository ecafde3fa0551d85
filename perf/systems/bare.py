"""Adapter `bare`: the baseline, a bare pyzmq ROUTER loop (perf/systems/_bare_broker.py).

Clients are DEALERs over ipc:// in the run's temp dir. A publisher sends
[topic, payload]; a subscriber first sends [topic]. The broker cannot confirm a
subscription, so the first phase's warm-up is what makes sure it is in place.
The DEALER's send high-water mark (default 1000) is the publisher's throttle;
the ROUTER silently drops a copy when a subscriber's queue is full (also 1000),
which shows up as delivered < sent.
"""

from __future__ import annotations

import contextlib
import sys
from array import array
from collections.abc import Callable, Sequence

import zmq

from perf import procutil
from perf.model import LatencySummary, Phase, WorkerReport, WorkerSpec, summarize_ns, topic_for
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.workload import publish_schedule, start_timeout_s, subscribe_schedule

NAME = "bare"
SNDMORE, NOBLOCK = 2, 1  # plain ints, see PERF-NOTES
READY_TIMEOUT_S = 15.0


def unavailable_reason() -> str | None:
    """Always available: pyzmq is a dependency of the harness itself."""
    return None


class BareBroker(BrokerHandle):
    """The loop process plus a DEALER of the harness for commands."""

    def __init__(self, config: BrokerConfig) -> None:
        self.endpoint = f"ipc://{config.workdir / 'bare.sock'}"
        self._proc = procutil.spawn_bounded(
            [
                sys.executable,
                "-m",
                "perf.systems._bare_broker",
                self.endpoint,
                f"{config.max_seconds}",
            ],
            config.max_seconds,
            config.workdir / "bare-broker.log",
        )
        self._ctx = zmq.Context()
        self._cmd = self._ctx.socket(zmq.DEALER)
        self._cmd.setsockopt(zmq.LINGER, 0)
        self._cmd.connect(self.endpoint)
        try:
            self._request(b"$ping", READY_TIMEOUT_S)
        except Exception:
            self.stop()
            raise

    def _request(self, command: bytes, timeout_s: float) -> list[bytes]:
        self._cmd.send(command)
        if not self._cmd.poll(int(timeout_s * 1000)):
            raise RuntimeError(f"bare broker did not answer {command!r} in {timeout_s} s")
        return self._cmd.recv_multipart()

    def pids(self) -> list[int]:
        return procutil.child_pids(self._proc.pid)

    def routing_latency(self, phases: Sequence[Phase]) -> dict[str, LatencySummary]:
        at_b, dur_b = self._request(b"$dump", 10.0)
        received_at, durations = array("q"), array("q")
        received_at.frombytes(at_b)
        durations.frombytes(dur_b)
        out: dict[str, LatencySummary] = {}
        for p in phases:
            inside = [
                d
                for t, d in zip(received_at, durations, strict=True)
                if p.window_start_ns <= t < p.window_end_ns
            ]
            summary = summarize_ns(inside)
            if summary is not None:
                out[p.name] = summary
        return out

    def stop(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(Exception):  # escalated by stop_process below
                self._request(b"$stop", 2.0)
                self._proc.wait(3.0)
        procutil.stop_process(self._proc)
        self._cmd.close(0)
        self._ctx.term()


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """Start the loop process and wait until it answers a ping."""
    return BareBroker(config)


class _Dealers:
    """One DEALER per pair, usable as SyncPublisher and SyncSubscriber."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.ctx = zmq.Context()
        self.topics = [topic_for(p).encode() for p in spec.pairs]
        self.socks: list[zmq.Socket[bytes]] = []
        self.poller = zmq.Poller()
        for _ in spec.pairs:
            s: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(spec.endpoint)
            self.socks.append(s)
        self.out_poller = zmq.Poller()
        for s in self.socks:
            self.out_poller.register(s, zmq.POLLOUT)
            self.poller.register(s, zmq.POLLIN)

    def try_send(self, slot: int, payload: bytes) -> bool:
        sock = self.socks[slot]
        try:
            sock.send(self.topics[slot], SNDMORE | NOBLOCK)
        except zmq.Again:
            return False
        sock.send(payload)  # a started multipart message is never refused
        return True

    def wait_writable(self, timeout_s: float) -> None:
        self.out_poller.poll(int(timeout_s * 1000))

    def poll(self, timeout_s: float, sink: Callable[[bytes], None]) -> None:
        for sock, _ in self.poller.poll(int(timeout_s * 1000)):
            recv = sock.recv
            for _ in range(256):  # bounded drain, then let the other sockets in
                try:
                    recv(NOBLOCK)  # topic
                except zmq.Again:
                    break
                sink(recv())

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect one DEALER per pair, then follow the schedule."""
    dealers = _Dealers(spec)
    try:
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        tallies = publish_schedule(schedule, spec.pairs, spec.n_pairs, spec.payload_size, dealers)
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies))
    finally:
        dealers.close()


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect and subscribe one DEALER per pair, then count until the end."""
    dealers = _Dealers(spec)
    try:
        for sock, topic in zip(dealers.socks, dealers.topics, strict=True):
            sock.send(topic)
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        rec = subscribe_schedule(schedule, dealers)
        errors = [f"{rec.foreign} messages without a phase tag"] if rec.foreign else []
        ctl.report(WorkerReport(spec.worker_id, spec.role, rec.tallies, errors))
    finally:
        dealers.close()
