"""Runs one platform: the broker first, then every app of the manifests directory.

The main loop only polls children and acts on the stop request a signal handler recorded.
Every timer (restart backoff and budget, settle time, limit windows, stop grace) runs on
the injected monotonic `clock`, so a wall-clock jump (NTP, suspend, an operator's `date`)
changes no decision; `wall_clock` only stamps what people read (log records, status).
The broker is a supervised child like the apps, through the same life-cycle machine with
policy `always` (apps reconnect and resend by themselves after it comes back), and
records app exits; restart policies, limits and monitoring build on it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import protocol as P
from broker.config import CONFIG_FD_VARIABLE
from broker.endpoints import (
    LISTEN_FDS_VARIABLE,
    Endpoints,
    Listeners,
    Transport,
    effective_transport,
    listen_fds_variable,
    require_curve,
)
from broker.logs import event
from broker.manifests import Manifest, load_manifests
from broker.paths import PlatformPaths
from clients.bus import Bus, BusError, Message, Subscription
from security.grant_channel import GRANTS_FD_VARIABLE
from security.grants import OPERATOR_ID, GrantKind
from security.handoff import CREDENTIAL_FD_VARIABLE, SERVER_KEY_FD_VARIABLE, handoff_pipe
from security.keyring import PASSPHRASE_ENV, PASSPHRASE_FD_VARIABLE
from supervisor.app_output import AppOutput
from supervisor.config import PlatformConfig
from supervisor.credential_commands import credential_command
from supervisor.identity import CredentialGate, Identities
from supervisor.launch import app_argv, app_environment
from supervisor.lifecycle import Action, Input, Lifecycle, RestartPolicy, State
from supervisor.manifest_watch import ManifestWatch
from supervisor.monitor import Usage, check_limits, kill_leftovers, process_table
from supervisor.operator_door import OperatorDoor
from supervisor.platform_lock import PlatformLock, PlatformLocked
from supervisor.platform_state import platform_alive, recorded_pid
from supervisor.reaping import become_subreaper, reap_adopted
from supervisor.spawner import Child, Spawner

log = logging.getLogger("plexus.supervisor")

CONTROL_TOPIC = P.SUPERVISOR_CONTROL_TOPIC
"""Requests the supervisor serves: {"op": "list"|"start"|"stop"|"restart", "app": id}."""


_DRAIN_S = 1.0
"""Longest wait, when an app ended, for the rest of its output (a surviving grandchild may
hold its pipe open; the pump keeps reading it all the same)."""


class PlatformRunning(Exception):
    """Another platform already runs with this home."""


@dataclass
class AppRecord:
    """What the supervisor knows of one app, as shown by `plexus status` and `plexus apps`."""

    manifest: Manifest
    life: Lifecycle
    child: Child | None = None
    grant_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    stop_deadline: float = 0.0
    wanted: bool = True
    """False after an operator stop: `after` ordering and restarts leave it alone."""
    removed: bool = False
    """Its manifest is gone: it is stopped, and forgotten once it no longer runs."""

    @property
    def app_id(self) -> str:
        return self.manifest.app_id

    def as_dict(self, now: float, wall_now: float) -> dict[str, Any]:
        """Status of the app at monotonic `now`; `started_at` in wall time (`wall_now`)."""
        running = self.life.state in (State.RUNNING, State.STARTING, State.STOPPING)
        return {
            "pid": self.child.pid if self.child and running else None,
            # an external app is never launched here: whether it is connected is the broker's
            "state": "EXTERNAL" if self.manifest.external else self.life.state.value,
            "restarts": self.life.restart_count,
            "started_at": round(wall_now - (now - self.life.started_at), 3)
            if running and self.life.started_at
            else None,
            "uptime_s": round(now - self.life.started_at, 1)
            if running and self.life.started_at
            else None,
            "exit_status": self.life.last_status,
            "exit_reason": self.life.last_reason,
            "cpu_percent": self.usage.cpu_percent if running else None,
            "rss_mb": self.usage.rss_mb if running else None,
            "external": self.manifest.external,
            "limits": {
                "memory_mb": self.manifest.limits.memory_mb,
                "cpu_percent": self.manifest.limits.cpu_percent,
            },
        }


def _service_policy() -> Lifecycle:
    return Lifecycle(
        RestartPolicy(
            mode="always",
            backoff_base_s=0.1,
            backoff_cap_s=5.0,
            budget=10,
            budget_window_s=60.0,
            settle_s=0.5,
        )
    )


@dataclass
class PlatformService:
    """The broker or the persistence service: supervised like an app, always restarted."""

    name: str
    identity: str | None = None
    """Platform app id it connects to the bus as (a credential is minted per launch)."""
    child: Child | None = None
    life: Lifecycle = field(default_factory=_service_policy)
    grant_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.child.pid if self.child else None,
            "restarts": self.life.restart_count,
            "state": self.life.state.value,
        }


@dataclass
class Supervisor:
    """Starts, watches, restarts, limits and stops the processes of one platform.

    One thread (the caller of `run`) does everything; the bus dispatcher thread only
    hands operator commands over through `_commands`.
    """

    paths: PlatformPaths
    apps_dir: Path
    config: PlatformConfig
    spawner: Spawner = field(default_factory=Spawner)
    clock: Callable[[], float] = time.monotonic
    """Seconds for every timer and deadline: monotonic, never the wall clock."""
    wall_clock: Callable[[], float] = time.time
    """Seconds since the epoch, only to stamp log records and the state file."""
    apps: dict[str, AppRecord] = field(default_factory=dict)
    services: dict[str, PlatformService] = field(default_factory=dict)
    """The broker and (with persistence on) the persistence service, by name."""
    bus: Bus | None = None
    identities: Identities = field(default_factory=Identities)
    """The platform's keys and live grants (only the supervisor grants)."""
    started_at: float = 0.0
    """Wall time the platform started (for `plexus status`)."""
    _commands: queue.SimpleQueue[tuple[dict[str, Any], Future[dict[str, Any]]]] = field(
        default_factory=queue.SimpleQueue
    )
    _unresponsive: Subscription | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _lock: PlatformLock | None = None
    _manifest_watch: ManifestWatch | None = None
    endpoints: Endpoints | None = None
    """Where the broker and the store listen (set at start: ipc paths or TCP ports)."""
    _listeners: Listeners | None = None
    """TCP only: the listening sockets the services bind on, held for the platform's life."""
    _door: OperatorDoor | None = None
    """TCP only: where the operator gets a grant (security.operator_door)."""
    _main_calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = field(
        default_factory=queue.SimpleQueue
    )
    output: AppOutput | None = None
    """Pumps the apps' stdout and stderr into HOME/logs and the terminal (built at the first
    launch of an app whose output the spawner captured)."""

    def start(self) -> None:
        """Broker, then apps (in parallel, `after` respected); raises before starting anything
        on a running platform or a bad manifest."""
        self.paths.prepare()
        try:
            self._lock = PlatformLock.acquire(self.paths.run_dir / "platform.lock")
        except PlatformLocked:
            raise PlatformRunning(
                f"a platform already runs with home {self.paths.home}; "
                "stop it or pass another --home"
            ) from None
        self._refuse_second_platform()
        manifests = load_manifests(self.apps_dir)
        self._manifest_watch = ManifestWatch(self.apps_dir)
        become_subreaper()  # an app's escaped descendants stay inside the platform's tree
        self._open_endpoints()
        self.apps = {
            app_id: AppRecord(m, Lifecycle(self._policy(m))) for app_id, m in manifests.items()
        }
        self.started_at = self.wall_clock()
        self.services = {"broker": PlatformService("broker")}
        if self.config.persistence:
            self.services["persistence"] = PlatformService("persistence", P.PERSISTENCE_ID)
        for service in self.services.values():  # the broker waits for persistence to sync
            self._start_service(service)
        _grant, credential = self.identities.grant(
            P.SUPERVISOR_ID, GrantKind.SERVICE, pid=os.getpid()
        )
        self.bus = Bus.connect(
            self.bus_endpoint,
            P.SUPERVISOR_ID,
            credential.token,
            timeout=15.0,
            session="supervisor",
        )
        self._unresponsive = self.bus.subscribe(P.UNRESPONSIVE_TOPIC)
        self.bus.serve(CONTROL_TOPIC, self._control)
        for record in self.apps.values():
            record.wanted = not record.manifest.external
        self._start_ready_apps()
        if self._listeners is not None:
            self._door = OperatorDoor(
                self.paths.run_dir / "operator", self._door_grant, self._door_revoke
            )
        self._write_state()
        external = sum(1 for r in self.apps.values() if r.manifest.external)
        event(
            log,
            "platform-started",
            apps=len(self.apps) - external,
            external=external,
            home=str(self.paths.home),
        )

    def run(self, should_stop: Callable[[], bool], tick: float = 0.1) -> None:
        """Watch children until `should_stop()` (the caller then calls `stop`)."""
        next_sample = 0.0
        while not should_stop():
            self.poll()
            now = self.clock()
            if now >= next_sample:
                self._reread_manifests(now)
                self._expire_credentials()
                reap_adopted(child.pid for child in self._children())
                self._sample()
                self._write_state()
                next_sample = now + 1.0
            self._wake.wait(tick)  # an operator command cuts the wait short
            self._wake.clear()

    def poll(self) -> None:
        """One round: exits, timers, unresponsive notices, operator commands, start order."""
        now = self.clock()
        for service in self.services.values():
            self._poll_service(service, now)
        for record in self.apps.values():
            self._poll_app(record, now)
        self._take_unresponsive_notices(now)
        self._take_commands(now)
        self._take_main_calls()
        self._start_ready_apps()

    def stop(self) -> None:
        """Stop apps (SIGTERM, then SIGKILL after the grace period), then the broker."""
        now = self.clock()
        running = [r for r in self.apps.values() if r.child and r.child.poll() is None]
        for record in running:
            record.wanted = False
            self._act(record, record.life.handle(Input.STOP, now, reason="platform stop"), now)
        for record in running:
            assert record.child is not None
            status = self.spawner.stop(record.child, self.config.stop_grace_s)
            self._exited(record, status, self.clock())
        if self.output is not None:
            self.output.stop()
        if self.bus is not None:
            self.bus.close()
        for service in self.services.values():  # broker first: persistence takes its last events
            if service.child is not None:
                self.spawner.stop(service.child, self.config.stop_grace_s)
        self.identities.close()
        if self._door is not None:
            self._door.close()
        if self._listeners is not None:
            self._listeners.close()
        if self._lock is not None:
            self._lock.release()
        self.paths.state_file.unlink(missing_ok=True)
        event(log, "platform-stopped")

    # -- one app ----------------------------------------------------------------------------

    def _policy(self, manifest: Manifest) -> RestartPolicy:
        c = self.config
        return RestartPolicy(
            mode=manifest.restart,
            backoff_base_s=c.restart_backoff_s,
            backoff_cap_s=c.restart_backoff_cap_s,
            budget=c.restart_budget,
            budget_window_s=c.restart_window_s,
            settle_s=c.settle_s,
        )

    def _poll_app(self, record: AppRecord, now: float) -> None:
        life = record.life
        child = record.child
        if child is not None and life.state in (State.STARTING, State.RUNNING, State.STOPPING):
            status = child.poll()
            if status is not None:
                self._exited(record, status, now)
                return
            if life.state is State.STOPPING and now >= record.stop_deadline:
                self.spawner.signal_group(child, signal.SIGKILL)
        timer = life.next_timer()
        if timer is not None and now >= timer:
            kind = Input.DUE if life.state is State.BACKOFF else Input.SETTLED
            self._act(record, life.handle(kind, now), now)

    def _exited(self, record: AppRecord, status: int | None, now: float) -> None:
        """The process ended: clean up its tree and credential, let the policy decide."""
        was = record.life.state
        stragglers = kill_leftovers(record.usage.seen)
        record.usage = Usage()
        self._revoke(record)
        actions = record.life.handle(Input.EXITED, now, status)
        pid = record.child.pid if record.child else None
        kind = "exit" if status == 0 or was is State.STOPPING else "crash"
        if self.output is not None:  # its last lines (a traceback) before its exit is told
            self.output.drain(record.app_id, _DRAIN_S)
        self._announce(
            kind,
            record,
            pid=pid,
            status=status,
            reason=record.life.last_reason,
            stragglers_killed=stragglers,
            next_state=record.life.state.value,
        )
        if record.life.state is State.BACKOFF:
            self._announce(
                "restart-scheduled",
                record,
                delay_s=round(record.life.due_at - now, 3),
                restarts=record.life.restart_count,
            )
        self._act(record, actions, now)

    def _act(self, record: AppRecord, actions: list[Action], now: float) -> None:
        for action in actions:
            if action is Action.SPAWN:
                self._launch(record, now)
            elif action is Action.TERMINATE and record.child is not None:
                self._terminate(record, record.child, now)
            elif action is Action.ANNOUNCE_FATAL:
                self._announce(
                    "fatal",
                    record,
                    restarts=record.life.restart_count,
                    reason=record.life.last_reason,
                    budget=f"{self.config.restart_budget} restarts in "
                    f"{self.config.restart_window_s:g} s",
                )

    def _terminate(self, record: AppRecord, child: Child, now: float) -> None:
        """SIGTERM the app's group with a SIGCONT (a stopped process handles SIGTERM only
        once continued); a hung app that is stopped gets SIGKILL at once, no grace spent."""
        if record.life.killing and self.spawner.is_stopped(child):
            event(log, "app-stopped-killed", logging.WARNING, app=record.app_id, pid=child.pid)
            self.spawner.signal_group(child, signal.SIGKILL)
            record.stop_deadline = now
            return
        self.spawner.signal_group(child, signal.SIGTERM)
        self.spawner.signal_group(child, signal.SIGCONT)
        record.stop_deadline = now + self.config.stop_grace_s

    def _start_ready_apps(self) -> None:
        """Start wanted, stopped apps whose `after` dependencies are running."""
        now = self.clock()
        for record in self.apps.values():
            if not record.wanted or record.life.state is not State.STOPPED:
                continue
            deps = [self.apps.get(d) for d in record.manifest.after]
            if all(dep is not None and dep.life.state is State.RUNNING for dep in deps):
                self._act(record, record.life.handle(Input.START, now), now)

    def _reread_manifests(self, now: float) -> None:
        """Manifests added, changed or removed while running: an added app appears in
        `plexus apps list` (STOPPED until started, or EXTERNAL); a changed one takes effect
        at its next launch; a removed one is stopped and then forgotten."""
        for app_id, record in list(self.apps.items()):
            if record.removed and (record.child is None or record.child.poll() is not None):
                del self.apps[app_id]
                event(log, "app-removed", app=app_id)
        if self._manifest_watch is None:
            return
        changes = self._manifest_watch.poll(
            {a: r.manifest for a, r in self.apps.items() if not r.removed}
        )
        for manifest in changes.added:
            self.apps[manifest.app_id] = AppRecord(
                manifest, Lifecycle(self._policy(manifest)), wanted=False
            )
            event(log, "app-added", app=manifest.app_id, external=manifest.external)
        for manifest in changes.changed:
            self.apps[manifest.app_id].manifest = manifest
            event(log, "app-manifest-changed", app=manifest.app_id)
        for app_id in changes.removed:
            record = self.apps[app_id]
            record.removed, record.wanted = True, False
            if record.child is not None and record.child.poll() is None:
                self._act(
                    record, record.life.handle(Input.STOP, now, reason="manifest removed"), now
                )
            event(log, "app-manifest-removed", app=app_id)

    def _sample(self) -> None:
        """Measure every running app; kill the ones over a limit; publish the metrics."""
        now = self.clock()
        metrics: dict[str, Any] = {}
        table = process_table()
        for record in self.apps.values():
            if record.child is None or record.life.state not in (State.RUNNING, State.STARTING):
                continue
            record.usage.sample(record.child.pid, table)
            metrics[record.app_id] = {
                "cpu_percent": record.usage.cpu_percent,
                "rss_mb": record.usage.rss_mb,
            }
            breach = check_limits(
                record.usage, record.manifest.limits, now, self.config.cpu_window_s
            )
            if breach is not None:
                self._announce(
                    "limit-kill",
                    record,
                    pid=record.child.pid,
                    limit_kind=breach.kind,
                    measured=breach.measured,
                    limit=breach.limit,
                    reason=breach.describe(),
                )
                self._act(
                    record, record.life.handle(Input.KILL, now, reason=breach.describe()), now
                )
        if self.bus is not None and metrics:
            self._publish(P.METRICS_TOPIC, metrics)

    def _take_unresponsive_notices(self, now: float) -> None:
        if self._unresponsive is None:
            return
        while (notice := self._unresponsive.get_nowait()) is not None:
            app = notice.data.get("app") if isinstance(notice.data, dict) else None
            record = self.apps.get(app) if isinstance(app, str) else None
            if record is None or record.life.state is not State.RUNNING:
                continue
            reason = f"unresponsive: silent for {notice.data.get('silent_ms')} ms"
            self._announce(
                "hang-kill", record, pid=record.child.pid if record.child else None, reason=reason
            )
            self._act(record, record.life.handle(Input.KILL, now, reason=reason), now)

    # -- operator commands (plexus apps ...) --------------------------------------------------

    def _control(self, message: Message) -> dict[str, Any]:
        """Bus dispatcher thread: hand the command to the main loop and wait for it."""
        request = dict(message.data) if isinstance(message.data, dict) else {}
        request["sender"] = message.sender  # the broker's word for who asks, not the body's
        future: Future[dict[str, Any]] = Future()
        self._commands.put((request, future))
        self._wake.set()
        return future.result(10.0)

    @property
    def bus_endpoint(self) -> str:
        return (self.endpoints or Endpoints.ipc(self.paths)).bus

    def _open_endpoints(self) -> None:
        """The ipc paths, or (TCP) the listening ports held from here to `stop`."""
        transport = effective_transport(self.config.transport)
        if transport is Transport.IPC:
            self.endpoints = Endpoints.ipc(self.paths)
            return
        require_curve()
        self._listeners = Listeners.open()
        self.endpoints = self._listeners.endpoints
        endpoints = self.endpoints
        event(
            log, "tcp-endpoints", bus=endpoints.bus, events=endpoints.events, store=endpoints.store
        )

    def _on_main(self, call: Callable[[], Any], wait: bool = True) -> Any:
        """Run `call` on the main loop (a door thread's way to touch the grants)."""
        future: Future[Any] = Future()
        self._main_calls.put((call, future))
        self._wake.set()
        return future.result(10.0) if wait else None

    def _take_main_calls(self) -> None:
        while True:
            try:
                call, future = self._main_calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(call())
            except Exception as exc:
                future.set_exception(exc)

    def _door_grant(self, key: bytes, pid: int) -> str:
        def grant() -> str:
            return self.identities.grant_key(OPERATOR_ID, GrantKind.OPERATOR, key, pid).grant_id

        granted: str = self._on_main(grant)
        return granted

    def _door_revoke(self, grant_id: str) -> None:
        self._on_main(lambda: self.identities.revoke(grant_id), wait=False)

    def _take_commands(self, now: float) -> None:
        while True:
            try:
                request, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(self._command(request, now))
            except Exception as exc:  # an answer, never a dead supervisor
                future.set_result({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def _command(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        op, app = request.get("op"), request.get("app")
        if op in ("credentials", "issue", "revoke"):
            manifests = {a: r.manifest for a, r in self.apps.items() if not r.removed}
            return credential_command(
                request, self.identities, manifests, self.config.external_ttl_s
            )
        if op == "list":
            wall = self.wall_clock()
            return {"ok": True, "apps": {a: r.as_dict(now, wall) for a, r in self.apps.items()}}
        record = self.apps.get(app) if isinstance(app, str) else None
        if record is None:
            error = f"no app {app!r}; see `plexus apps list`"
            return {"ok": False, "error": error, "unknown_app": True}
        if record.manifest.external:
            return {"ok": False, "error": f"{app} is external: start it yourself"}
        if op == "stop":
            record.wanted = False
            self._act(record, record.life.handle(Input.STOP, now, reason="operator stop"), now)
        elif op == "start":
            record.wanted = True
            self._act(record, record.life.handle(Input.START, now, reason="operator"), now)
        elif op == "restart":
            record.wanted = True
            if record.child is not None and record.child.poll() is None:
                self._act(
                    record, record.life.handle(Input.KILL, now, reason="operator restart"), now
                )
            else:
                self._act(record, record.life.handle(Input.START, now, reason="operator"), now)
        else:
            return {"ok": False, "error": f"unknown op {op!r}: use list, start, stop, restart"}
        return {"ok": True, "app": app, "state": record.life.state.value}

    # -- internals --------------------------------------------------------------------------

    def _refuse_second_platform(self) -> None:
        state = self.paths.read_state()
        if state is None:
            self.paths.state_file.unlink(missing_ok=True)  # unreadable: nothing runs from it
            return
        pid = recorded_pid(state)
        if pid != os.getpid() and platform_alive(state):
            raise PlatformRunning(
                f"a platform (pid {pid}) already runs with home {self.paths.home}; "
                "stop it or pass another --home"
            )
        if pid != os.getpid():
            event(log, "stale-state-removed", logging.WARNING, pid=pid)
            self.paths.state_file.unlink(missing_ok=True)

    def _poll_service(self, service: PlatformService, now: float) -> None:
        """A platform service's exit and timers, through its life cycle (restart with
        backoff, within its budget)."""
        life = service.life
        if service.child is not None and life.state in (State.STARTING, State.RUNNING):
            status = service.child.poll()
            if status is not None:
                actions = life.handle(Input.EXITED, now, status)
                event(
                    log,
                    f"{service.name}-exited",
                    logging.ERROR,
                    status=status,
                    reason=life.last_reason,
                    next_state=life.state.value,
                )
                if Action.ANNOUNCE_FATAL in actions:
                    event(
                        log,
                        f"{service.name}-fatal",
                        logging.CRITICAL,
                        restarts=life.restart_count,
                        hint=f"see the {service.name}'s log lines above; restart the platform",
                    )
                return
        timer = life.next_timer()
        if timer is not None and now >= timer:
            kind = Input.DUE if life.state is State.BACKOFF else Input.SETTLED
            if Action.SPAWN in life.handle(kind, now):
                self._start_service(service)

    def _start_service(self, service: PlatformService) -> None:
        """Launch the broker or the persistence service: the platform config on
        PLEXUS_CONFIG_FD and, for a bus client, a fresh credential on PLEXUS_CREDENTIAL_FD."""
        argv = [
            sys.executable,
            "-m",
            service.name,
            "--home",
            str(self.paths.home),
            "--apps",
            str(self.apps_dir),
        ]
        if service.life.state is not State.STARTING:
            service.life.handle(Input.START, self.clock())
        env = dict(os.environ)
        env.pop("PLEXUS_TOKEN", None)
        env.pop(CREDENTIAL_FD_VARIABLE, None)
        config_fd = handoff_pipe(self.config.to_document())
        channel = self.identities.service_channel(service.name)
        gate = CredentialGate.new() if service.identity is not None else None
        env[CONFIG_FD_VARIABLE] = str(config_fd)
        env[SERVER_KEY_FD_VARIABLE] = str(channel.key_fd)
        env[GRANTS_FD_VARIABLE] = str(channel.channel_fd)
        fds = [config_fd, *channel.fds()]
        if self.endpoints is not None:
            env.update(self.endpoints.environment())
        if self._listeners is not None:
            names = ("bus", "events") if service.name == "broker" else ("store",)
            listen_fds = self._listeners.fds(*names)
            env[LISTEN_FDS_VARIABLE] = listen_fds_variable(listen_fds)
            fds += listen_fds.values()
        if gate is not None:
            env[CREDENTIAL_FD_VARIABLE] = str(gate.read_end)
            fds.append(gate.read_end)
        passphrase = env.pop(PASSPHRASE_ENV, None)  # a service reads it from a pipe only
        passphrase_fd: int | None = None
        if passphrase is not None and service.name == "persistence":
            passphrase_fd = handoff_pipe(passphrase.encode("utf-8", "surrogateescape"))
            env[PASSPHRASE_FD_VARIABLE] = str(passphrase_fd)
            fds.append(passphrase_fd)
        try:
            service.child = self.spawner.spawn(service.name, argv, env, fds)
        except BaseException:
            channel.ours.close()
            channel.child_spawned()
            if gate is not None:
                gate.abandon()
            raise
        finally:
            os.close(config_fd)
            if passphrase_fd is not None:
                os.close(passphrase_fd)
        if service.grant_id is not None:
            self.identities.revoke(service.grant_id)
        grant = self.identities.service_started(
            service.name, channel, service.child.pid, gate, service.identity
        )
        service.grant_id = grant.grant_id if grant is not None else None
        service.life.handle(Input.SPAWNED, self.clock())
        event(
            log,
            f"{service.name}-launched",
            pid=service.child.pid,
            restarts=service.life.restart_count,
        )

    def _launch(self, record: AppRecord, now: float) -> None:
        manifest = record.manifest
        gate = CredentialGate.new()
        try:
            env = app_environment(manifest, self.paths, self.bus_endpoint, gate.read_end)
            record.child = self.spawner.spawn(
                manifest.app_id, app_argv(manifest), env, [gate.read_end], capture_output=True
            )
        except OSError as exc:
            gate.abandon()
            self._announce("launch-failed", record, reason=str(exc))
            self._act(record, record.life.handle(Input.SPAWN_FAILED, now, reason=str(exc)), now)
            return
        gate.child_spawned()
        grant, credential = self.identities.grant(
            manifest.app_id, GrantKind.APP, pid=record.child.pid
        )
        record.grant_id = grant.grant_id
        gate.open(credential)  # only now can the app connect: the broker knows its grant
        if record.child.output is not None:
            self._app_output().attach(manifest.app_id, record.child.output)
        record.life.handle(Input.SPAWNED, now)
        self._announce("launch", record, pid=record.child.pid, restarts=record.life.restart_count)

    def _app_output(self) -> AppOutput:
        if self.output is None:
            self.output = AppOutput(
                self.paths.log_dir,
                max_bytes=self.config.log_max_mb * 1024 * 1024,
                files=self.config.log_files,
                echo=sys.stderr,
                wall_clock=self.wall_clock,
            )
        return self.output

    def _announce(self, kind: str, record: AppRecord, **fields: Any) -> None:
        """A lifecycle event: a log line and `$sys.audit.apps.<kind>` for the audit service."""
        body = {"app": record.app_id, "event": kind, "at": self.wall_clock(), **fields}
        level = logging.INFO if kind in ("launch", "exit", "restart-scheduled") else logging.WARNING
        event(log, f"app-{kind}", level, **{k: v for k, v in body.items() if k != "event"})
        self._publish(f"{P.LIFECYCLE_TOPIC_PREFIX}{kind}", body)

    def _publish(self, topic: str, data: Any) -> None:
        if self.bus is None:
            return
        try:
            self.bus.publish(topic, data)
        except BusError as exc:  # the bus being down must not stop supervision
            event(log, "publish-failed", logging.WARNING, topic=topic, error=str(exc))

    def _revoke(self, record: AppRecord) -> None:
        if record.grant_id is not None:
            self.identities.revoke(record.grant_id)
            record.grant_id = None

    def _children(self) -> list[Child]:
        """Every child the supervisor launched and still owns."""
        owned = [s.child for s in self.services.values()] + [r.child for r in self.apps.values()]
        return [child for child in owned if child is not None]

    def _expire_credentials(self) -> None:
        for grant in self.identities.expire():
            event(log, "credential-expired", app=grant.app_id, grant=grant.grant_id)

    def _write_state(self) -> None:
        now, wall = self.clock(), self.wall_clock()
        self.paths.write_state(
            {
                "pid": os.getpid(),
                "home": str(self.paths.home),
                "endpoint": self.bus_endpoint,
                "transport": (self.endpoints or Endpoints.ipc(self.paths)).transport.value,
                "operator_door": str(self._door.path) if self._door is not None else None,
                "broker_key": self.identities.broker_keys.public.hex(),
                "store_key": self.identities.store_keys.public.hex(),
                "apps_dir": str(self.apps_dir),
                "started_at": self.started_at,
                "persistence": self.config.persistence,
                "broker": self.services["broker"].as_dict() if self.services else {},
                "persistence_service": (
                    self.services["persistence"].as_dict()
                    if "persistence" in self.services
                    else None
                ),
                "apps": {app_id: r.as_dict(now, wall) for app_id, r in self.apps.items()},
            }
        )
