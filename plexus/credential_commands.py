"""`plexus env APP_ID` and `plexus credentials list|revoke`: external apps' credentials.

The supervisor issues them (it alone grants, in the broker's memory); these commands ask
it as the operator. `plexus env` prints shell-quoted `export` lines, so a home or an
endpoint with `$(...)` or quotes in it never runs anything when the output is `eval`ed.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import click

from broker.paths import PlatformPaths
from plexus.common import home_option, operator_bus, running_state, supervisor_request


def export_lines(variables: dict[str, str]) -> str:
    """`export NAME=VALUE` lines a POSIX shell can `eval` safely (each value quoted)."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in variables.items())


@click.command()
@home_option
@click.argument("app_id")
@click.option("--json", "as_json", is_flag=True, help="Print the variables as one JSON object.")
def env(home: Path | None, app_id: str, as_json: bool) -> None:
    """Print `export PLEXUS_...` lines that let an external app connect as APP_ID.

    Only for a manifest without `command`; the credential expires after
    [security] external_ttl_s (8 hours by default) and `plexus credentials revoke`
    takes it back."""
    paths = PlatformPaths.resolve(home)
    state = running_state(paths)
    with operator_bus(home) as bus:
        answer = supervisor_request(bus, {"op": "issue", "app": app_id})
    variables = {
        "PLEXUS_ENDPOINT": str(state["endpoint"]),
        "PLEXUS_APP_ID": app_id,
        "PLEXUS_TOKEN": str(answer["token"]),
        "PLEXUS_HOME": str(paths.home),
    }
    if as_json:
        click.echo(json.dumps({**variables, "credential": answer["credential"]}))
        return
    click.echo(export_lines(variables))


@click.group()
def credentials() -> None:
    """Live credentials: list them, revoke external apps' ones."""


def _row(grant: dict[str, Any], now: float) -> str:
    expires = grant.get("expires_at")
    left = f"{max(0.0, float(expires) - now) / 3600:.1f} h" if expires else "-"
    pid = grant.get("pid") or "-"
    return f"{grant['id']:<18}  {grant['app']:<24}  {grant['kind']:<8}  {pid!s:>7}  {left:>8}"


@credentials.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def credentials_list(home: Path | None, as_json: bool) -> None:
    """Every live credential: id, app, kind (app, service, external), pid, time left."""
    with operator_bus(home) as bus:
        grants = supervisor_request(bus, {"op": "credentials"})["credentials"]
    if as_json:
        click.echo(json.dumps(grants, indent=2))
        return
    now = time.time()
    header = f"{'ID':<18}  {'APP':<24}  {'KIND':<8}  {'PID':>7}  {'LEFT':>8}"
    click.echo("\n".join([header, *(_row(g, now) for g in grants)]))


@credentials.command("revoke")
@home_option
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print the revoked credentials as JSON.")
def credentials_revoke(home: Path | None, target: str, as_json: bool) -> None:
    """Revoke the external credentials of app TARGET, or the one with id TARGET; its live
    sessions are closed at once."""
    with operator_bus(home) as bus:
        revoked = supervisor_request(bus, {"op": "revoke", "target": target})["revoked"]
    if as_json:
        click.echo(json.dumps(revoked))
        return
    for grant in revoked:
        click.echo(f"revoked {grant['id']} ({grant['app']})")
