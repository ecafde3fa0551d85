"""Runs one platform: the broker first, then every app of the manifests directory.

The main loop only polls children and acts on the stop request a signal handler recorded.
This first supervisor restarts the broker when it dies (apps reconnect by themselves) and
records app exits; restart policies, limits and monitoring build on it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from broker import protocol as P
from broker.logs import event
from broker.manifests import Manifest, load_manifests
from broker.paths import PlatformPaths
from clients.bus import Bus
from security.credentials import CredentialStore
from supervisor.config import PlatformConfig, broker_arguments
from supervisor.launch import app_argv, app_environment, credential_pipe
from supervisor.spawner import Child, Spawner

log = logging.getLogger("plexus.supervisor")


class PlatformRunning(Exception):
    """Another platform already runs with this home."""


@dataclass
class AppRecord:
    """What the supervisor knows of one app, as shown by `plexus status`."""

    manifest: Manifest
    child: Child | None = None
    token: str | None = None
    state: str = "STOPPED"
    started_at: float = 0.0
    exit_status: int | None = None
    restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.child.pid if self.child else None,
            "state": self.state,
            "started_at": self.started_at,
            "exit_status": self.exit_status,
            "restarts": self.restarts,
            "external": self.manifest.external,
        }


@dataclass
class Supervisor:
    """Starts, watches and stops the processes of one platform."""

    paths: PlatformPaths
    apps_dir: Path
    config: PlatformConfig
    spawner: Spawner = field(default_factory=Spawner)
    clock: Callable[[], float] = time.time
    apps: dict[str, AppRecord] = field(default_factory=dict)
    broker: Child | None = None
    broker_restarts: int = 0
    bus: Bus | None = None
    _supervisor_token: str = ""
    started_at: float = 0.0

    @property
    def credentials(self) -> CredentialStore:
        return CredentialStore(self.paths.creds_dir)

    def start(self) -> None:
        """Broker, then apps; raises PlatformRunning or ManifestError before starting anything."""
        self._refuse_second_platform()
        manifests = load_manifests(self.apps_dir)
        self.paths.prepare()
        self.credentials.ensure()
        self.credentials.revoke_all()
        self.apps = {app_id: AppRecord(m) for app_id, m in manifests.items()}
        self.started_at = self.clock()
        self._start_broker()
        self._supervisor_token = self.credentials.mint(P.SUPERVISOR_ID)
        self.bus = Bus.connect(
            self.paths.bus_endpoint(), P.SUPERVISOR_ID, self._supervisor_token, timeout=15.0
        )
        for record in self.apps.values():
            if not record.manifest.external:
                self._launch(record)
        self._write_state()
        event(log, "platform-started", apps=len(self.apps), home=str(self.paths.home))

    def run(self, should_stop: Callable[[], bool], tick: float = 0.2) -> None:
        """Watch children until `should_stop()`; then stop everything."""
        next_state = 0.0
        while not should_stop():
            self.poll()
            now = time.monotonic()
            if now >= next_state:
                self._write_state()
                next_state = now + 1.0
            time.sleep(tick)

    def poll(self) -> None:
        """Notice exited children: restart a dead broker, record app exits."""
        if self.broker is not None and self.broker.poll() is not None:
            event(log, "broker-exited", logging.ERROR, status=self.broker.poll())
            self.broker_restarts += 1
            self._start_broker()
        for record in self.apps.values():
            child = record.child
            if child is None or record.state != "RUNNING":
                continue
            status = child.poll()
            if status is not None:
                record.state = "EXITED"
                record.exit_status = status
                self._revoke(record)
                event(log, "app-exited", app=record.manifest.app_id, pid=child.pid, status=status)

    def stop(self) -> None:
        """Stop apps (SIGTERM, then SIGKILL after the grace period), then the broker."""
        running = [r for r in self.apps.values() if r.child and r.child.poll() is None]
        for record in running:
            assert record.child is not None
            record.state = "STOPPING"
            self.spawner.signal_group(record.child, signal.SIGTERM)
        for record in running:
            assert record.child is not None
            record.exit_status = self.spawner.stop(record.child, self.config.stop_grace_s)
            record.state = "STOPPED"
            self._revoke(record)
        if self.bus is not None:
            self.bus.close()
        if self.broker is not None:
            self.spawner.stop(self.broker, self.config.stop_grace_s)
        self.credentials.revoke_all()
        self.paths.state_file.unlink(missing_ok=True)
        event(log, "platform-stopped")

    # -- internals --------------------------------------------------------------------------

    def _refuse_second_platform(self) -> None:
        state = self.paths.read_state()
        pid = state.get("pid") if state else None
        if isinstance(pid, int) and pid != os.getpid() and psutil.pid_exists(pid):
            raise PlatformRunning(
                f"a platform (pid {pid}) already runs with home {self.paths.home}; "
                "stop it or pass another --home"
            )

    def _start_broker(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "broker",
            "--home",
            str(self.paths.home),
            "--apps",
            str(self.apps_dir),
            *broker_arguments(self.config),
        ]
        self.broker = self.spawner.spawn("broker", argv, os.environ)
        event(log, "broker-launched", pid=self.broker.pid)

    def _launch(self, record: AppRecord) -> None:
        manifest = record.manifest
        token = self.credentials.mint(manifest.app_id)
        fd = credential_pipe(token)
        try:
            env = app_environment(manifest, self.paths, self.paths.bus_endpoint(), fd)
            record.child = self.spawner.spawn(manifest.app_id, app_argv(manifest), env, [fd])
        except OSError as exc:
            self.credentials.revoke(manifest.app_id, token)
            record.state = "FATAL"
            event(log, "app-launch-failed", logging.ERROR, app=manifest.app_id, error=str(exc))
            return
        finally:
            os.close(fd)
        record.token = token
        record.state = "RUNNING"
        record.started_at = self.clock()
        event(log, "app-launched", app=manifest.app_id, pid=record.child.pid)
        if self.bus is not None:
            self.bus.publish(
                "$sys.apps.launched", {"app": manifest.app_id, "pid": record.child.pid}
            )

    def _revoke(self, record: AppRecord) -> None:
        if record.token is not None:
            self.credentials.revoke(record.manifest.app_id, record.token)
            record.token = None

    def _write_state(self) -> None:
        self.paths.write_state(
            {
                "pid": os.getpid(),
                "home": str(self.paths.home),
                "endpoint": self.paths.bus_endpoint(),
                "apps_dir": str(self.apps_dir),
                "started_at": self.started_at,
                "persistence": self.config.persistence,
                "broker": {
                    "pid": self.broker.pid if self.broker else None,
                    "restarts": self.broker_restarts,
                },
                "apps": {app_id: r.as_dict() for app_id, r in self.apps.items()},
            }
        )
