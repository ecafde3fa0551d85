"""`plexus history` and `plexus replay`: the store, for the operator (`plexus keys`:
plexus.keys_commands).

History and replay go through the persistence service like any app's queries (as `$cli`,
which may read every topic). Replay streams: one message a line as pages arrive, with a
progress line on stderr when stderr is a terminal.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from clients.bus import BusError, Message
from clients.store import LATEST_MOMENT_S
from plexus import exits
from plexus.common import exit_code, fail, home_option, message_record, operator_bus
from plexus.interrupts import interrupt_flag

_PROGRESS_EVERY_S = 0.2


def parse_moment(text: str) -> float:
    """ISO 8601 (local time when no offset is given) or epoch seconds, as epoch seconds
    within what the store can hold (0, the epoch, means "from the start")."""
    try:
        moment = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(
                f"{text!r} is neither ISO 8601 (2026-11-27T09:00) nor epoch seconds"
            ) from None
    if math.isnan(moment):
        raise ValueError(f"{text!r} is not a time")
    if moment < 0:
        raise ValueError(f"{text!r} is before the epoch; 0 means from the start")
    if moment > LATEST_MOMENT_S:
        raise ValueError(f"{text!r} is after 2262-04-11, the latest time the store holds")
    return moment


class Moment(click.ParamType[float]):
    """A --since/--until value; a bad one is reported under the option's own name."""

    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_moment(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _print(message: Message, as_json: bool) -> None:
    record = message_record(message)
    if as_json:
        click.echo(json.dumps(record, default=str))
        return
    moment = datetime.fromtimestamp(record["timestamp"]).isoformat(timespec="milliseconds")
    click.echo(
        f"{moment} {record['topic']} from {record['sender']}: "
        f"{json.dumps(record['data'], default=str)}"
    )


@click.command()
@home_option
@click.argument("topic")
@click.option("--last", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array of messages.")
def history(home: Path | None, topic: str, last: int, as_json: bool) -> None:
    """The last N stored messages of TOPIC (one topic, no wildcards), oldest first."""
    if not {"*", ">"}.isdisjoint(topic.split(".")):
        fail(
            f"history takes one topic, and {topic!r} is a pattern; for every topic it "
            f"matches use `plexus replay '{topic}' --since 0` (or a later --since)",
            exits.BAD_INPUT,
        )
    with operator_bus(home) as bus:
        try:
            found = bus.history(topic, last)
        except BusError as exc:
            fail(str(exc), exit_code(exc))
    if as_json:
        click.echo(json.dumps([message_record(m) for m in found], default=str))
        return
    for message in found:
        _print(message, False)


class _Progress:
    """A one-line progress report on stderr, on a terminal only."""

    def __init__(self, since: float, until: float | None) -> None:
        self.enabled = sys.stderr.isatty()
        self.since = since
        self.until = until if until is not None else time.time()
        self.count = 0
        self._shown = 0.0

    def step(self, message: Message) -> None:
        self.count += 1
        now = time.monotonic()
        if not self.enabled or now - self._shown < _PROGRESS_EVERY_S:
            return
        self._shown = now
        span = max(self.until - self.since, 1e-9)
        done = min(max((message.timestamp - self.since) / span, 0.0), 1.0)
        bar = "#" * int(done * 30)
        stamp = datetime.fromtimestamp(message.timestamp).isoformat(timespec="seconds")
        click.echo(
            f"\r[{bar:<30}] {done:4.0%} {self.count} messages, at {stamp}", err=True, nl=False
        )

    def finish(self) -> None:
        if self.enabled:
            click.echo(f"\r{' ' * 78}\rreplayed {self.count} messages", err=True)


@click.command()
@home_option
@click.argument("pattern")
@click.option(
    "--since", type=Moment(), required=True, help="ISO 8601 or epoch seconds (>=); 0: the start."
)
@click.option("--until", type=Moment(), default=None, help="ISO 8601 or epoch seconds (<=).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line (a stream).")
def replay(
    home: Path | None, pattern: str, since: float, until: float | None, as_json: bool
) -> None:
    """Stored messages matching PATTERN with broker timestamp >= --since, in order."""
    if until is not None and until < since:
        fail("--until is before --since; nothing can match", exits.BAD_INPUT)
    progress = _Progress(since, until)
    with interrupt_flag() as interrupted, operator_bus(home) as bus:
        try:
            for message in bus.replay(pattern, since, until):
                _print(message, as_json)
                progress.step(message)
                if interrupted.is_set():
                    break
        except BusError as exc:
            fail(str(exc), exit_code(exc))
    progress.finish()
    if interrupted.is_set():
        sys.exit(exits.INTERRUPTED)  # what was printed is complete; the rest was not sent
