"""Manifests and directories as input, through the real `plexus` command (issue 12, threat 10).

A manifest says what runs as the user and what it may do on the bus, so `plexus run` checks
it all at load and refuses with exit 6 (bad input) and one line naming the file and the
field, never a traceback: `[env]` names and values the OS cannot take (an `=` in a name
once crashed `plexus run` with a ValueError when it launched the app), `command` argv,
limits out of range; an apps directory or manifest another user could have written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import plexus_cli, write_manifest

pytestmark = pytest.mark.timeout(180)

APP = 'command = ["python3", "-c", "import time; time.sleep(60)"]\n'
"""A launched app's manifest, to which each case adds its bad field."""


@pytest.fixture
def root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="px-cfg-", dir="/tmp") as name:
        path = Path(name)
        (path / "apps").mkdir(mode=0o755)
        yield path


def run_refused(root: Path, apps: Path | None = None) -> str:
    """`plexus run` on `root`'s home and apps: it must refuse at once with exit 6; its
    stderr."""
    apps = apps or root / "apps"
    result = plexus_cli("run", "--home", str(root / "home"), "--apps", str(apps), timeout=60)
    assert result.returncode == 6, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('[env]\n"A=B" = "x"\n', "env.A=B"),
        ('[env]\n"A\\u0000B" = "x"\n', "env.'A\\x00B'"),
        ('[env]\nA = "x\\u0000y"\n', "env.A"),
        ("[env]\nA = 1\n", "env.A"),
        ('[env]\n"" = "x"\n', "env"),
        ("[limits]\nmemory_mb = 2000000\n", "limits.memory_mb"),
        ("[limits]\ncpu_percent = 0\n", "limits.cpu_percent"),
    ],
    ids=lambda value: value.split("\n")[-2] if "\n" in value else value,
)
def test_run_refuses_a_manifest_field_naming_the_file_and_the_field(
    root: Path, body: str, field: str
) -> None:
    write_manifest(root / "apps", "worker", APP + body)
    stderr = run_refused(root)
    assert str(root / "apps" / "worker.toml") in stderr and f"field '{field}'" in stderr


def test_run_refuses_a_command_argument_holding_a_nul(root: Path) -> None:
    write_manifest(root / "apps", "worker", 'command = ["python3", "-c", "x\\u0000y"]\n')
    stderr = run_refused(root)
    assert "worker.toml" in stderr and "field 'command[2]'" in stderr and "NUL" in stderr


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o1777])
def test_run_refuses_an_apps_directory_others_may_write(root: Path, mode: int) -> None:
    apps = root / "apps"
    write_manifest(apps, "worker", APP)
    apps.chmod(mode)
    stderr = run_refused(root)
    assert str(apps) in stderr and "may be written by" in stderr and "chmod go-w" in stderr


def test_run_refuses_a_manifest_others_may_write(root: Path) -> None:
    path = write_manifest(root / "apps", "worker", APP)
    path.chmod(0o666)
    stderr = run_refused(root)
    assert str(path) in stderr and "every user" in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_run_refuses_an_apps_directory_of_another_user(root: Path) -> None:
    apps = root / "apps"
    write_manifest(apps, "worker", APP)
    os.chown(apps, 65534, 65534)
    stderr = run_refused(root)
    assert str(apps) in stderr and "belongs to user id 65534" in stderr
