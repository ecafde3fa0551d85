"""Adapter `mosquitto`: the Debian mosquitto broker with paho-mqtt clients, QoS 0.

Each run writes a minimal config (one loopback listener on a free port,
anonymous access, no persistence, TCP_NODELAY). Clients use paho's manual loop
(no paho thread): one selector over every client socket of the worker, MQTT
3.1.1, clean sessions. TCP_NODELAY is set on the client sockets too, because
pyzmq and asyncio (nats-py) set it by default and Nagle's algorithm would
otherwise dominate the latency figures. A publisher is "blocked" while paho
still holds unsent bytes for all of its connections (the kernel buffer is full).
"""

from __future__ import annotations

import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from perf import procutil
from perf.model import WorkerReport, WorkerSpec, topic_for
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.systems._tcp_server import TcpServerBroker
from perf.workload import publish_schedule, start_timeout_s, subscribe_schedule

NAME = "mosquitto"
KEEPALIVE_S = 600  # the longest run must not need PINGREQs (nobody services them mid-run)
CONNECT_TIMEOUT_S = 30.0
DRAIN_PACKETS = 256  # packets read from one socket before serving the next


def unavailable_reason() -> str | None:
    """Needs the mosquitto binary and the paho-mqtt package."""
    return procutil.peer_unavailable("mosquitto", "paho", "paho-mqtt")


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """Write the config, start mosquitto, wait until its port accepts connections."""

    def argv(binary: str, port: int) -> list[str]:
        conf = config.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_connections -1\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        return [binary, "-c", str(conf)]

    return TcpServerBroker(config, "mosquitto", "mqtt", argv)


class _Clients:
    """One paho client per pair on a manual loop; a SyncPublisher and SyncSubscriber."""

    def __init__(self, spec: WorkerSpec) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        url = urlsplit(spec.endpoint)
        self.topics = [topic_for(p) for p in spec.pairs]
        self.clients: list[Any] = []
        self.fds: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.received = 0
        self.sink: Callable[[bytes], None] = lambda _payload: None
        self.acked: set[int] = set()
        for pair in spec.pairs:
            c = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=f"bench-{spec.role}-{pair}",
                protocol=MQTTProtocolVersion.MQTTv311,
            )
            c.on_message = self._on_message
            c.on_subscribe = self._on_subscribe
            c.connect(url.hostname or "127.0.0.1", url.port or 1883, keepalive=KEEPALIVE_S)
            sock = c.socket()
            if not isinstance(sock, socket.socket):
                raise RuntimeError("mosquitto: paho did not open a TCP socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(sock, selectors.EVENT_READ, c)
            self.clients.append(c)
            self.fds.append(sock.fileno())
        self._pump_until(lambda: all(c.is_connected() for c in self.clients), "CONNACK")

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self.received += 1
        self.sink(message.payload)

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, *_rest: Any) -> None:
        self.acked.add(mid)

    def _pump_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto: no {what} within {CONNECT_TIMEOUT_S:.0f} s")
            for key, _ in self.selector.select(0.1):
                key.data.loop_read()

    def subscribe_all(self) -> None:
        mids = {
            c.subscribe(topic, qos=0)[1] for c, topic in zip(self.clients, self.topics, strict=True)
        }
        self._pump_until(lambda: mids <= self.acked, "SUBACK")

    def try_send(self, slot: int, payload: bytes) -> bool:
        c = self.clients[slot]
        if c.want_write():
            c.loop_write()
            if c.want_write():
                return False
        info = c.publish(self.topics[slot], payload, qos=0)
        if info.rc:
            raise RuntimeError(f"mosquitto: publish failed with rc={info.rc}")
        return True

    def wait_writable(self, timeout_s: float) -> None:
        pending = {fd: c for fd, c in zip(self.fds, self.clients, strict=True) if c.want_write()}
        if not pending:
            return
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        for fd, _ in poller.poll(int(timeout_s * 1000)):
            pending[fd].loop_write()

    def poll(self, timeout_s: float, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        for key, _ in self.selector.select(timeout_s):
            c = key.data
            for _ in range(DRAIN_PACKETS):
                before = self.received
                c.loop_read()
                if self.received == before:
                    break

    def close(self) -> None:
        self.selector.close()
        for c in self.clients:
            c.disconnect()


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect a client per pair (CONNACK received), then follow the schedule."""
    clients = _Clients(spec)
    try:
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        tallies = publish_schedule(schedule, spec.pairs, spec.n_pairs, spec.payload_size, clients)
        ctl.report(WorkerReport(spec.worker_id, spec.role, tallies))
    finally:
        clients.close()


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    """Connect and subscribe a client per pair (SUBACK received), then count."""
    clients = _Clients(spec)
    try:
        clients.subscribe_all()
        ctl.ready()
        schedule = ctl.wait_start(start_timeout_s(spec))
        if schedule is None:
            return
        rec = subscribe_schedule(schedule, clients)
        errors = [f"{rec.foreign} messages without a phase tag"] if rec.foreign else []
        ctl.report(WorkerReport(spec.worker_id, spec.role, rec.tallies, errors))
    finally:
        clients.close()
