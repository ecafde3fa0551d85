"""The README's runnable examples, run as written against a real `plexus run`.

A code block preceded by an HTML comment `<!-- runnable ... -->` is part of the tour a new
user follows; this test runs each one, in order, in a shell (or Python) whose environment
is what the README tells the user to have: the project's virtual environment on PATH and
`PLEXUS_HOME` naming the running platform (with the demo apps). A Python block whose
marker says "as the console app" runs after `eval "$(plexus env console)"`. Each must
exit 0, so the README cannot drift from the product.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROCESS_START_S, REPO, plexus_cli, stop_process, wait_for

_BLOCK = re.compile(r"<!-- runnable(?P<note>[^>]*)-->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)


@dataclass(frozen=True, slots=True)
class Example:
    line: int
    lang: str
    body: str
    as_console: bool


def runnable_examples(text: str) -> list[Example]:
    """Every marked block of `text`, in order, with its line number."""
    return [
        Example(
            text.count("\n", 0, match.start()) + 1,
            match["lang"],
            match["body"],
            "console" in match["note"],
        )
        for match in _BLOCK.finditer(text)
    ]


def test_the_readme_marks_its_tour_as_runnable() -> None:
    examples = runnable_examples((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(examples) >= 3
    assert {e.lang for e in examples} <= {"sh", "python"}


@pytest.fixture(scope="module")
def platform_home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="px-readme-", dir="/tmp") as name:
        home = Path(name) / "home"
        log = (Path(name) / "run.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "plexus", "run", "--home", str(home)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(
                lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S
            )
            yield home
        finally:
            process.send_signal(signal.SIGTERM)
            stop_process(process)
            log.close()


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEXUS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PLEXUS_HOME"] = str(home)
    return env


def _script(example: Example) -> list[str]:
    if example.lang == "sh":
        return ["bash", "-euo", "pipefail", "-c", example.body]
    body = example.body
    if example.as_console:
        quoted = body.replace("'", "'\"'\"'")
        return [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            f"eval \"$(plexus env console)\"\npython -c '{quoted}'",
        ]
    return [sys.executable, "-c", body]


@pytest.mark.timeout(300)
def test_every_runnable_readme_block_runs_as_written(platform_home: Path) -> None:
    examples = runnable_examples((REPO / "README.md").read_text(encoding="utf-8"))
    for example in examples:
        result = subprocess.run(
            _script(example),
            check=False,
            cwd=REPO,
            env=_environment(platform_home),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (
            f"README.md block at line {example.line} failed (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    # the tour's clean exits leave nothing behind: the DLQ is for failed messages only
    listed = plexus_cli("dlq", "list", "--home", str(platform_home), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
