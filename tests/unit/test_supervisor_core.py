"""The supervisor's decisions through its OS seam, without processes or sleeps: `after`
ordering, a crash seen on the next poll, and timers that ignore the wall clock."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.manifests import load_manifests
from broker.paths import PlatformPaths
from supervisor.config import PlatformConfig
from supervisor.lifecycle import Input, Lifecycle, State
from supervisor.spawner import Child, Spawner
from supervisor.supervisor import AppRecord, Supervisor


class FakeProcess:
    """Stands where subprocess.Popen stands: a pid and an exit status the test sets."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    def poll(self) -> int | None:
        return self.status


class RecordingSpawner(Spawner):
    """The OS seam, recording spawns and signals instead of doing them."""

    def __init__(self) -> None:
        self.spawned: list[str] = []
        self.captured: list[bool] = []
        """Whether each spawn asked for the child's output."""
        self.with_pipes = False
        """Give a child that captures its output a real pipe (else it has no output)."""
        self.pipes: dict[str, int] = {}
        """The write end of each child's output pipe: the test writes what the app would."""
        self.signals: list[tuple[str, int]] = []
        self.processes: dict[str, FakeProcess] = {}
        self.stopped: set[str] = set()
        """Apps whose process is stopped (SIGSTOP), as psutil would report it."""

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
        capture_output: bool = False,
    ) -> Child:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(name)
        self.captured.append(capture_output)
        self.processes[name] = process
        output = None
        if capture_output and self.with_pipes:
            output, self.pipes[name] = os.pipe()
        return Child(name, process, output)  # type: ignore[arg-type]

    def signal_group(self, child: Child, signum: int) -> None:
        self.signals.append((child.name, signum))

    def is_stopped(self, child: Child) -> bool:
        return child.name in self.stopped


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    tmp_path: Path, manifests: dict[str, str], wall: Clock | None = None
) -> tuple[Supervisor, RecordingSpawner, Clock]:
    """A supervisor on a fake OS; its monotonic clock is returned, `wall` its wall clock."""
    apps = tmp_path / "apps"
    apps.mkdir(parents=True)
    for app_id, body in manifests.items():
        (apps / f"{app_id}.toml").write_text(f'id = "{app_id}"\ncommand = ["true"]\n{body}')
    spawner, clock = RecordingSpawner(), Clock()
    paths = PlatformPaths.resolve(tmp_path / "h")
    paths.prepare()
    config = PlatformConfig(settle_s=1.0, restart_budget=3, restart_window_s=60.0)
    supervisor = Supervisor(paths, apps, config, spawner, clock, wall or Clock(1.7e9))
    supervisor.apps = {
        a: AppRecord(m, Lifecycle(supervisor._policy(m))) for a, m in load_manifests(apps).items()
    }
    return supervisor, spawner, clock


def state(supervisor: Supervisor, app: str) -> State:
    return supervisor.apps[app].life.state


def test_after_waits_for_its_dependency_to_run(tmp_path: Path) -> None:
    supervisor, spawner, clock = make(
        tmp_path, {"db": "", "api": 'after = ["db"]\n', "ui": 'after = ["api"]\n'}
    )
    supervisor.poll()
    assert spawner.spawned == ["db"]
    assert state(supervisor, "api") is State.STOPPED
    clock.now += 1.0  # db settles
    supervisor.poll()
    assert spawner.spawned == ["db", "api"]
    clock.now += 1.0
    supervisor.poll()
    assert spawner.spawned == ["db", "api", "ui"]


def test_a_crash_is_seen_on_the_next_poll_and_restarted_after_backoff(tmp_path: Path) -> None:
    supervisor, spawner, clock = make(tmp_path, {"app": ""})
    supervisor.poll()
    clock.now += 1.0
    supervisor.poll()
    assert state(supervisor, "app") is State.RUNNING
    spawner.processes["app"].status = 1
    supervisor.poll()
    assert state(supervisor, "app") is State.BACKOFF
    record: Any = supervisor.apps["app"]
    assert record.life.last_reason == "exit 1"
    clock.now = record.life.due_at
    supervisor.poll()
    assert spawner.spawned == ["app", "app"]


def _decisions(tmp_path: Path, jump: float) -> list[tuple[Any, ...]]:
    """Crash an app until its restart budget is spent, then stop another one, jumping the
    wall clock by `jump` seconds (and back) between steps; what the supervisor decided."""
    wall = Clock(1.7e9)
    supervisor, spawner, clock = make(tmp_path, {"app": "", "other": ""}, wall)
    trace: list[tuple[Any, ...]] = []

    def step(advance: float) -> None:
        clock.now += advance
        wall.now += advance + (jump if len(trace) % 2 == 0 else -jump)
        supervisor.poll()
        life = supervisor.apps["app"].life
        trace.append(
            (
                life.state,
                len(spawner.spawned),
                round(life.due_at - clock.now, 6) if life.state is State.BACKOFF else None,
                len(spawner.signals),
            )
        )

    step(0.0)
    step(1.0)  # settled: RUNNING
    for _ in range(4):  # three restarts fit the budget, the fourth crash is FATAL
        spawner.processes["app"].status = 1
        step(0.0)
        delay = supervisor.apps["app"].life.due_at - clock.now
        step(delay - 0.01)  # not yet due
        step(0.01)  # due: spawned again
        step(1.0)
    supervisor._command({"op": "stop", "app": "other"}, clock.now)
    step(supervisor.config.stop_grace_s - 0.01)  # SIGTERM sent, no SIGKILL yet
    step(0.01)  # grace over: SIGKILL
    listed = supervisor._command({"op": "list"}, clock.now)["apps"]["other"]
    trace.append((listed["state"], listed["restarts"]))
    return trace


def test_a_wall_clock_jump_changes_no_restart_or_backoff_decision(tmp_path: Path) -> None:
    steady = _decisions(tmp_path / "steady", 0.0)
    assert [t[0] for t in steady[-4:-1]].count(State.FATAL) == 3  # the budget was spent
    assert steady[-2][3] == steady[-3][3] + 1  # SIGKILL after the grace, on the monotonic clock
    for jump in (3600.0, -3600.0):
        assert _decisions(tmp_path / f"jump{jump:+.0f}", jump) == steady


def test_the_wall_clock_only_stamps(tmp_path: Path) -> None:
    wall = Clock(1.7e9)
    supervisor, _spawner, clock = make(tmp_path, {"app": ""}, wall)
    supervisor.poll()
    clock.now += 2.0
    wall.now += 2.0 + 3600.0  # the wall clock jumped an hour meanwhile
    supervisor.poll()
    listed = supervisor._command({"op": "list"}, clock.now)["apps"]["app"]
    assert listed["uptime_s"] == 2.0  # measured on the monotonic clock
    assert listed["started_at"] == wall.now - 2.0  # shown in wall time


def test_each_exit_carries_its_own_reason(tmp_path: Path) -> None:
    """A hang kill's reason is that attempt's; a later operator stop logs its own."""
    supervisor, spawner, clock = make(tmp_path, {"app": ""})
    announced: list[tuple[str, dict[str, Any]]] = []
    supervisor._announce = lambda kind, record, **fields: announced.append((kind, fields))  # type: ignore[method-assign]
    supervisor.poll()
    clock.now += 1.0
    supervisor.poll()
    record = supervisor.apps["app"]
    reason = "unresponsive: silent for 10002 ms"
    supervisor._act(record, record.life.handle(Input.KILL, clock.now, reason=reason), clock.now)
    spawner.processes["app"].status = -15
    supervisor.poll()
    assert [f["reason"] for k, f in announced if k == "exit"] == [reason]
    clock.now = record.life.due_at
    supervisor.poll()  # restarted
    clock.now += 1.0
    supervisor.poll()
    assert spawner.spawned == ["app", "app"] and state(supervisor, "app") is State.RUNNING
    assert supervisor._command({"op": "stop", "app": "app"}, clock.now)["ok"]
    spawner.processes["app"].status = 0
    supervisor.poll()
    assert state(supervisor, "app") is State.STOPPED
    exits = [f["reason"] for k, f in announced if k == "exit"]
    assert exits == [reason, "operator stop (exit 0)"]
    assert "unresponsive" not in record.life.last_reason
    # a plain exit after a stop-and-start has no reason but its status
    assert supervisor._command({"op": "start", "app": "app"}, clock.now)["ok"]
    spawner.processes["app"].status = 0
    supervisor.poll()
    assert record.life.last_reason == "exit 0"


def _running(tmp_path: Path) -> tuple[Supervisor, RecordingSpawner, Clock, AppRecord]:
    supervisor, spawner, clock = make(tmp_path, {"app": ""})
    supervisor.poll()
    clock.now += 1.0
    supervisor.poll()
    assert state(supervisor, "app") is State.RUNNING
    return supervisor, spawner, clock, supervisor.apps["app"]


def test_a_stopped_hung_app_is_sigkilled_at_once(tmp_path: Path) -> None:
    supervisor, spawner, clock, record = _running(tmp_path)
    spawner.stopped.add("app")
    reason = "unresponsive: silent for 10002 ms"
    supervisor._act(record, record.life.handle(Input.KILL, clock.now, reason=reason), clock.now)
    assert spawner.signals == [("app", signal.SIGKILL)]  # no SIGTERM grace on a stopped process
    spawner.processes["app"].status = -signal.SIGKILL
    supervisor.poll()
    assert state(supervisor, "app") is State.BACKOFF
    assert record.life.last_reason == reason
    clock.now = record.life.due_at
    supervisor.poll()
    assert spawner.spawned == ["app", "app"]


def test_a_running_hung_app_gets_sigterm_with_sigcont_then_sigkill(tmp_path: Path) -> None:
    supervisor, spawner, clock, record = _running(tmp_path)
    supervisor._act(record, record.life.handle(Input.KILL, clock.now, reason="hung"), clock.now)
    assert spawner.signals == [("app", signal.SIGTERM), ("app", signal.SIGCONT)]
    clock.now += supervisor.config.stop_grace_s
    supervisor.poll()
    assert spawner.signals[-1] == ("app", signal.SIGKILL)


def test_an_operator_stop_of_a_stopped_app_continues_it_to_handle_sigterm(
    tmp_path: Path,
) -> None:
    supervisor, spawner, clock, _record = _running(tmp_path)
    spawner.stopped.add("app")
    assert supervisor._command({"op": "stop", "app": "app"}, clock.now)["ok"]
    assert spawner.signals == [("app", signal.SIGTERM), ("app", signal.SIGCONT)]


def test_a_crash_is_announced_after_the_last_output_is_in_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The traceback of a failed attempt is in HOME/logs/APP.log, and was shown on the
    terminal named by the app, by the time the crash is announced."""
    supervisor, spawner, _clock = make(tmp_path, {"app": ""})
    spawner.with_pipes = True
    log = supervisor.paths.app_log("app")
    at_announce: dict[str, str] = {}
    announce = supervisor._announce

    def recording(kind: str, record: AppRecord, **fields: Any) -> None:
        at_announce[kind] = log.read_text() if log.exists() else ""
        announce(kind, record, **fields)

    supervisor._announce = recording  # type: ignore[method-assign]
    supervisor.poll()
    assert spawner.captured == [True]
    os.write(spawner.pipes["app"], b"working\nTraceback (most recent call last):\n")
    os.write(spawner.pipes["app"], b"ValueError: boom\n")
    os.close(spawner.pipes["app"])
    spawner.processes["app"].status = 1
    supervisor.poll()
    assert state(supervisor, "app") is State.BACKOFF
    assert at_announce["crash"].splitlines()[-1].endswith(" ValueError: boom")
    assert "app | Traceback (most recent call last):\napp | ValueError: boom\n" in (
        capsys.readouterr().err
    )
    assert supervisor.output is not None
    supervisor.output.stop()
