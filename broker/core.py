"""Everything the broker process decides, without a socket: the server only moves frames.

`BrokerCore` sits in front of the routing core (broker.router) and owns what the socket
loop used to decide:

- the event-stream link of the platform services that consume the stream (EVSYNC, EVACK,
  EVFETCH from any identity in EVENT_CONSUMERS; EVRESTORE from `$persistence`);
- recovery with persistence on: app messages are held (bounded per app by count and bytes,
  beyond: ERROR 414 and a Denied event; and in all, beyond: ERROR 500) until
  `$persistence` has synced (EVSYNCOK restore=True) and sent its EVRESTORE pages, each
  applied by the injected `Restorer` (broker.recovery.apply_restore); the last page
  (`done`) ends recovery and the held messages are served in order. A persistence silent
  past the recovery timeout is warned about (`persistence-silent`, again each timeout),
  never served around: without the durable state, resends would be routed twice;
- the stream's retention: consumers behind the bound are alerted on `$sys.alerts.events`,
  skipped, and the skip recorded (ConsumerSkipped);
- frames beyond the protocol's limit, messages beyond the platform's `pub_bytes_max` (the
  server stopped reading them: ERROR 413 and a Denied event), peers the socket found
  unreachable, ZAP refusals (AuthFailed events).

Every method takes the monotonic `now_ns`; the wall clock is the router's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from broker import protocol as P
from broker.errors import (
    AuthFailure,
    CapExceeded,
    Code,
    PermissionViolation,
    ProtocolViolation,
    StorageFailure,
    WireError,
)
from broker.event_records import AuthFailed, ConsumerSkipped, Denied
from broker.events import EventLog
from broker.router import Outbound, Router, confirm_messages
from broker.wire import EvAck, EvData, EvFetch, EvRestore, EvSync, EvSyncOk, unpack_batch

HOLD_LIMIT: Final = 100_000
"""Most app messages held while the broker waits for persistence to start."""
EVENT_BATCH_NS: Final = 2_000_000
EVENT_BATCH_MAX: Final = 256
"""Events nobody waits for go out when the oldest unsent one is 2 ms old or 256 wait: one
PUB send per batch instead of per loop pass (a third of the broker's CPU at 10k msg/s
otherwise). Events a CONFIRM waits for go as soon as the confirming consumer is idle
(`EventLog.confirmer_idle`): at most one batch per group commit, never a fixed wait."""
_RECOVERY_COMMANDS: Final = frozenset({P.HELLO, P.PING, P.BYE, *P.EVENT_COMMANDS})
"""What `$persistence` may do while the broker recovers (the rest of it is held too)."""


class Restorer(Protocol):
    """Applies one EVRESTORE page to the router (broker.recovery.apply_restore)."""

    def apply(self, router: Router, page: EvRestore, now_ns: int) -> None: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class CoreConfig:
    persistence: bool = False
    """Hold app messages until persistence restored the durable state."""
    recovery_timeout_ns: int = 10_000_000_000
    """How long persistence may stay silent before each `persistence-silent` warning."""
    hold_limit: int = HOLD_LIMIT
    """(Their bytes: the router's caps, `hold_max_bytes`; each app's share: its caps.)"""
    event_batch_ns: int = EVENT_BATCH_NS
    """Longest wait of an unsent event that no CONFIRM waits for."""


class BrokerCore:
    """The broker's decisions; the server feeds it frames and sends what it returns."""

    def __init__(
        self,
        router: Router,
        config: CoreConfig,
        restorer: Restorer | None,
        now_ns: int,
    ) -> None:
        self.router = router
        self.stream: EventLog = router.stream
        self.config = config
        self._restorer = restorer
        self.recovering = config.persistence
        self._restore_offered = False
        self._silent_deadline = now_ns + config.recovery_timeout_ns
        self._held: list[tuple[bytes, str, list[bytes]]] = []
        self._held_bytes = 0
        self._held_by_app: dict[str, list[int]] = {}
        """app id -> [messages, bytes] it has held (its `held_messages`/`held_bytes`)."""
        self._commands: dict[bytes, Callable[[bytes, str, list[bytes], int], list[Outbound]]] = {
            P.EVSYNC: self._evsync,
            P.EVACK: self._evack,
            P.EVFETCH: self._evfetch,
            P.EVRESTORE: self._evrestore,
        }

    @property
    def held(self) -> int:
        return len(self._held)

    # -- inbound ----------------------------------------------------------------------------

    def inbound(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        """One message from `peer` (authenticated as `app_id`)."""
        if self.recovering and not (app_id == P.PERSISTENCE_ID and frames[0] in _RECOVERY_COMMANDS):
            return self._hold(peer, app_id, frames)
        handler = self._commands.get(frames[0])
        if handler is None:
            return self.router.handle(peer, app_id, frames, now_ns)
        try:
            return handler(peer, app_id, frames, now_ns)
        except WireError as exc:
            return [self.router.error(peer, exc)]

    def overflow(self, peer: bytes) -> list[Outbound]:
        """`peer` sent more frames than any command takes (the rest were discarded)."""
        exc = ProtocolViolation(Code.TOO_LARGE, f"more than {P.MAX_FRAMES} frames")
        return [self.router.error(peer, exc)]

    def oversized(self, peer: bytes, app_id: str, size: int, limit: int) -> list[Outbound]:
        """`peer` sent one message of `size` bytes, over the platform's `pub_bytes_max`
        (`limit`): the server kept none of it past the limit. An ERROR and a Denied."""
        router = self.router
        exc = CapExceeded(
            Code.PUB_TOO_LARGE,
            "pub_bytes_max",
            limit,
            f"a message of {size} bytes exceeds the platform's limit of {limit} bytes",
        )
        session = router.sessions.by_peer.get(peer)
        router.refresh_stamp()
        router.report_limit(app_id, session.name if session is not None else "", "", exc)
        return [router.error(peer, exc)]

    def unreachable(self, peer: bytes, frames: list[bytes], gone: bool, now_ns: int) -> None:
        """The socket could not take `frames` for `peer`: count what is lost; `gone` (the
        peer has no connection): detach its session, so its messages queue meanwhile."""
        lost = 0
        if frames[0] == P.DELIVER:  # packed (version 2): one frame holds the whole batch
            lost = (len(unpack_batch(frames, 4) if len(frames) == 2 else frames) - 1) // 4
        self.router.undeliverable(peer, lost)
        if gone:
            self.router.drop_peer(peer, now_ns)

    def refuse(self, peer: bytes, exc: WireError) -> list[Outbound]:
        """`peer`'s message could not even be read (a malformed packed batch): an ERROR."""
        return [self.router.error(peer, exc)]

    def internal_error(self, peer: bytes) -> list[Outbound]:
        """A bug cost one message (the server logged it); the peer is told, nothing else."""
        return [self.router.error(peer, WireError(Code.INTERNAL, "the broker failed on this"))]

    def auth_failed(self, refused: AuthFailed) -> None:
        """The ZAP handler refused a connection (a security event)."""
        self.router.refresh_stamp()
        self.router.emit(refused)

    def revoked(self, peer: bytes, app_id: str, why: str, now_ns: int) -> list[Outbound]:
        """`peer`'s credential was taken back: its session ends now, it is told why."""
        exc = AuthFailure(Code.CREDENTIAL_REVOKED, why)
        session = self.router.session_of(peer)
        if session is not None:
            self.router.sessions.end(session, now_ns, "closed", why)
        return [self.router.error(peer, exc)]

    def unauthenticated(self, peer: bytes) -> list[Outbound]:
        """A message on a connection whose credential is no longer granted."""
        exc = AuthFailure(
            Code.CREDENTIAL_REVOKED, "this connection's credential was revoked or expired"
        )
        return [self.router.error(peer, exc)]

    # -- recovery ---------------------------------------------------------------------------

    def _hold(self, peer: bytes, app_id: str, frames: list[bytes]) -> list[Outbound]:
        """Keep an app's message until recovery is done, bounded: by the app's own caps
        (beyond: 414, reported), then in all (beyond: 500, retry shortly)."""
        router = self.router
        size = sum(map(len, frames))
        caps = router.caps_of(app_id)
        mine = self._held_by_app.get(app_id) or [0, 0]
        if mine[0] >= caps.held_messages or mine[1] + size > caps.held_bytes:
            cap, limit = (
                ("held_messages", caps.held_messages)
                if mine[0] >= caps.held_messages
                else ("held_bytes", caps.held_bytes)
            )
            exc = CapExceeded(
                Code.HOLD_LIMIT,
                cap,
                limit,
                f"the broker is recovering and holds {mine[0]} messages ({mine[1]} bytes) of "
                f"app {app_id!r} already; retry once it has recovered",
            )
            router.refresh_stamp()
            router.report_limit(app_id, "", "", exc)
            return [router.error(peer, exc)]
        most = router.config.caps.hold_max_bytes
        if len(self._held) >= self.config.hold_limit or self._held_bytes + size > most:
            busy = StorageFailure(
                Code.STORAGE_UNAVAILABLE, "the broker is waiting for persistence; retry shortly"
            )
            return [router.error(peer, busy)]
        self._held.append((peer, app_id, frames))
        self._held_bytes += size
        mine[0] += 1
        mine[1] += size
        self._held_by_app[app_id] = mine
        return []

    def _recovered(self, now_ns: int) -> list[Outbound]:
        """Recovery is over: number what waited, then serve what was held, in order."""
        self.recovering = False
        self.stream.resume()
        summary = self._restorer.summary() if self._restorer is not None else {}
        self.router.notices.append(
            {"event": "broker-recovered", "held": len(self._held), **summary}
        )
        held, self._held = self._held, []
        self._held_bytes = 0
        self._held_by_app.clear()
        out: list[Outbound] = []
        for peer, app_id, frames in held:
            out.extend(self.inbound(peer, app_id, frames, now_ns))
        return out

    # -- the consumers' link ----------------------------------------------------------------

    def _consumer(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> str:
        """The welcomed consumer identity of an EV command; errors (and a Denied) else."""
        router = self.router
        session = router.sessions.of(peer, app_id, now_ns)
        if app_id not in P.EVENT_CONSUMERS or (
            frames[0] == P.EVRESTORE and app_id != P.PERSISTENCE_ID
        ):
            command = frames[0].decode("ascii", "replace")
            reason = f"{command} is for the platform's event-stream services"
            router.stats.denied += 1
            router.refresh_stamp()
            router.emit(
                Denied(
                    app_id, session.name, "command", command, int(Code.COMMAND_DENIED), reason, ""
                )
            )
            raise PermissionViolation(Code.COMMAND_DENIED, reason)
        return app_id

    def _evsync(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        consumer = self._consumer(peer, app_id, frames, now_ns)
        wm = EvSync.decode(frames).wm
        restore = self.recovering and consumer == P.PERSISTENCE_ID
        if restore:  # the store is complete up to wm: this broker numbers after it
            self.stream.start_after(wm)
            self._restore_offered = True
        next_seq = self.stream.register(consumer, wm)
        out: list[Outbound] = [(peer, EvSyncOk(next_seq, self.stream.epoch, restore).frames())]
        out.extend(self._released(consumer, wm))
        return out

    def _evack(self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int) -> list[Outbound]:
        consumer = self._consumer(peer, app_id, frames, now_ns)
        return self._released(consumer, EvAck.decode(frames).wm)

    def _released(self, consumer: str, wm: int) -> list[Outbound]:
        released = self.stream.acknowledge(consumer, wm)
        return [out for peer, ids in released.items() for out in confirm_messages(peer, ids)]

    def _evfetch(
        self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int
    ) -> list[Outbound]:
        self._consumer(peer, app_id, frames, now_ns)
        first = EvFetch.decode(frames).first
        data = self.stream.since(first)
        if data is None:
            resume = self.stream.oldest_available()
            raise StorageFailure(
                Code.STORAGE_UNAVAILABLE,
                f"events {first}..{resume - 1} are not retained (dropped past the retention "
                "bound, or lost with a crashed broker before they were stored)",
                resume_from=resume,
            )
        return [(peer, EvData(data[1], data[2]).frames())]

    def _evrestore(
        self, peer: bytes, app_id: str, frames: list[bytes], now_ns: int
    ) -> list[Outbound]:
        self._consumer(peer, app_id, frames, now_ns)
        page = EvRestore.decode(frames)
        if not (self.recovering and self._restore_offered):
            raise ProtocolViolation(
                Code.UNKNOWN_COMMAND, "EVRESTORE only after an EVSYNCOK that asked for it"
            )
        if self._restorer is not None:
            self._restorer.apply(self.router, page, now_ns)
        if page.done:
            return self._recovered(now_ns)
        return []

    # -- time -------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> list[Outbound]:
        """Timers: the router's, and the warning about a silent persistence service."""
        if self.recovering and now_ns >= self._silent_deadline:
            self._silent_deadline = now_ns + self.config.recovery_timeout_ns
            self.router.notices.append(
                {
                    "event": "persistence-silent",
                    "waited_s": round(self.config.recovery_timeout_ns / 1e9, 3),
                    "held": len(self._held),
                    "hint": "the broker serves apps once persistence restored its state",
                }
            )
        if self.recovering:
            return []
        out = self.router.housekeeping(now_ns)
        out.extend(self.enforce_retention(now_ns))
        return out

    def events_due(self, now_ns: int) -> list[bytes] | None:
        """The next event batch for the PUB socket when one is due: at once when CONFIRMs
        wait on it and the confirming consumer is idle, else when old or big enough."""
        stream = self.stream
        if stream.confirmer_idle() or stream.batch_due(
            now_ns, self.config.event_batch_ns, EVENT_BATCH_MAX
        ):
            return stream.take_batch()
        return None

    def enforce_retention(self, now_ns: int) -> list[Outbound]:
        """Skip consumers that fell behind the bound: alert, move on, record the gap."""
        skips = self.stream.trim()
        out: list[Outbound] = []
        router = self.router
        if skips:
            router.refresh_stamp()
        reason = "behind the retention bound"
        for skip in skips:
            notice: dict[str, Any] = {
                "consumer": skip.consumer,
                "first": skip.first,
                "last": skip.last,
                "reason": reason,
                "hint": "the consumer resumes after `last`; fetch the gap from the store",
            }
            router.notices.append({"event": "consumer-skipped", **notice})
            out.extend(router.publish_internal(P.EVENTS_ALERT_TOPIC, notice, now_ns))
            router.emit(ConsumerSkipped(skip.consumer, skip.first, skip.last, reason))
        return out
