"""`plexus`: run the platform, look at it, publish and subscribe as the operator.

Errors go to stderr as one line saying what to do, with exit codes from `plexus.exits`;
`--json` prints one JSON document (or one object a line for streams) on stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import click

from broker.logs import configure
from broker.manifests import ManifestError
from broker.paths import PlatformPaths, UnsafeDirectory
from clients.bus import Bus, BusError
from plexus import credential_commands, exits, logs_command
from plexus import dlq_purge as dlq_purge_flow
from plexus.common import (
    exit_code,
    fail,
    home_option,
    message_record,
    operator_bus,
    running_state,
    stale_message,
    supervisor_request,
)
from plexus.interrupts import interrupt_flag
from plexus.keys_commands import keys
from plexus.status import collect_status, render_apps, render_status
from plexus.store_commands import history, replay
from supervisor.config import ConfigError, load_config
from supervisor.platform_state import platform_alive, recorded_pid
from supervisor.supervisor import PlatformRunning, Supervisor

DEMO_APPS = Path(__file__).resolve().parent.parent / "examples" / "apps"


class _Plexus(click.Group):
    """Ctrl-C exits 130 and a closed stdout exits 141 quietly, in every command; a bad
    argument is one line on stderr (exit 2), like every other error."""

    def main(  # type: ignore[override]
        self, args: list[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `plexus` alone: the help text, as usual
            sys.exit(exits.USAGE)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "plexus"
            message = exc.format_message().rstrip(".")
            message = message[:1].lower() + message[1:]
            fail(f"{message} (see `{where} --help`)", exits.USAGE)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.exceptions.Abort:
            fail("aborted: no answer was given", exits.FAILURE)
        except UnsafeDirectory as exc:  # a home or run dir another user owns or could have made
            fail(str(exc), exits.BAD_INPUT)
        sys.exit(result if isinstance(result, int) else exits.OK)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            sys.exit(exits.INTERRUPTED)
        except BrokenPipeError:
            # the reader went away (`| head`): no traceback, no flush error at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(exits.CLOSED_PIPE)


@click.group(cls=_Plexus, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="plexus", prog_name="plexus", message="%(prog)s %(version)s")
def main() -> None:
    """Plexus: a desktop interoperability platform (message bus, supervisor, storage, audit)."""


@main.command()
@home_option
@click.option(
    "--apps",
    "apps_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of app manifests (default: the bundled demo apps).",
)
@click.option("--no-persistence", is_flag=True, help="Write no message data to disk.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Platform config (TOML).",
)
def run(
    home: Path | None, apps_dir: Path | None, no_persistence: bool, config_file: Path | None
) -> None:
    """Start the platform in the foreground; Ctrl-C or SIGTERM stops it cleanly."""
    configure("supervisor")
    try:
        config = load_config(config_file, persistence=False if no_persistence else None)
    except ConfigError as exc:
        fail(str(exc), exits.BAD_INPUT)
    paths = PlatformPaths.resolve(home)
    supervisor = Supervisor(paths, (apps_dir or DEMO_APPS).resolve(), config)
    stop: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.start()
    except ManifestError as exc:
        fail(str(exc), exits.BAD_INPUT)
    except PlatformRunning as exc:
        fail(str(exc), exits.FAILURE)
    except BusError as exc:
        supervisor.stop()
        fail(f"the broker did not come up: {exc}", exits.FAILURE)
    external = sum(1 for r in supervisor.apps.values() if r.manifest.external)
    click.echo(
        f"plexus: platform running (home {paths.home}; apps: {len(supervisor.apps) - external} "
        f"launched, {external} external); Ctrl-C to stop",
        err=True,
    )
    try:
        supervisor.run(lambda: bool(stop))
    finally:
        supervisor.stop()


@main.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def status(home: Path | None, as_json: bool) -> None:
    """Exit 0 and show the platform's state when it runs; exit 3 when it does not."""
    paths = PlatformPaths.resolve(home)
    state = paths.read_state()
    if state is None:
        if as_json:
            click.echo(json.dumps({"running": False, "home": str(paths.home)}))
        fail(
            f"no platform is running with home {paths.home}; start one with `plexus run`",
            exits.NOT_RUNNING,
        )
    if not platform_alive(state):
        if as_json:
            click.echo(json.dumps({"running": False, "stale": True, "home": str(paths.home)}))
        fail(stale_message(paths), exits.NOT_RUNNING)
    with operator_bus(home) as bus:
        report = collect_status(state, bus.broker_stats())
    click.echo(json.dumps(report, indent=2) if as_json else render_status(report))


def _json_value(text: str, what: str) -> Any:
    """`text` as a JSON value; NaN and Infinity are not JSON and are refused."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as exc:
        fail(f"{what} is not valid JSON ({exc}); quote it, e.g. '{{\"px\": 1}}'", exits.BAD_INPUT)


@main.command()
@home_option
@click.argument("topic")
@click.argument("data", required=False)
@click.option(
    "--file",
    "data_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Read DATA (one JSON value) from this file instead.",
)
@click.option("--sensitive", is_flag=True, help="Encrypt the payload at rest in the store.")
@click.option("--to", "to_app", default=None, help="Deliver only to this app id.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def publish(
    home: Path | None,
    topic: str,
    data: str | None,
    data_file: TextIO | None,
    sensitive: bool,
    to_app: str | None,
    as_json: bool,
) -> None:
    """Publish DATA (a JSON value; `-` reads stdin) on TOPIC as the operator; waits for the
    broker's confirm."""
    if (data is None) == (data_file is None):
        fail("give DATA (a JSON value, or - for stdin) or --file F, not both", exits.USAGE)
    if data_file is not None:
        value = _json_value(data_file.read(), f"--file {data_file.name}")
    elif data == "-":
        value = _json_value(sys.stdin.read(), "stdin")
    else:
        value = _json_value(str(data), "DATA")
    with operator_bus(home) as bus:
        msg_id = bus.publish(topic, value, confirm=True, sensitive=sensitive, to=to_app)
    click.echo(json.dumps({"id": msg_id, "topic": topic}) if as_json else msg_id)


@main.command()
@home_option
@click.argument("topic")
@click.argument("data")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the reply (exit 7 when none came).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as one JSON object.")
def request(home: Path | None, topic: str, data: str, timeout: float, as_json: bool) -> None:
    """Send DATA (a JSON value; `-` reads stdin) as a request on TOPIC; print the reply."""
    value = _json_value(sys.stdin.read() if data == "-" else data, "DATA")
    with operator_bus(home) as bus:
        try:
            reply = bus.request(topic, value, timeout=timeout)
        except BusError as exc:
            fail(str(exc), exit_code(exc))
    record = message_record(reply)
    if as_json:
        click.echo(json.dumps(record, default=str))
    else:
        click.echo(json.dumps(record["data"], default=str))


@main.command()
@home_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the platform to stop (exit 7 when it has not).",
)
def stop(home: Path | None, timeout: float) -> None:
    """Stop the platform running with this home (as Ctrl-C in its terminal would)."""
    paths = PlatformPaths.resolve(home)
    state = running_state(paths)
    pid = recorded_pid(state)
    assert pid is not None  # running_state checked it names a live process
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        fail(stale_message(paths), exits.NOT_RUNNING)
    deadline = time.monotonic() + timeout
    while platform_alive(state):
        if time.monotonic() > deadline:
            fail(f"the platform (pid {pid}) has not stopped after {timeout:g} s", exits.TIMEOUT)
        time.sleep(0.05)
    click.echo(f"plexus: platform stopped (pid {pid})", err=True)


@main.command()
@home_option
@click.argument("pattern")
@click.option("--count", type=click.IntRange(min=1), default=None, help="Exit after N messages.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    help="Give up after this many seconds (exit 7 if --count was not reached).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def subscribe(
    home: Path | None, pattern: str, count: int | None, timeout: float | None, as_json: bool
) -> None:
    """Print messages matching PATTERN as they arrive (Ctrl-C to stop)."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    received = 0
    with interrupt_flag() as interrupted, operator_bus(home) as bus:
        sub = bus.subscribe(pattern)
        while (count is None or received < count) and not interrupted.is_set():
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            message = sub.get(wait)
            if message is None:
                continue
            received += 1
            record = message_record(message)
            if as_json:
                click.echo(json.dumps(record, default=str))
            else:
                click.echo(
                    f"{record['topic']} from {record['sender']}: "
                    f"{json.dumps(record['data'], default=str)}"
                )
    if interrupted.is_set():
        sys.exit(exits.INTERRUPTED)  # after the messages printed so far; the bus closed cleanly
    if count is not None and received < count:
        fail(f"got {received} of {count} messages before the timeout", exits.TIMEOUT)


@main.group()
def dlq() -> None:
    """The dead-letter queue: messages that could not be delivered, with the reason."""


@dlq.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of dead letters.")
def dlq_list(home: Path | None, as_json: bool) -> None:
    """Every dead letter with its reason, attempts, last error, topic and sender."""
    with operator_bus(home) as bus:
        answer = bus.dead_letters()
    entries = answer.get("entries", [])
    if as_json:  # a list is one array; the dropped count is in `plexus status --json`
        click.echo(json.dumps(entries, indent=2))
        return
    click.echo(f"{len(entries)} dead letters ({answer.get('dropped', 0)} dropped when full)")
    for entry in entries:
        click.echo(
            f"{entry['id']:>6}  {entry['reason']:<12} {entry['topic']:<32} "
            f"to {entry['app']}/{entry['session']}  from {entry['sender']}  "
            f"attempts {entry['attempts']}  {entry['last_error']}"
        )


@dlq.command("replay")
@home_option
@click.argument("entry_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def dlq_replay(home: Path | None, entry_id: int, as_json: bool) -> None:
    """Deliver dead letter ENTRY_ID again (to its session if it still exists); exit 6 when
    there is no such entry."""
    with operator_bus(home) as bus:
        try:
            bus.replay_dead_letter(entry_id)
        except BusError as exc:
            fail(str(exc), exit_code(exc))
    click.echo(json.dumps({"replayed": entry_id}) if as_json else f"replayed {entry_id}")


@dlq.command("purge")
@home_option
@click.option("--app", default=None, help="Only dead letters addressed to this app.")
@click.option(
    "--reason", type=click.Choice(dlq_purge_flow.REASONS), default=None, help="Only this reason."
)
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Only dead letters that died at least SECONDS ago.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def dlq_purge(
    home: Path | None,
    app: str | None,
    reason: str | None,
    older_than: float | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Drop dead letters: every one, or those matching --app, --reason and --older-than.

    Asks for confirmation on a terminal; without one, --yes is required."""
    dlq_purge_flow.purge(home, yes, app, reason, older_than, as_json)


@main.group()
def apps() -> None:
    """The supervised apps: list them, start, stop or restart one."""


def _apps_request(bus: Bus, op: str, app: str | None = None) -> dict[str, Any]:
    return supervisor_request(bus, {"op": op, "app": app})


@apps.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of apps.")
def apps_list(home: Path | None, as_json: bool) -> None:
    """Every app with its pid, state, connections, restarts, uptime, CPU, RSS and last exit."""
    with operator_bus(home) as bus:
        listed = _apps_request(bus, "list")["apps"]
        sessions = bus.broker_stats().get("apps", {})
    rows = [
        {
            "app": name,
            **app,
            "connections": sessions.get(name, {}).get("sessions", 0),
            "last_heartbeat_s_ago": sessions.get(name, {}).get("last_seen_s_ago"),
        }
        for name, app in sorted(listed.items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(render_apps(rows))


def _change(home: Path | None, op: str, app_id: str, as_json: bool) -> None:
    with operator_bus(home) as bus:
        state = _apps_request(bus, op, app_id)["state"]
    click.echo(json.dumps({"app": app_id, "state": state}) if as_json else f"{app_id}: {state}")


_json_result = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@apps.command("start")
@home_option
@click.argument("app_id")
@_json_result
def apps_start(home: Path | None, app_id: str, as_json: bool) -> None:
    """Start APP_ID (also one that went FATAL)."""
    _change(home, "start", app_id, as_json)


@apps.command("stop")
@home_option
@click.argument("app_id")
@_json_result
def apps_stop(home: Path | None, app_id: str, as_json: bool) -> None:
    """Stop APP_ID (SIGTERM, SIGKILL after the grace period); it stays stopped."""
    _change(home, "stop", app_id, as_json)


@apps.command("restart")
@home_option
@click.argument("app_id")
@_json_result
def apps_restart(home: Path | None, app_id: str, as_json: bool) -> None:
    """Stop APP_ID and start it again."""
    _change(home, "restart", app_id, as_json)


main.add_command(history)
main.add_command(replay)
main.add_command(keys)
main.add_command(credential_commands.env)
main.add_command(credential_commands.credentials)
main.add_command(logs_command.logs)
