"""The supervisor's decisions through its OS seam, without processes or sleeps: `after`
ordering and a crash seen on the next poll."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from broker.manifests import load_manifests
from broker.paths import PlatformPaths
from supervisor.config import PlatformConfig
from supervisor.lifecycle import Lifecycle, State
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
        self.signals: list[tuple[str, int]] = []
        self.processes: dict[str, FakeProcess] = {}

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        pass_fds: Sequence[int] = (),
        cwd: str | None = None,
    ) -> Child:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(name)
        self.processes[name] = process
        return Child(name, process)  # type: ignore[arg-type]

    def signal_group(self, child: Child, signum: int) -> None:
        self.signals.append((child.name, signum))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, manifests: dict[str, str]) -> tuple[Supervisor, RecordingSpawner, Clock]:
    apps = tmp_path / "apps"
    apps.mkdir()
    for app_id, body in manifests.items():
        (apps / f"{app_id}.toml").write_text(f'id = "{app_id}"\ncommand = ["true"]\n{body}')
    spawner, clock = RecordingSpawner(), Clock()
    paths = PlatformPaths.resolve(tmp_path / "h")
    paths.prepare()
    supervisor = Supervisor(paths, apps, PlatformConfig(settle_s=1.0), spawner, clock)
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
