"""perf.user.rounds: systems started once, rounds rotated, failures recorded, all closed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from perf.user.rounds import interleaved


class _Fake:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(f"close {self.name}")


def test_rounds_rotate_record_a_failed_start_and_close_every_started_system() -> None:
    log: list[str] = []
    lines: list[str] = []

    def factory(name: str) -> Callable[[Path], _Fake]:
        def start(workdir: Path) -> _Fake:
            assert workdir.is_dir() and workdir.name == name
            if name == "broken":
                raise RuntimeError("no binary")
            return _Fake(name, log)

        return start

    systems = ["a", "broken", "b"]
    runs = interleaved(
        "test",
        systems,
        {name: factory(name) for name in systems},
        warm_up=lambda target: log.append(f"warm {target.name}"),
        measure=lambda target, rep: (target.name, rep, "ok"),
        failed=lambda name, rep, error: (name, rep, error),
        describe=lambda run: run[2],
        repeat=2,
        progress=lines.append,
    )
    assert runs == [
        ("broken", 0, "start: no binary"),
        ("broken", 1, "start: no binary"),
        ("a", 0, "ok"),
        ("b", 0, "ok"),
        ("b", 1, "ok"),  # the second round starts with the next system
        ("a", 1, "ok"),
    ]
    assert log == ["warm a", "warm b", "close a", "close b"]
    assert lines[0] == "test: broken did not start: RuntimeError: no binary"
