"""The broker process's socket loop: the bus ROUTER, the events PUB, and ZAP.

Shaped like the zguide's Majordomo broker: poll with a timeout, drain what is readable,
hand each message to the pure core (broker.core, over broker.router), send what it
returns, publish the event batches it produced on the PUB socket, then the timers. One
thread owns every socket. The sender's identity is the ZAP `User-Id` libzmq attaches to
each frame of an authenticated connection, read on every inbound message. The events
socket is authenticated too (its own ZAP domain): only the platform's stream consumers
may subscribe there.

Identity: every socket is a CurveZMQ server with the broker's key (handed over by the
supervisor, pinned by every client). The User-Id is a grant id; the `GrantRegistry` the
supervisor fills over the grant channel (`security.grant_channel`) maps it to the app id
on every message, so a revoked or expired credential's connection is refused at once and
its sessions end.

The server keeps only sockets, polling and clocks: every decision (recovery, holding,
the consumers' link, overflow, unreachable peers) is the core's. Timers run on the
monotonic clock; the wall clock only stamps messages and events.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq

from broker import protocol as P
from broker.catalog import ManifestCatalog
from broker.core import BrokerCore, CoreConfig
from broker.endpoints import Endpoints
from broker.endpoints import bind as bind_endpoint
from broker.errors import AuthFailure, Code, WireError
from broker.event_records import AuthFailed
from broker.events import EventLog, StreamLimits
from broker.histogram import LatencyHistogram
from broker.logs import event
from broker.paths import PlatformPaths
from broker.recovery import RecoveryReport, apply_restore
from broker.router import Router, RouterConfig
from broker.usage import process_usage
from broker.wire import EvRestore, Hello, unpack_batch
from security.credentials import ServerKeys
from security.grant_channel import GrantReceiver
from security.grants import Grant, GrantRegistry
from security.peers import LiveProcessTree
from security.zap import ZapAnswer, answer, bind_zap

log = logging.getLogger("plexus.broker")

_SNDMORE = 2
_NOBLOCK = 1
_DRAIN_LIMIT = 512
_TIMER_TICK_NS = 50_000_000
"""How often delivery timers (retries, ack timeouts, grace periods) are looked at."""


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker process needs to know, read once at start."""

    paths: PlatformPaths
    apps_dir: Path | None = None
    router: RouterConfig = field(default_factory=RouterConfig)
    hwm: int = 10_000
    poll_ms: int = 100
    persistence: bool = False
    """Wait for the persistence service's restore, confirm once stored."""
    recovery_timeout_s: float = 10.0
    """How long persistence may stay silent before each `persistence-silent` warning."""
    event_batch_ms: float = 2.0
    """Longest wait of an unsent event no CONFIRM waits for (broker.core.EVENT_BATCH_NS)."""
    consumers: tuple[str, ...] = ()
    """Event-stream consumers expected from the start (nothing is dropped before their
    first EVSYNC); `$persistence` is one whenever persistence is on."""
    stream: StreamLimits = field(default_factory=StreamLimits)
    keys: ServerKeys | None = None
    """The broker's CurveZMQ key pair (None: a fresh one, only for tests of the core)."""
    endpoints: Endpoints | None = None
    """Where to listen (None: the ipc paths of `paths`)."""
    listen_fds: Mapping[str, int] = field(default_factory=dict)
    """Inherited listening descriptors to bind on, by endpoint name (broker.endpoints)."""


class RecoveryRestorer:
    """Applies EVRESTORE pages with broker.recovery.apply_restore, one report per recovery."""

    def __init__(self) -> None:
        self._report = RecoveryReport()

    def apply(self, router: Router, page: EvRestore, now_ns: int) -> None:
        apply_restore(router, page, now_ns, self._report)

    def summary(self) -> dict[str, Any]:
        return asdict(self._report)


class BrokerServer:
    """Binds the sockets on `bind()`, runs the loop in `run()`; constructing opens nothing."""

    def __init__(
        self,
        config: BrokerConfig,
        context: zmq.Context[Any] | None = None,
        monotonic: Callable[[], int] = time.monotonic_ns,
        wall_clock: Callable[[], int] = time.time_ns,
        grants: GrantReceiver | None = None,
    ) -> None:
        self.config = config
        self._context = context or zmq.Context.instance()
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self.keys = config.keys or ServerKeys.generate()
        self.registry = GrantRegistry(os.getuid(), LiveProcessTree())
        self._grants = grants
        self._peer_grant: dict[bytes, str] = {}
        """The grant each connection said HELLO with (its sessions end when it is revoked)."""
        self._grant_pids: dict[str, int] = {}
        """The pid the kernel named when each grant last connected (for security events)."""
        self._catalog = ManifestCatalog(config.apps_dir, monotonic)
        self.route_latency = LatencyHistogram()
        consumers = tuple(dict.fromkeys(config.consumers))
        confirm_by = P.PERSISTENCE_ID if config.persistence else None
        stream = EventLog(
            epoch=wall_clock(),
            consumers=consumers,
            confirm_by=confirm_by,
            limits=config.stream,
            waiting=config.persistence,
        )
        self.router = Router(
            self._catalog.permissions,
            config.router,
            self._extra_stats,
            stream=stream,
            first_delivery_seq=wall_clock() // 1000,
            wall_clock=wall_clock,
            limits_for=self._catalog.limits,
        )
        now = monotonic()
        self.core = BrokerCore(
            self.router,
            CoreConfig(
                persistence=config.persistence,
                recovery_timeout_ns=int(config.recovery_timeout_s * 1e9),
                event_batch_ns=int(config.event_batch_ms * 1e6),
            ),
            RecoveryRestorer(),
            now,
        )
        self._zap_policy: dict[str, frozenset[str] | None] = {
            P.ZAP_DOMAIN: None,
            P.EVENTS_ZAP_DOMAIN: P.EVENT_CONSUMERS,
        }
        self._router_socket: zmq.Socket[bytes] | None = None
        self._zap: zmq.Socket[bytes] | None = None
        self._events: zmq.Socket[bytes] | None = None
        self._started = now
        self._auth_failures = 0
        self._rate_mark = (now, 0)
        self._rate = 0.0
        self.endpoint = ""

    def bind(self) -> str:
        """Open the ZAP handler, the ROUTER and the events PUB; returns the bus endpoint."""
        self._read_grants()
        self._zap = bind_zap(self._context)
        sock = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        self.keys.serve(sock)
        sock.zap_domain = P.ZAP_DOMAIN.encode()
        sock.router_mandatory = 1
        sock.sndhwm = self.config.hwm
        sock.rcvhwm = self.config.hwm
        sock.maxmsgsize = P.MAX_FRAME_BYTES
        endpoints = self.config.endpoints or Endpoints.ipc(self.config.paths)
        fds = self.config.listen_fds
        self.endpoint = bind_endpoint(sock, "bus", endpoints.bus, fds)
        self._router_socket = sock
        events = self._context.socket(zmq.PUB)
        events.linger = 0
        events.sndhwm = 100_000
        self.keys.serve(events)
        events.zap_domain = P.EVENTS_ZAP_DOMAIN.encode()
        events_endpoint = bind_endpoint(events, "events", endpoints.events, fds)
        self._events = events
        event(log, "broker-listening", endpoint=self.endpoint, events=events_endpoint)
        return self.endpoint

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until `should_stop()` is true (checked at least every poll interval)."""
        sock, zap = self._router_socket, self._zap
        assert sock is not None and zap is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        grants = self._grants
        if grants is not None:
            poller.register(grants.fileno(), zmq.POLLIN)
        monotonic = self._monotonic
        tick_ns = _TIMER_TICK_NS
        next_tick = monotonic() + tick_ns
        core = self.core
        stream = self.router.stream
        batch_poll_ms = max(1, math.ceil(self.config.event_batch_ms))
        while not should_stop():
            timeout = batch_poll_ms if stream.pending else self.config.poll_ms
            ready = dict(poller.poll(timeout))
            if grants is not None and not grants.closed and grants.fileno() in ready:
                self._read_grants()
                if grants.closed:
                    poller.unregister(grants.fileno())
            if zap in ready:
                self._answer_zap(zap)
            if sock in ready:
                self._drain(sock)
            now = monotonic()
            batch = core.events_due(now)
            if batch is not None:
                self._publish_events(batch)
            if now >= next_tick:
                next_tick = now + tick_ns
                self._tick(sock, now)

    def close(self) -> None:
        for sock in (self._router_socket, self._zap, self._events):
            if sock is not None:
                sock.close(linger=0)
        self._router_socket = self._zap = self._events = None

    # -- authentication ---------------------------------------------------------------------

    def _answer_zap(self, zap: zmq.Socket[bytes]) -> None:
        got = answer(zap, self.registry, self._zap_policy, self._read_grants)
        if got is None:
            return
        grant = got.admission.grant
        if grant is not None:
            if got.peer.pid is not None:
                self._grant_pids[grant.grant_id] = got.peer.pid
            return
        self._security_event(
            self.registry.owner_of(got.peer.pid),
            got,
            str(got.admission.refusal),
            got.reason,
            got.admission.claimed,
        )

    def _security_event(
        self, app: str, got: ZapAnswer | None, code: str, reason: str, claimed: str, pid: int = 0
    ) -> None:
        """A refused credential or identity: counted, logged, and an AuthFailed event."""
        self._auth_failures += 1
        address = got.peer.address if got is not None else ""
        if got is not None and got.peer.pid is not None:
            pid = got.peer.pid
        mechanism = got.mechanism if got is not None else "CURVE"
        domain = got.domain if got is not None else P.ZAP_DOMAIN
        event(
            log,
            "auth-denied",
            logging.WARNING,
            app=app,
            claimed=claimed,
            pid=pid,
            code=code,
            address=address,
            domain=domain,
            reason=reason,
        )
        self.core.auth_failed(AuthFailed(app, address, mechanism, reason, code, claimed, pid))

    def _read_grants(self) -> None:
        """Apply what the supervisor sent; end the sessions of every revoked grant."""
        if self._grants is None:
            return
        applied = self._grants.apply(self.registry)
        if applied.revoked:
            self._end_grants(applied.revoked, "credential revoked")

    def _end_grants(self, grants: tuple[Grant, ...] | list[Grant], why: str) -> None:
        gone = {g.grant_id for g in grants}
        peers = [peer for peer, grant in self._peer_grant.items() if grant in gone]
        now = self._monotonic()
        outbound = []
        for peer in peers:
            grant_id = self._peer_grant.pop(peer)
            app = next(g.app_id for g in grants if g.grant_id == grant_id)
            outbound += self.core.revoked(peer, app, f"{why} ({app})", now)
        for grant in grants:
            self._grant_pids.pop(grant.grant_id, None)
            event(log, "credential-ended", app=grant.app_id, grant=grant.grant_id, reason=why)
        if outbound and self._router_socket is not None:
            self._send(self._router_socket, outbound)

    def _identity_checked(
        self, peer: bytes, grant_id: Any, app_id: str | None, frames: list[bytes]
    ) -> str | None:
        """The sender of a HELLO, or of a message whose grant is gone; None: refused."""
        if app_id is None:  # its grant was revoked or expired since it connected
            if self._router_socket is not None:
                self._send(self._router_socket, self.core.unauthenticated(peer))
            return None
        return app_id if self._hello(peer, grant_id, app_id, frames) else None

    def _hello(self, peer: bytes, grant_id: Any, app_id: str, frames: list[bytes]) -> bool:
        """Note the connection's grant; refuse a HELLO that claims another identity (a
        security event). True: the core may take the HELLO."""
        self._peer_grant[peer] = grant_id
        try:
            claimed = Hello.decode(frames).app
        except WireError:
            return True  # the core refuses it with its code
        if not claimed or claimed == app_id:
            return True
        reason = f"HELLO claims {claimed[:64]!r} with the credential of {app_id!r}"
        self._security_event(
            app_id, None, "identity-mismatch", reason, claimed, self._grant_pids.get(grant_id, 0)
        )
        refusal = AuthFailure(Code.IDENTITY_MISMATCH, reason)
        if self._router_socket is not None:
            self._send(self._router_socket, self.core.refuse(peer, refusal))
        return False

    # -- routing ----------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        try:
            self._drain_pass(sock)
        finally:  # one pass, one set of log lines (dead letters counted, not one each)
            self._log_notices()

    def _drain_pass(self, sock: zmq.Socket[bytes]) -> None:  # noqa: PLR0912 - one flat hot loop
        core = self.core
        clock = time.perf_counter_ns
        monotonic = self._monotonic
        record = self.route_latency.record
        identity = self.registry.identity
        most = self.config.router.caps.pub_bytes_max
        for _ in range(_DRAIN_LIMIT):
            try:
                peer = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            started = clock()
            part = sock.recv(copy=False)
            user_id = part.get("User-Id")
            app_id = identity(user_id) if isinstance(user_id, str) else None
            frames = [part.bytes]
            size = len(frames[0])
            overflow = False
            while part.more:  # a Frame attribute: getsockopt(RCVMORE) builds an Enum each call
                part = sock.recv(copy=False)
                size += len(part)  # counted, not copied: past `most` nothing more is kept
                if len(frames) < P.MAX_FRAMES and size <= most:
                    frames.append(part.bytes)
                else:
                    overflow = True
            if overflow:
                del frames  # the first frames of a refused message go now, not next pass
                refused = core.oversized(peer, app_id or "", size, most) if size > most else None
                self._send(sock, refused or core.overflow(peer))
                continue
            if app_id is None or frames[0] == P.HELLO:
                app_id = self._identity_checked(peer, user_id, app_id, frames)
                if app_id is None:
                    continue
            if len(frames) == 2 and frames[0] == P.PUB:  # packed: one frame, the whole batch
                try:
                    frames = unpack_batch(frames, 2)
                except WireError as exc:
                    self._send(sock, core.refuse(peer, exc))
                    continue
            try:
                outbound = core.inbound(peer, app_id, frames, monotonic())
            except Exception:  # a bug must cost one message, never the broker
                log.exception("broker failed on %s from %s", frames[0][:16], app_id)
                self._send(sock, core.internal_error(peer))
                continue
            if outbound:
                self._send(sock, outbound)
                if frames[0] == P.PUB:
                    record(clock() - started, (len(frames) - 1) // 2)

    def _publish_events(self, frames: list[bytes]) -> None:
        if self._events is not None:
            self._events.send_multipart(frames)

    def _send(self, sock: zmq.Socket[bytes], outbound: list[tuple[bytes, list[bytes]]]) -> None:
        send = sock.send
        for peer, frames in outbound:
            try:
                send(peer, _SNDMORE | _NOBLOCK)
            except zmq.ZMQError as exc:
                gone = exc.errno == zmq.EHOSTUNREACH
                self.core.unreachable(peer, frames, gone, self._monotonic())
                continue
            last = len(frames) - 1
            for index, frame in enumerate(frames):
                send(frame, _SNDMORE if index < last else 0)

    def _tick(self, sock: zmq.Socket[bytes], now: int) -> None:
        """Timers, then the notices they produced as log lines, then the rate."""
        outbound = self.core.tick(now)
        if outbound:
            self._send(sock, outbound)
        expired = self.registry.expired(self._wall_clock() / 1e9)
        if expired:
            self._end_grants(expired, "credential expired")
        self._log_notices()
        mark_time, mark_count = self._rate_mark
        if now - mark_time >= 1_000_000_000:
            delivered = self.router.stats.delivered
            self._rate = (delivered - mark_count) * 1e9 / (now - mark_time)
            self._rate_mark = (now, delivered)

    def _log_notices(self) -> None:
        for item in self.router.take_notices():
            name = item.pop("event")
            level = (
                logging.INFO if name in ("session-expired", "broker-recovered") else logging.WARNING
            )
            event(log, name, level, **item)

    def _extra_stats(self, reset: bool) -> dict[str, Any]:
        usage = process_usage()
        latency = self.route_latency.summary_us()
        if reset:
            self.route_latency.reset()
        return {
            "route_latency": latency,
            "auth_failures": self._auth_failures,
            "uptime_s": round((self._monotonic() - self._started) / 1e9, 3),
            "rss_max_kb": usage.rss_max_kb,
            "cpu_s": round(usage.cpu_s, 3),
            "credentials": len(self.registry),
            "delivered_per_s": round(self._rate, 1),
            "endpoint": self.endpoint,
            "recovering": self.core.recovering,
        }
