"""`plexus dlq purge`: choose dead letters by app, reason or age, confirm, drop them.

The CLI lists the queue, filters it here and asks the broker to purge exactly the ids it
chose (DLQ purge with `ids`), so an entry that arrives after the listing is never dropped
unseen. Without `--yes` it asks on a terminal and refuses when there is none.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from broker.dlq import REASONS
from plexus import exits
from plexus.common import fail, operator_bus

__all__ = ["REASONS", "purge", "select"]


def select(
    entries: Iterable[dict[str, Any]],
    app: str | None,
    reason: str | None,
    older_than_s: float | None,
    now_ns: int,
) -> list[dict[str, Any]]:
    """The entries (as `dlq list --json` shows them) matching every filter given."""
    cutoff = None if older_than_s is None else now_ns - int(older_than_s * 1e9)
    return [
        e
        for e in entries
        if (app is None or e.get("app") == app)
        and (reason is None or e.get("reason") == reason)
        and (cutoff is None or int(e.get("dead_at_ns", 0)) <= cutoff)
    ]


def _describe(app: str | None, reason: str | None, older_than_s: float | None) -> str:
    parts = [f"app {app}"] if app is not None else []
    parts += [f"reason {reason}"] if reason is not None else []
    parts += [f"older than {older_than_s:g} s"] if older_than_s is not None else []
    return f" ({', '.join(parts)})" if parts else ""


def purge(
    home: Path | None,
    yes: bool,
    app: str | None,
    reason: str | None,
    older_than_s: float | None,
    as_json: bool,
) -> None:
    """List, filter, confirm (unless `yes`), then purge the chosen ids; prints the count."""
    filtered = app is not None or reason is not None or older_than_s is not None
    if yes and not filtered:  # everything, no questions: one round trip
        with operator_bus(home) as bus:
            answer = bus.purge_dead_letters()
        _report(answer.get("purged", 0), as_json)
        return
    if not yes and not sys.stdin.isatty():
        fail(
            "refusing to purge without confirmation: stdin is not a terminal; "
            "pass --yes to purge from a script",
            exits.USAGE,
        )
    with operator_bus(home) as bus:
        listing = bus.dead_letters()
    chosen = select(listing.get("entries", []), app, reason, older_than_s, time.time_ns())
    if not chosen:
        _report(0, as_json)
        return
    if not yes:
        what = _describe(app, reason, older_than_s)
        if not click.confirm(f"Purge {len(chosen)} dead letters{what}?", default=False):
            fail("nothing purged", exits.FAILURE)
    with operator_bus(home) as bus:
        answer = bus.purge_dead_letters(ids=[int(e["id"]) for e in chosen])
    _report(answer.get("purged", 0), as_json)


def _report(count: int, as_json: bool) -> None:
    click.echo(json.dumps({"purged": count}) if as_json else f"purged {count}")
