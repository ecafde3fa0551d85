"""A real Plexus platform for the user benchmark, started the way a user starts one.

`python -m plexus run --home H --apps A [--no-persistence] [--config F]` is the supervisor,
which launches the broker and, with persistence on, the persistence service, exactly as on
a desktop; nothing is tuned for the benchmark (the config file is the user's, if any). It
runs under coreutils `timeout` and gets SIGTERM when the harness dies
(`procutil.spawn_bounded`); the supervisor's own children die with it (PR_SET_PDEATHSIG).

Every bench app has its own manifest in a temp apps dir (an external app: no `command`),
allowed its own topic only, and connects with a credential the supervisor issued for it
(what `plexus env APP` asks for), so the broker checks what it checks for any app. The
harness asks for them as the operator, all on one operator Bus (perf.credentials), before
it spawns the workers, and hands each worker its apps' credentials in its WorkerSpec.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from broker.paths import PlatformPaths
from clients.bus import Bus
from perf import procutil
from perf.credentials import ISSUE_S_PER_APP, issue, operator_bus
from perf.model import LatencySummary, Phase, Role, topic_for
from perf.systems import BrokerHandle

CONFIRM_APP = "bench-confirm"
STARTED_EVENT = b'"platform-started"'
START_TIMEOUT_S = 60.0


def pub_app(pair: int) -> str:
    """App id of publisher `pair` (one manifest per app, as users have)."""
    return f"bench-pub-{pair}"


def sub_app(pair: int) -> str:
    """App id of subscriber `pair`."""
    return f"bench-sub-{pair}"


def write_manifests(apps: Path, n_pairs: int) -> None:
    """One manifest per bench app, each allowed exactly its pair's topic; plus the
    confirm benchmark's single publisher, allowed every bench topic."""
    apps.mkdir(parents=True, exist_ok=True)
    for pair in range(n_pairs):
        topic = topic_for(pair)
        pub, sub = pub_app(pair), sub_app(pair)
        (apps / f"{pub}.toml").write_text(f'id = "{pub}"\n[permissions]\npublish = ["{topic}"]\n')
        (apps / f"{sub}.toml").write_text(f'id = "{sub}"\n[permissions]\nsubscribe = ["{topic}"]\n')
    (apps / f"{CONFIRM_APP}.toml").write_text(
        f'id = "{CONFIRM_APP}"\n[permissions]\npublish = ["bench.>"]\nsubscribe = ["bench.>"]\n'
    )


def connect(endpoint: str, app_id: str, token: str, session: str = "main") -> Bus:
    """`Bus.connect` as app `app_id` with the credential `token` (`Platform.issue`)."""
    return Bus.connect(endpoint, app_id, token, timeout=30.0, session=session)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = procutil.child_pids(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += procutil.child_pids(child)
    return found


class Platform(BrokerHandle):
    """`plexus run` on a fresh home; its CPU is the supervisor's, broker's and services'
    (`pids`), also split by process (`cpu_groups`).

    An operator `Bus` (`$cli`) asks the supervisor for the bench apps' credentials
    (`issue`, `credentials`); with `stats=True` it stays and reads the broker's routing
    latency at each measurement window edge, so a table can tell broker time from client
    time (without, one is opened for each `issue` and closed again).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool,
        n_pairs: int,
        max_seconds: float,
        config: Path | None = None,
        stats: bool = True,
    ) -> None:
        home, apps = workdir / "home", workdir / "apps"
        write_manifests(apps, n_pairs)
        argv = [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps)]
        if not persistence:
            argv.append("--no-persistence")
        if config is not None:
            argv += ["--config", str(config)]
        self.log = workdir / "plexus-run.log"
        self.paths = PlatformPaths.resolve(home)
        self.endpoint = self.paths.bus_endpoint()
        # the bench apps' credentials are issued after the start, one per supervisor tick
        bound = max_seconds + ISSUE_S_PER_APP * 2 * n_pairs
        self._proc = procutil.spawn_bounded(argv, bound, self.log)
        self._operator: Bus | None = None
        self._latency: dict[str, LatencySummary] = {}
        try:
            self._wait_started()
            if stats:
                self._operator = self._operator_bus()
        except BaseException:
            self.stop()
            raise
        self._pids = _descendants(self._proc.pid)

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"plexus run exited with {self._proc.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                if STARTED_EVENT in self.log.read_bytes():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"plexus run not started after {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def _operator_bus(self) -> Bus:
        return operator_bus(self.paths, f"perf-{time.monotonic_ns()}")

    def issue(self, app_ids: Sequence[str]) -> dict[str, str]:
        """App id -> a credential the supervisor issued for it (each app external), asked
        on the operator Bus (one opened for the purpose when `stats` is off)."""
        if self._operator is not None:
            return issue(self._operator, app_ids)
        with self._operator_bus() as operator:
            return issue(operator, app_ids)

    def credentials(self, role: Role, pairs: tuple[int, ...]) -> tuple[str, ...]:
        """The credentials of one worker's apps: bench-pub-<pair> or bench-sub-<pair>."""
        app_ids = [pub_app(p) if role == "pub" else sub_app(p) for p in pairs]
        tokens = self.issue(app_ids)
        return tuple(tokens[a] for a in app_ids)

    def log_tail(self, lines: int = 5) -> str:
        """The last lines the platform printed (for error messages)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def pids(self) -> list[int]:
        return self._pids

    def cpu_groups(self) -> dict[str, list[int]]:
        """The platform's processes by what they run: "broker", "persistence" and "plexus"
        (the supervisor)."""
        groups: dict[str, list[int]] = {}
        for pid in self._pids:
            name = procutil.module_of(pid)
            if name is not None:
                groups.setdefault(name, []).append(pid)
        return groups

    def on_window(self, phase: Phase, edge: Literal["start", "end"]) -> None:
        if self._operator is None:
            return
        stats = self._operator.broker_stats(timeout=10.0, reset_latency=edge == "start")
        summary = LatencySummary.from_stats(stats)
        if edge == "end" and summary is not None:
            self._latency[phase.name] = summary

    def routing_latency(self, phases: Sequence[Phase]) -> dict[str, LatencySummary]:
        return {p.name: self._latency[p.name] for p in phases if p.name in self._latency}

    def stop(self) -> None:
        if self._operator is not None:
            with contextlib.suppress(Exception):
                self._operator.close(0.5)
            self._operator = None
        procutil.stop_process(self._proc, grace_s=15.0)


class PlatformWithBus:
    """`plexus run` and one `Bus` connected as app bench-confirm: the Plexus side of the
    single-publisher sections (confirms, publish calls), which start it once and time
    the bus in this process."""

    def __init__(self, workdir: Path, persistence: bool, max_seconds: float) -> None:
        self.platform = Platform(
            workdir, persistence=persistence, n_pairs=0, max_seconds=max_seconds, stats=False
        )
        try:
            token = self.platform.issue([CONFIRM_APP])[CONFIRM_APP]
            self.bus = connect(self.platform.endpoint, CONFIRM_APP, token)
        except BaseException:
            self.platform.stop()
            raise

    def close(self) -> None:
        """Close the bus, then stop the platform (stopped even when the close fails)."""
        try:
            self.bus.close(1.0)
        finally:
            self.platform.stop()
