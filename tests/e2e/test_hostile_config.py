"""Manifests and directories as input, through the real `plexus` command (issue 12, threat 10).

A manifest says what runs as the user and what it may do on the bus, so `plexus run` checks
it all at load and refuses with exit 6 (bad input) and one line naming the file and the
field, never a traceback: `[env]` names and values the OS cannot take (an `=` in a name
once crashed `plexus run` with a ValueError when it launched the app), `command` argv,
limits out of range; an apps directory or manifest another user could have written. The
short run dir under the shared temp dir (used when HOME/run is too long for an ipc path) is
used only when it is surely this user's: not a symbolic link, not another user's, not
loosely moded; otherwise `plexus run` and `plexus status` refuse it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.paths import PlatformPaths
from tests.conftest import plexus_cli, running_platform, write_manifest

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


# -- the short run dir under the temp dir ---------------------------------------------------


@pytest.fixture
def long_home(root: Path) -> Iterator[Path]:
    """A home whose HOME/run is too long for ipc, so its run dir is the temp-dir stand-in;
    whatever a test leaves at that stand-in is removed after it."""
    home = root / ("h" * 90)
    paths = PlatformPaths.resolve(home)
    assert paths.run_dir_is_shared and not paths.run_dir.exists()
    yield home
    if paths.run_dir.is_symlink() or paths.run_dir.is_file():
        paths.run_dir.unlink()
    elif paths.run_dir.exists():
        shutil.rmtree(paths.run_dir)


def refused_at(home: Path, apps: Path, why: str) -> None:
    """`plexus run` and `plexus status` both refuse the stand-in, with exit 6, naming it."""
    run_dir = PlatformPaths.resolve(home).run_dir
    for args in (("run", "--apps", str(apps)), ("status",)):
        result = plexus_cli(*args, "--home", str(home), timeout=60)
        assert result.returncode == 6, (args, result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert str(run_dir) in result.stderr and why in result.stderr, result.stderr


def test_a_symlink_at_the_short_run_dir_is_refused_and_not_followed(
    root: Path, long_home: Path
) -> None:
    """Another user's symlink to a directory of ours: nothing is made through it."""
    target = root / "target"
    target.mkdir(mode=0o700)
    PlatformPaths.resolve(long_home).run_dir.symlink_to(target)
    refused_at(long_home, root / "apps", "symbolic link")
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o777])
def test_a_loose_short_run_dir_is_refused(root: Path, long_home: Path, mode: int) -> None:
    run_dir = PlatformPaths.resolve(long_home).run_dir
    run_dir.mkdir()
    run_dir.chmod(mode)
    refused_at(long_home, root / "apps", f"its mode is {mode:o}")
    assert list(run_dir.iterdir()) == []


def test_a_file_at_the_short_run_dir_is_refused(root: Path, long_home: Path) -> None:
    PlatformPaths.resolve(long_home).run_dir.write_text("{}", encoding="utf-8")
    refused_at(long_home, root / "apps", "not a directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_short_run_dir_of_another_user_is_refused(root: Path, long_home: Path) -> None:
    run_dir = PlatformPaths.resolve(long_home).run_dir
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, 65534, 65534)
    refused_at(long_home, root / "apps", "belongs to user id 65534")
    assert list(run_dir.iterdir()) == []


def test_the_short_run_dir_is_made_private_and_the_platform_runs_from_it(
    root: Path, long_home: Path
) -> None:
    write_manifest(root / "apps", "outside", "")  # external: nothing to launch
    with running_platform(long_home, root / "apps"):
        info = PlatformPaths.resolve(long_home).run_dir.lstat()
        assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700
        status = plexus_cli("status", "--home", str(long_home))
        assert status.returncode == 0, status.stderr
