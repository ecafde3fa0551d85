"""`plexus logs APP [--lines N] [--follow] [--json]`: an app's stdout and stderr, from its files.

The supervisor writes every launched app's output to `HOME/logs/APP.log` (rotated by size;
format in `supervisor.log_files`). This command only reads those files, so it works with
the platform running or stopped. `--follow` keeps printing lines as they are written,
across rotations, until Ctrl-C (exit 130, after every line read so far was printed).
An app with neither a log file nor a manifest in the running platform is unknown: exit 5,
naming the apps that have logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from broker.manifests import APP_ID, ManifestError, load_manifests
from broker.paths import PlatformPaths
from plexus import exits
from plexus.common import fail, home_option
from plexus.interrupts import interrupt_flag
from plexus.log_tail import LogFollower
from supervisor.log_files import parse, rotated
from supervisor.platform_state import platform_alive

POLL_S = 0.2
"""How often `--follow` looks for new lines."""
_NAMED = 20
"""At most this many apps are named in the unknown-app message."""


def _has_log(paths: PlatformPaths, app_id: str) -> bool:
    return any(path.exists() for path in rotated(paths.app_log(app_id), 2))


def _has_manifest(paths: PlatformPaths, app_id: str) -> bool:
    """Whether the running platform (if one runs with this home) has an app `app_id`."""
    state = paths.read_state()
    if state is None or not platform_alive(state):
        return False
    try:
        return app_id in load_manifests(Path(state["apps_dir"]))
    except (ManifestError, KeyError, TypeError, OSError):
        return False


def _apps_with_logs(paths: PlatformPaths) -> list[str]:
    try:
        return sorted(path.name.removesuffix(".log") for path in paths.log_dir.glob("*.log"))
    except OSError:
        return []


def _unknown(paths: PlatformPaths, app_id: str) -> str:
    apps = _apps_with_logs(paths)
    if not apps:
        known = "no app has logs there yet"
    else:
        named = ", ".join(apps[:_NAMED])
        more = f" and {len(apps) - _NAMED} more" if len(apps) > _NAMED else ""
        known = f"apps with logs: {named}{more}"
    return f"no logs of app {app_id!r} in {paths.log_dir} and no such app running; {known}"


def _print(app_id: str, raw: bytes, as_json: bool) -> None:
    if as_json:
        moment, text = parse(raw)
        click.echo(json.dumps({"app": app_id, "ts": moment, "line": text}))
    else:
        click.echo(raw.decode("utf-8", "replace"))


@click.command()
@home_option
@click.argument("app_id")
@click.option(
    "--lines",
    "-n",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="The last N lines (then, with --follow, every new one).",
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@click.option(
    "--json", "as_json", is_flag=True, help='One JSON object a line: {"app", "ts", "line"}.'
)
def logs(home: Path | None, app_id: str, lines: int, follow: bool, as_json: bool) -> None:
    """Print the last lines of APP_ID's stdout and stderr (HOME/logs/APP_ID.log)."""
    paths = PlatformPaths.resolve(home)
    if not APP_ID.fullmatch(app_id) or not (
        _has_log(paths, app_id) or _has_manifest(paths, app_id)
    ):
        fail(_unknown(paths, app_id), exits.AUTH)
    if not _has_log(paths, app_id):
        click.echo(f"plexus: {app_id} has no log yet ({paths.app_log(app_id)})", err=True)
    follower = LogFollower(paths.app_log(app_id))
    try:
        for raw in follower.backlog(lines):
            _print(app_id, raw, as_json)
        if not follow:
            return
        with interrupt_flag() as interrupted:
            while not interrupted.is_set():
                new = follower.poll()
                for raw in new:
                    _print(app_id, raw, as_json)
                if not new:
                    interrupted.wait(POLL_S)
    finally:
        follower.close()
    sys.exit(exits.INTERRUPTED)  # every line read was printed; the rest is in the file
