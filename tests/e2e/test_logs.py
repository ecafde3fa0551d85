"""Per-app logs with a real platform: an app that talks and then crashes with a traceback
leaves it all in HOME/logs/APP.log, the supervisor's terminal shows it named by the app
(before the crash is announced), and `plexus logs` prints the last lines and follows."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from broker.paths import PlatformPaths
from tests.conftest import REPO, plexus_cli, stop_process, wait_for, write_manifest


@dataclass
class Talking:
    home: Path
    trigger: Path
    terminal: Path
    """What `plexus run` printed (stdout and stderr)."""

    @property
    def log(self) -> Path:
        return PlatformPaths.resolve(self.home).app_log("talker")


@pytest.fixture
def talking() -> Iterator[Talking]:
    with tempfile.TemporaryDirectory(prefix="px-logs-", dir="/tmp") as name:
        root = Path(name)
        apps = root / "apps"
        apps.mkdir()
        trigger = root / "trigger"
        write_manifest(
            apps,
            "talker",
            'command = ["python", "-m", "tests.e2e.apps.talker"]\nrestart = "never"\n'
            f'[env]\nTRIGGER = "{trigger}"\n',
        )
        terminal = root / "terminal.txt"
        with terminal.open("w") as out:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "plexus", "run", "--home", str(root / "home")),
                    *("--apps", str(apps), "--no-persistence"),
                ],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                yield Talking(root / "home", trigger, terminal)
            finally:
                stop_process(process, 15)


class Lines:
    """The lines a child prints, read by a thread, so every wait for one is bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def until(self, text: str, timeout: float = 20.0) -> list[str]:
        def found() -> bool:
            while not self._queue.empty():
                self.seen.append(self._queue.get())
            return any(text in line for line in self.seen)

        wait_for(found, timeout)
        return self.seen


def _texts(lines: list[str]) -> list[str]:
    """The app's text of each log line (after its time stamp and one space)."""
    return [line.split(" ", 1)[1] if " " in line else "" for line in lines]


def test_an_apps_output_and_traceback_in_its_log_the_terminal_and_plexus_logs(
    talking: Talking,
) -> None:
    wait_for(
        lambda: talking.log.exists() and "waiting for the trigger" in talking.log.read_text(), 30
    )
    home = str(talking.home)
    follow = subprocess.Popen(
        [sys.executable, "-m", "plexus", "logs", "talker", "--home", home, "--follow", "-n", "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        printed = Lines(follow.stdout)
        assert _texts(printed.until("waiting for the trigger")) == ["waiting for the trigger"]
        talking.trigger.touch()  # the app says one line more and crashes
        printed.until("ValueError: boom on purpose")
        texts = _texts(printed.seen)
        assert texts[:3] == [
            "waiting for the trigger",
            "the trigger came",
            "Traceback (most recent call last):",
        ]
        follow.send_signal(signal.SIGINT)
        assert follow.wait(10) == 130
    finally:
        stop_process(follow)

    log_texts = _texts(talking.log.read_text().splitlines())
    assert log_texts[:3] == [
        "hello from talker",
        "an error line, on stderr",
        "waiting for the trigger",
    ]
    assert log_texts[-1] == "ValueError: boom on purpose"
    assert log_texts.count("Traceback (most recent call last):") == 1
    stamped = talking.log.read_text().splitlines()[0].split(" ", 1)[0]
    assert len(stamped) == 24 and stamped.endswith("Z") and stamped[10] == "T"

    last = plexus_cli("logs", "talker", "--home", home, "--lines", "3")
    assert last.returncode == 0, last.stderr
    assert _texts(last.stdout.splitlines()) == log_texts[-3:]
    as_json = plexus_cli("logs", "talker", "--home", home, "--lines", "2", "--json")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["line"] for r in records] == log_texts[-2:]
    assert all(r["app"] == "talker" and isinstance(r["ts"], float) for r in records)

    def crash_announced() -> str | None:
        text = talking.terminal.read_text()
        return text if '"app-crash"' in text else None

    terminal = wait_for(crash_announced, 20)
    assert "talker | hello from talker" in terminal
    assert "talker | an error line, on stderr" in terminal
    assert terminal.count("talker | Traceback (most recent call last):") == 1
    traceback_end = terminal.index("talker | ValueError: boom on purpose")
    assert traceback_end < terminal.index('"app-crash"')  # the why before the what

    unknown = plexus_cli("logs", "nobody", "--home", home)
    assert unknown.returncode == 5
    assert "nobody" in unknown.stderr and "apps with logs: talker" in unknown.stderr
