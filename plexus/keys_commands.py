"""`plexus keys`: the key ring that encrypts sensitive records at rest (HOME/keys).

Every command works on HOME/keys directly, with the platform running (the persistence
service picks a change up within a second) or stopped. `destroy` and `prune` first ask the
store which keys its sealed records still name (`persistence.key_usage`), read-only.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click

from broker.paths import PlatformPaths
from persistence.key_usage import key_ids_in_use
from plexus import exits
from plexus.common import fail, home_option
from security.keyring import KeyFileError, KeyRefused, KeyRing

_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group()
def keys() -> None:
    """The key ring that encrypts sensitive payloads at rest (HOME/keys)."""


def _ring(home: Path | None) -> KeyRing:
    try:
        return KeyRing.open(PlatformPaths.resolve(home).keys_dir)
    except KeyFileError as exc:
        fail(str(exc), exits.STORAGE)


@keys.command("rotate")
@home_option
@click.option(
    "--kek",
    is_flag=True,
    help="Replace the key-encryption key and rewrap every data key (data keys stay).",
)
@_json_option
def keys_rotate(home: Path | None, kek: bool, as_json: bool) -> None:
    """Make a new data key active (older records stay readable), or with --kek replace
    the key-encryption key."""
    ring = _ring(home)
    if not kek:
        key_id = ring.rotate()
        click.echo(json.dumps({"active_key": key_id}) if as_json else f"active key is now {key_id}")
        return
    try:
        ring.rotate_kek()
    except KeyFileError as exc:
        fail(str(exc), exits.STORAGE)
    info = ring.kek_info()
    result = {"kek": info, "rewrapped": [key["id"] for key in ring.describe()]}
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"key-encryption key replaced (generation {info['generation']}, {info['kind']}); "
        f"{len(result['rewrapped'])} data keys rewrapped"
    )


@keys.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def keys_list(home: Path | None, as_json: bool) -> None:
    """Every data key: id, creation time, whether active, encryptions reserved."""
    described = _ring(home).describe()
    if as_json:
        click.echo(json.dumps(described))
        return
    click.echo(f"{'KEY':>4}  {'CREATED':<20} {'ACTIVE':<7}{'RESERVED':>10}")
    for key in described:
        created = datetime.fromtimestamp(int(key["created_ns"]) / 1e9).isoformat(timespec="seconds")
        active = "yes" if key["active"] else ""
        click.echo(f"{key['id']:>4}  {created:<20} {active:<7}{key['reserved']:>10}")


@keys.command("destroy")
@home_option
@click.argument("key_id", type=int)
@_json_option
def keys_destroy(home: Path | None, key_id: int, as_json: bool) -> None:
    """Remove a retired data key for good; refused while a stored record needs it."""
    ring = _ring(home)
    in_use = key_ids_in_use(PlatformPaths.resolve(home))
    try:
        ring.destroy(key_id, in_use)
    except KeyRefused as exc:
        count = in_use.get(key_id, 0)
        fail(f"{exc} ({count} stored records name it)" if count else str(exc), exits.BAD_INPUT)
    click.echo(json.dumps({"destroyed": [key_id]}) if as_json else f"key {key_id} destroyed")


@keys.command("prune")
@home_option
@_json_option
def keys_prune(home: Path | None, as_json: bool) -> None:
    """Destroy every retired data key no stored record needs; list the ones kept."""
    ring = _ring(home)
    in_use = key_ids_in_use(PlatformPaths.resolve(home))
    destroyed: list[int] = []
    for key_id in ring.destroyable(in_use):
        try:
            ring.destroy(key_id, in_use)
        except KeyRefused:  # another `plexus keys` changed the ring meanwhile
            continue
        destroyed.append(key_id)
    kept = [
        {"id": key["id"], "active": key["active"], "records": in_use.get(int(key["id"]), 0)}
        for key in ring.describe()
    ]
    if as_json:
        click.echo(json.dumps({"destroyed": destroyed, "kept": kept}))
        return
    click.echo(f"destroyed: {', '.join(map(str, destroyed)) or 'none'}")
    for key in kept:
        note = "active" if key["active"] else f"{key['records']} records"
        click.echo(f"kept key {key['id']} ({note})")
