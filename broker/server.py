"""The broker process's socket loop: one ROUTER for apps, one ZAP socket for authentication.

Shaped like the zguide's Majordomo broker: poll with a timeout, drain what is readable,
hand each message to the pure `Router`, send what it returns, publish the events it
produced on the PUB socket, then housekeeping. One thread owns every socket. The sender's
identity is the ZAP `User-Id` libzmq attaches to each frame of an authenticated
connection, read on every inbound message.

With persistence on, a starting broker first waits (holding what apps send) until the
persistence service reports its watermark (EVSYNC), then rebuilds durable state from the
store (broker.recovery) and serves. The service's link also acknowledges stored events
(EVACK, which releases held CONFIRMs) and fetches ranges it missed (EVFETCH).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from broker import protocol as P
from broker.codec import pack, required_int, unpack_map
from broker.errors import Code, PermissionViolation, ProtocolViolation, StorageFailure, WireError
from broker.events import EventLog
from broker.histogram import LatencyHistogram
from broker.logs import event
from broker.manifests import Manifest, ManifestError, Permissions, load_manifests
from broker.paths import PlatformPaths
from broker.recovery import recover
from broker.router import Router, RouterConfig
from security.credentials import CredentialStore
from security.zap import answer_zap, bind_zap

log = logging.getLogger("plexus.broker")

_SNDMORE = 2
_NOBLOCK = 1
_RCVMORE = 13
_DRAIN_LIMIT = 512
_RESCAN_INTERVAL_NS = 1_000_000_000
_TIMER_TICK_NS = 50_000_000
"""How often delivery timers (retries, ack timeouts, grace periods) are looked at."""
_EVENT_BATCH_MS = 2
_EVENT_BATCH_NS = _EVENT_BATCH_MS * 1_000_000
_EVENT_BATCH_MAX = 256
"""Events go out when the oldest unsent one is 2 ms old or 256 wait: one PUB send per
batch instead of per loop pass (a third of the broker's CPU at 10k msg/s otherwise)."""
_HOLD_LIMIT = 100_000
"""Most app messages held while the broker waits for persistence to start."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker process needs to know, read once at start."""

    paths: PlatformPaths
    apps_dir: Path | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    hwm: int = 10_000
    poll_ms: int = 100
    persistence: bool = False
    """Wait for the persistence service, recover from the store, confirm once stored."""
    recovery_timeout_s: float = 10.0
    """Longest wait for the persistence service before recovering from the store alone."""


class ManifestCatalog:
    """App permissions by id, re-reading the apps dir when an unknown app appears.

    A miss re-reads the directory when it changed (its mtime) or a second has passed, so
    a manifest added for an external app is seen at once, and unknown ids cannot make
    the broker re-read the directory more than once a second otherwise.
    """

    def __init__(self, apps_dir: Path | None, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._apps_dir = apps_dir
        self._clock = clock
        self._manifests: dict[str, Manifest] = {}
        self._last_scan = -_RESCAN_INTERVAL_NS
        self._scanned_stamp = 0
        self.rescan()

    def _dir_stamp(self) -> int:
        try:
            return self._apps_dir.stat().st_mtime_ns if self._apps_dir else 0
        except OSError:
            return 0

    def rescan(self) -> None:
        self._last_scan = self._clock()
        self._scanned_stamp = self._dir_stamp()
        if self._apps_dir is None:
            return
        try:
            self._manifests = load_manifests(self._apps_dir)
        except ManifestError as exc:
            event(log, "manifests-invalid", logging.ERROR, error=str(exc))

    def permissions(self, app_id: str) -> Permissions | None:
        manifest = self._manifests.get(app_id)
        if manifest is None and (
            self._dir_stamp() != self._scanned_stamp
            or self._clock() - self._last_scan >= _RESCAN_INTERVAL_NS
        ):
            self.rescan()
            manifest = self._manifests.get(app_id)
        return manifest.permissions if manifest else None


class BrokerServer:
    """Binds the sockets on `bind()`, runs the loop in `run()`; constructing opens nothing."""

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self._context = context or zmq.Context.instance()
        self._credentials = CredentialStore(config.paths.creds_dir)
        self._catalog = ManifestCatalog(config.apps_dir)
        self.route_latency = LatencyHistogram()
        self.router = Router(
            self._catalog.permissions,
            config.router,
            self._extra_stats,
            event_log=EventLog(epoch=time.time_ns(), retain=config.persistence),
            first_delivery_seq=time.time_ns() // 1000,
        )
        self._router_socket: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._events: zmq.Socket[bytes] | None = None
        self._recovering = config.persistence
        self._recovery_deadline = time.monotonic() + config.recovery_timeout_s
        self._held: list[tuple[bytes, str, list[bytes]]] = []
        self._started = time.monotonic()
        self._auth_failures = 0
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0
        self.endpoint = ""

    def bind(self) -> str:
        """Open the ZAP handler and the ROUTER; returns the bound endpoint."""
        self._zap = bind_zap(self._context)
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        sock.plain_server = True
        sock.zap_domain = P.ZAP_DOMAIN.encode()
        sock.router_mandatory = 1
        sock.sndhwm = self.config.hwm
        sock.rcvhwm = self.config.hwm
        sock.maxmsgsize = P.MAX_FRAME_BYTES
        endpoint = self.config.paths.bus_endpoint()
        sock.bind(endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router_socket = sock
        events = self._context.socket(zmq.PUB)
        events.linger = 0
        events.sndhwm = 100_000
        events.bind(self.config.paths.events_endpoint())
        self._events = events
        event(log, "broker-listening", endpoint=self.endpoint)
        return self.endpoint

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until `should_stop()` is true (checked at least every poll interval)."""
        sock, zap = self._router_socket, self._zap
        assert sock is not None and zap is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        tick_ns = _TIMER_TICK_NS
        next_housekeeping = time.monotonic_ns() + tick_ns
        log_ = self.router.log
        while not should_stop():
            waiting = log_.batch_started_ns
            timeout = self.config.poll_ms if not waiting else _EVENT_BATCH_MS
            ready = dict(poller.poll(timeout))
            if zap in ready:
                self._answer_zap(zap)
            if sock in ready:
                self._drain(sock)
            if log_.batch_due(time.monotonic_ns(), _EVENT_BATCH_NS, _EVENT_BATCH_MAX):
                self._publish_events()
            if self._recovering and time.monotonic() >= self._recovery_deadline:
                event(
                    log,
                    "persistence-silent",
                    logging.WARNING,
                    waited_s=self.config.recovery_timeout_s,
                )
                self._recover(sock, 0)
            now = time.monotonic_ns()
            if now >= next_housekeeping:
                next_housekeeping = now + tick_ns
                self._housekeeping(sock)

    def close(self) -> None:
        for sock in (self._router_socket, self._zap, self._events):
            if sock is not None:
                sock.close(linger=0)
        self._router_socket = self._zap = self._events = None

    # -- authentication ---------------------------------------------------------------------

    def _answer_zap(self, zap: zmq.Socket[bytes]) -> None:
        accepted, app_id, address, mechanism = answer_zap(zap, self._credentials, P.ZAP_DOMAIN)
        if not accepted:
            self._auth_failures += 1
            event(
                log,
                "auth-denied",
                logging.WARNING,
                app=app_id,
                address=address,
                mechanism=mechanism,
            )

    # -- routing ----------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        router = self.router
        clock = time.perf_counter_ns
        for _ in range(_DRAIN_LIMIT):
            try:
                peer = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            started = clock()
            first = sock.recv(copy=False)
            user_id = first.get("User-Id")
            app_id = user_id if isinstance(user_id, str) else ""
            frames = [first.bytes]
            overflow = False
            while sock.getsockopt(_RCVMORE):
                part = sock.recv()
                if len(frames) < P.MAX_FRAMES:
                    frames.append(part)
                else:
                    overflow = True
            if overflow:
                exc = ProtocolViolation(Code.TOO_LARGE, f"more than {P.MAX_FRAMES} frames")
                self._send(sock, [router.error(peer, exc)])
                continue
            if self._recovering and app_id != P.PERSISTENCE_ID:
                self._hold(sock, peer, app_id, frames)
                continue
            self._dispatch(sock, peer, app_id, frames, started)

    def _dispatch(
        self, sock: zmq.Socket[bytes], peer: bytes, app_id: str, frames: list[bytes], started: int
    ) -> None:
        router = self.router
        if frames[0] in P.EVENT_COMMANDS:
            try:
                self._event_command(sock, peer, app_id, frames)
            except WireError as exc:
                self._send(sock, [router.error(peer, exc)])
            return
        try:
            outbound = router.handle(peer, app_id, frames, time.time_ns())
        except Exception:  # a bug must cost one message, never the broker
            log.exception("router failed on %s from %s", frames[0][:16], app_id)
            internal = WireError(Code.INTERNAL, "the broker failed on this message")
            self._send(sock, [router.error(peer, internal)])
            return
        if outbound:
            self._send(sock, outbound)
            if router.events:
                self._log_events()
            if frames[0] == P.PUB:
                elapsed = time.perf_counter_ns() - started
                record = self.route_latency.record
                for _ in range((len(frames) - 1) // 2):
                    record(elapsed)

    # -- persistence ------------------------------------------------------------------------

    def _hold(self, sock: zmq.Socket[bytes], peer: bytes, app_id: str, frames: list[bytes]) -> None:
        """Keep an app's message until recovery is done (bounded; beyond: an error)."""
        if len(self._held) < _HOLD_LIMIT:
            self._held.append((peer, app_id, frames))
            return
        busy = StorageFailure(
            Code.STORAGE_UNAVAILABLE, "the broker is waiting for persistence; retry shortly"
        )
        self._send(sock, [self.router.error(peer, busy)])

    def _recover(self, sock: zmq.Socket[bytes], watermark: int) -> None:
        """Rebuild from the store, then serve what was held meanwhile, in order."""
        report = recover(self.router, self.config.paths, time.time_ns())
        self.router.log.start_after(watermark)
        self._recovering = False
        event(log, "broker-recovered", held=len(self._held), **asdict(report))
        held, self._held = self._held, []
        for peer, app_id, frames in held:
            self._dispatch(sock, peer, app_id, frames, time.perf_counter_ns())
        self._publish_events()

    def _event_command(
        self, sock: zmq.Socket[bytes], peer: bytes, app_id: str, frames: list[bytes]
    ) -> None:
        """EVSYNC, EVACK, EVFETCH from the persistence service's welcomed session."""
        session = self.router.session_of(peer)
        if session is None:
            raise ProtocolViolation(Code.NOT_WELCOMED, "no session: send HELLO first")
        if app_id != P.PERSISTENCE_ID or session.app_id != app_id:
            raise PermissionViolation(Code.COMMAND_DENIED, "event commands are for persistence")
        session.last_seen_ns = time.time_ns()
        if len(frames) != 2:
            raise ProtocolViolation(Code.BAD_FRAME_COUNT, "event commands take 2 frames")
        body = unpack_map(frames[1])
        log_ = self.router.log
        command = frames[0]
        if command == P.EVFETCH:
            first = required_int(body, "from", 1, 2**63)
            data = log_.since(first)
            if data is None:
                resume = log_.oldest_available()
                raise StorageFailure(
                    Code.STORAGE_UNAVAILABLE,
                    f"events {first}..{resume - 1} are not retained (lost with a crashed "
                    "broker before they were stored; their publishers resend them)",
                    resume_from=resume,
                )
            self._send(sock, [(peer, [P.EVDATA, *data[1:]])])
            return
        watermark = required_int(body, "wm", 0, 2**63)
        if command == P.EVSYNC:
            if self._recovering:
                self._recover(sock, watermark)
            reply = {"next": log_.last_seq + 1, "epoch": log_.epoch}
            self._send(sock, [(peer, [P.EVSYNCOK, pack(reply)])])
        self._send(sock, self.router.confirm_stored(watermark))

    def _publish_events(self) -> None:
        frames = self.router.log.take_batch()
        if frames is not None and self._events is not None:
            self._events.send_multipart(frames)

    def _send(self, sock: zmq.Socket[bytes], outbound: list[tuple[bytes, list[bytes]]]) -> None:
        send = sock.send
        for peer, frames in outbound:
            try:
                send(peer, _SNDMORE | _NOBLOCK)
            except zmq.ZMQError as exc:
                lost = (len(frames) - 1) // 4 if frames[0] == P.DELIVER else 0
                self.router.undeliverable(peer, lost)
                if exc.errno == zmq.EHOSTUNREACH:
                    self.router.drop_peer(peer, time.time_ns())
                continue
            last = len(frames) - 1
            for index, frame in enumerate(frames):
                send(frame, _SNDMORE if index < last else 0)

    def _housekeeping(self, sock: zmq.Socket[bytes]) -> None:
        """Delivery timers, then the events they produced as log lines, then the rate."""
        outbound = self.router.housekeeping(time.time_ns())
        if outbound:
            self._send(sock, outbound)
        self._log_events()
        now = time.monotonic()
        mark_time, mark_count = self._rate_mark
        if now - mark_time >= 1.0:
            delivered = self.router.stats.delivered
            self._rate = (delivered - mark_count) / (now - mark_time)
            self._rate_mark = (now, delivered)

    def _log_events(self) -> None:
        for item in self.router.events:
            name = item.pop("event")
            level = logging.INFO if name == "session-expired" else logging.WARNING
            event(log, name, level, **item)
        self.router.events.clear()

    def _extra_stats(self, reset: bool) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        latency = self.route_latency.summary_us()
        if reset:
            self.route_latency.reset()
        return {
            "route_latency": latency,
            "auth_failures": self._auth_failures,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "rss_max_kb": usage.ru_maxrss,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "delivered_per_s": round(self._rate, 1),
            "endpoint": self.endpoint,
        }
