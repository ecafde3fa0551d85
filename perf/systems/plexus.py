"""Adapter `plexus`: the Plexus broker (`python -m broker`) with authenticated apps.

The workers speak the wire protocol on raw DEALER sockets, as cheaply as the `bare`
workers do (one unpacked PUB per message, no client-side batching; subscribers offer
version 2 and so get packed DELIVERs; a publisher counts its publish
credit and reads the broker's CREDITs only when it has run out, docs/protocol.md §3.17,
so the broker's flow control throttles it as it does the Python client), so the comparison with
the baseline is broker against broker: ZAP authentication, the User-Id check, header
decoding, topic and permission checks, stamping and the DELIVER framing are what Plexus
pays on top. Publishers connect as app `bench-pub`, subscribers as `bench-sub`, each
socket a CurveZMQ client with a credential of its own, each SUB confirmed by SUBOK. The
harness plays the supervisor (perf.credentials): it hands the broker its server key and
grant channel and grants every credential to its own pid, so the workers (its children)
pass the broker's process check; each worker gets its credentials in its WorkerSpec.
The workers send no heartbeats (the shared schedule loop has no idle hook), so the broker
runs with a peer timeout longer than the run instead of the 10 s default.

In-broker routing latency (frame received -> handed to the subscriber's socket) comes
from the broker's own histogram: reset at each window start, read at its end (STATS).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgpack
import zmq
from msgpack import unpackb

from broker import protocol as P
from broker.codec import encode_pub_header, new_message_id, pack
from broker.config import PlatformConfig
from broker.paths import PlatformPaths
from broker.wire import unpack_batch
from perf import procutil
from perf.credentials import app_token
from perf.model import LatencySummary, Phase, Role, WorkerReport, WorkerSpec, topic_for
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.workload import publish_schedule, start_timeout_s, subscribe_schedule
from security.credentials import Credential
from supervisor.identity import Identities

NAME = "plexus"
SNDMORE, NOBLOCK = 2, 1
READY_TIMEOUT_S = 15.0
MAX_PEER_TIMEOUT_MS = 3_600_000  # the largest broker.peer_timeout_ms the config accepts
PUB_APP, SUB_APP = "bench-pub", "bench-sub"
_MANIFESTS = {
    PUB_APP: '[permissions]\npublish = ["bench.>"]\n',
    SUB_APP: '[permissions]\nsubscribe = ["bench.>"]\n',
}


def unavailable_reason() -> str | None:
    """Always available: the broker is this repository."""
    return None


def _hello(
    sock: zmq.Socket[bytes],
    app_id: str,
    token: str,
    endpoint: str,
    timeout_s: float,
    acked: bool = False,
) -> int:
    """Connect with credential `token` and HELLO as `app_id`; returns the WELCOME's
    publish credit (0: no flow control)."""
    sock.setsockopt(zmq.LINGER, 0)
    Credential.parse(token).connect_to_broker(sock)
    sock.connect(endpoint)
    session = f"perf-{os.getpid()}-{id(sock)}"
    sock.send_multipart(
        [P.HELLO, pack({"v": [1, 2], "client": "perf", "session": session, "ack": acked})]
    )
    if not sock.poll(int(timeout_s * 1000)):
        raise RuntimeError(f"no WELCOME from {endpoint} for {app_id}")
    reply = sock.recv_multipart()
    if reply[0] != P.WELCOME:
        raise RuntimeError(f"HELLO refused: {reply!r}")
    credit = unpackb(reply[1]).get("credit", 0)
    return credit if isinstance(credit, int) else 0


def peer_timeout_ms(max_seconds: float) -> int:
    """A peer timeout longer than a broker living `max_seconds` (a minute more), within
    the config's bound (an hour: a longer-lived broker may end a silent raw session)."""
    return min(int(max_seconds * 1000) + 60_000, MAX_PEER_TIMEOUT_MS)


class PlexusBroker(BrokerHandle):
    """The broker process plus an operator (`$cli`) DEALER for STATS.

    `identities` holds the platform's keys and grants (a new one unless given: a
    persistence service started first shares it); `persistence` switches the broker's
    persistence on (the service is the caller's, perf/bench_persistence.py)."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        persistence: bool = False,
        identities: Identities | None = None,
    ) -> None:
        self.identities = identities if identities is not None else Identities()
        home, apps = config.workdir / "home", config.workdir / "apps"
        apps.mkdir(exist_ok=True)
        for app_id, body in _MANIFESTS.items():
            (apps / f"{app_id}.toml").write_text(f'id = "{app_id}"\n{body}', encoding="utf-8")
        paths = PlatformPaths.resolve(home)
        paths.prepare()
        self.endpoint = paths.bus_endpoint()
        self._proc = procutil.spawn_bounded(
            [
                sys.executable,
                "-m",
                "broker",
                "--home",
                str(home),
                "--apps",
                str(apps),
            ],
            config.max_seconds,
            config.workdir / "plexus-broker.log",
            config_document=PlatformConfig(
                persistence=persistence,
                # the raw workers send no heartbeats; spawning 500 of them takes ~30 s
                peer_timeout_ms=peer_timeout_ms(config.max_seconds),
            ).to_document(),
            identities=self.identities,
        )
        self._ctx = zmq.Context()
        self._cmd: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._latency: dict[str, LatencySummary] = {}
        try:
            procutil_wait_for_socket(Path(self.endpoint.removeprefix("ipc://")), READY_TIMEOUT_S)
            operator = app_token(self.identities, P.CLI_ID)
            _hello(self._cmd, P.CLI_ID, operator, self.endpoint, READY_TIMEOUT_S)
        except Exception:
            self.stop()
            raise

    def _stats(self, reset: bool) -> dict[str, object]:
        # This raw DEALER sends no heartbeats, so its session may have expired during a
        # long setup (500 processes); a fresh HELLO first makes the STATS always welcome.
        self._cmd.send_multipart([P.HELLO, pack({"v": [1], "client": "perf"})])
        self._cmd.send_multipart([P.STATS, pack({"reset": reset})])
        while self._cmd.poll(10_000):
            reply = self._cmd.recv_multipart()
            if reply[0] == P.STATSOK:
                stats: dict[str, object] = msgpack.unpackb(reply[1], raw=False)
                return stats
        raise RuntimeError("plexus broker did not answer STATS")

    def pids(self) -> list[int]:
        return procutil.child_pids(self._proc.pid)

    def credentials(self, role: Role, pairs: tuple[int, ...]) -> tuple[str, ...]:
        """A credential of its own for each socket of the worker (`bench-pub`/`bench-sub`)."""
        app_id = PUB_APP if role == "pub" else SUB_APP
        return tuple(app_token(self.identities, app_id) for _ in pairs)

    def on_window(self, phase: Phase, edge: Literal["start", "end"]) -> None:
        stats = self._stats(reset=edge == "start")
        summary = LatencySummary.from_stats(stats)
        if edge == "end" and summary is not None:
            self._latency[phase.name] = summary

    def routing_latency(self, phases: Sequence[Phase]) -> dict[str, LatencySummary]:
        return {p.name: self._latency[p.name] for p in phases if p.name in self._latency}

    def stop(self) -> None:
        procutil.stop_process(self._proc)
        self._cmd.close(0)
        self._ctx.term()
        self.identities.close()


def procutil_wait_for_socket(path: Path, timeout_s: float) -> None:
    """Wait until the broker's ipc socket file exists."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"plexus broker did not bind {path} within {timeout_s} s")
        time.sleep(0.02)


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """Start the broker and wait until the operator connection is welcomed."""
    return PlexusBroker(config)


class _Apps:
    """One authenticated DEALER per pair, usable as SyncPublisher and SyncSubscriber."""

    def __init__(self, spec: WorkerSpec, app_id: str, acked: bool = False) -> None:
        if len(spec.credentials) != len(spec.pairs):
            raise RuntimeError(f"{len(spec.credentials)} credentials for {len(spec.pairs)} apps")
        self.acked = acked
        self.ctx = zmq.Context()
        self.topics = [topic_for(p) for p in spec.pairs]
        self.socks: list[zmq.Socket[bytes]] = []
        self.credit: list[int] = []
        """Publish credit left per socket (docs/protocol.md §3.17); -1: unlimited."""
        self.poller = zmq.Poller()
        for token in spec.credentials:
            sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
            credit = _hello(sock, app_id, token, spec.endpoint, READY_TIMEOUT_S, acked)
            self.socks.append(sock)
            self.credit.append(credit or -1)
            self.poller.register(sock, zmq.POLLIN)

    def subscribe_all(self) -> None:
        for sid, (sock, topic) in enumerate(zip(self.socks, self.topics, strict=True), 1):
            sock.send_multipart([P.SUB, pack({"sid": sid, "pattern": topic})])
        for sock in self.socks:
            if not sock.poll(int(READY_TIMEOUT_S * 1000)):
                raise RuntimeError("no SUBOK")
            reply = sock.recv_multipart()
            if reply[0] != P.SUBOK:
                raise RuntimeError(f"SUB refused: {reply!r}")

    def try_send(self, slot: int, payload: bytes) -> bool:
        sock = self.socks[slot]
        if not self.credit[slot]:  # out of credit: take what came, else the broker holds us
            self._take_credit(slot)
            if not self.credit[slot]:
                return False
        try:
            sock.send(P.PUB, SNDMORE | NOBLOCK)
        except zmq.Again:
            return False
        sock.send(encode_pub_header(new_message_id(), self.topics[slot]), SNDMORE)
        sock.send(payload)
        if self.credit[slot] > 0:
            self.credit[slot] -= 1
        return True

    def _take_credit(self, slot: int) -> None:
        """Read the CREDITs waiting on one publisher socket (nothing else comes there)."""
        sock = self.socks[slot]
        while True:
            try:
                frames = sock.recv_multipart(NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == P.CREDIT:
                self.credit[slot] += int(unpackb(frames[1])["n"])

    def wait_writable(self, timeout_s: float) -> None:
        """Until a socket out of credit gets some, or one with credit has room."""
        poller = zmq.Poller()
        for sock, credit in zip(self.socks, self.credit, strict=True):
            poller.register(sock, zmq.POLLOUT if credit else zmq.POLLIN)
        for sock, _ in poller.poll(int(timeout_s * 1000)):
            slot = self.socks.index(sock)
            if not self.credit[slot]:
                self._take_credit(slot)

    def poll(self, timeout_s: float, sink: Callable[[bytes], None]) -> None:
        for sock, _ in self.poller.poll(int(timeout_s * 1000)):
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(NOBLOCK)
                except zmq.Again:
                    break
                if frames[0] != P.DELIVER:
                    continue
                if len(frames) == 2:  # packed (version 2): one frame holds the batch
                    frames = unpack_batch(frames, 4)
                for i in range(4, len(frames), 4):
                    sink(frames[i])
                if self.acked:  # one ACK per DELIVER, as the Python client batches them
                    seqs = [unpackb(frames[i])[0] for i in range(2, len(frames), 4)]
                    sock.send_multipart([P.ACK, pack({"seqs": seqs})])

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.send(P.BYE, NOBLOCK)
            sock.close(0)
        self.ctx.term()


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect and HELLO one DEALER per pair as `bench-pub`, then follow the schedule."""
    run_publisher(spec, ctl)


def run_publisher(spec: WorkerSpec, ctl: WorkerControl) -> None:
    apps = _Apps(spec, PUB_APP)
    try:
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        tallies = publish_schedule(schedule, spec.pairs, spec.n_pairs, spec.payload_size, apps)
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies))
    finally:
        apps.close()


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect, HELLO and SUB (confirmed) one DEALER per pair as `bench-sub`, then count.

    Sessions say `ack: false` (at-most-once, the bus issue's semantics); the adapter
    `plexus_acked` runs the same workload with every delivery acknowledged.
    """
    run_subscriber(spec, ctl, acked=False)


def run_subscriber(spec: WorkerSpec, ctl: WorkerControl, acked: bool) -> None:
    apps = _Apps(spec, SUB_APP, acked)
    try:
        apps.subscribe_all()
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        rec = subscribe_schedule(schedule, apps)
        errors = [f"{rec.foreign} messages without a phase tag"] if rec.foreign else []
        ctl.report(WorkerReport(spec.worker_id, spec.role, rec.tallies, errors))
    finally:
        apps.close()
