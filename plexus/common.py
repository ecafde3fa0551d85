"""What every `plexus` command shares: the --home option, failing with an exit code, the
operator's bus connection and the JSON shape of a message."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from broker import protocol as P
from broker.errors import Code
from broker.paths import PlatformPaths
from clients.bus import (
    AuthenticationError,
    BrokerUnavailable,
    Bus,
    BusError,
    Message,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
)
from clients.errors import StorageError
from plexus import exits
from security.credentials import Credential
from security.operator_door import OperatorDoorError, open_door
from supervisor.platform_state import platform_alive

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Platform home (default: $PLEXUS_HOME, else the per-user data dir).",
)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"plexus: error: {message}", err=True)
    sys.exit(code)


def exit_code(error: BusError) -> int:
    """The exit code (plexus.exits) a command ends with for `error`."""
    if error.code == Code.UNKNOWN_DLQ_ENTRY:  # the id the user gave names nothing
        return exits.BAD_INPUT
    if isinstance(error, PermissionDenied):
        return exits.PERMISSION
    if isinstance(error, AuthenticationError):
        return exits.AUTH
    if isinstance(error, BrokerUnavailable):
        return exits.NOT_RUNNING
    if isinstance(error, ProtocolError):
        return exits.BAD_INPUT
    if isinstance(error, StorageError):
        return exits.STORAGE
    if isinstance(error, RequestTimeout):
        return exits.TIMEOUT
    return exits.FAILURE


def running_state(paths: PlatformPaths) -> dict[str, Any]:
    """The running platform's state file, or exit 3 saying how to start one."""
    state = paths.read_state()
    if state is None:
        fail(
            f"no platform is running with home {paths.home}; start one with `plexus run`",
            exits.NOT_RUNNING,
        )
    if not platform_alive(state):
        fail(stale_message(paths), exits.NOT_RUNNING)
    return state


def stale_message(paths: PlatformPaths) -> str:
    return (
        f"not running; the last run ended without cleaning up (home {paths.home}); "
        "`plexus run` removes the stale state and starts it"
    )


def operator_credential(state: Mapping[str, Any]) -> Credential:
    """A fresh key pair pinning the running platform's broker and store keys. Nobody
    registered it: the broker admits it as the operator because the kernel says this
    process belongs to the platform's user and to no supervised app (docs/security.md).
    Over TCP the supervisor's door applies that rule and grants the key for as long as
    this process lives (security.operator_door)."""
    try:
        broker_key = bytes.fromhex(str(state["broker_key"]))
        store_key = bytes.fromhex(str(state["store_key"]))
    except (KeyError, ValueError):
        fail(
            "the platform's state names no broker key; it was started by an older plexus: "
            "restart it with `plexus stop` and `plexus run`",
            exits.NOT_RUNNING,
        )
    credential = Credential.mint(broker_key, store_key)
    if state.get("transport") == "tcp":  # the bus cannot name this process: ask the door
        door = state.get("operator_door")
        if not isinstance(door, str) or not door:
            fail("the platform runs on TCP but names no operator door", exits.NOT_RUNNING)
        try:
            open_door(Path(door), credential.public)
        except OperatorDoorError as exc:
            fail(str(exc), exits.AUTH)
    return credential


@contextmanager
def operator_bus(home: Path | None) -> Iterator[Bus]:
    """A Bus connected as the operator (`$cli`)."""
    paths = PlatformPaths.resolve(home)
    state = running_state(paths)
    token = operator_credential(state).token
    try:
        with Bus.connect(
            state["endpoint"], P.CLI_ID, token, timeout=5.0, session=f"cli-{os.getpid()}"
        ) as bus:
            yield bus
    except BusError as exc:
        fail(str(exc), exit_code(exc))


def supervisor_request(bus: Bus, body: Mapping[str, Any]) -> dict[str, Any]:
    """One command to the supervisor; its refusal ends the command with a meaningful code."""
    try:
        reply = bus.request(P.SUPERVISOR_CONTROL_TOPIC, dict(body), timeout=15.0)
    except BusError as exc:
        fail(str(exc), exit_code(exc))
    answer: dict[str, Any] = reply.data if isinstance(reply.data, dict) else {}
    if not answer.get("ok"):
        unknown = answer.get("unknown_app") or answer.get("unknown_credential")
        fail(
            str(answer.get("error", "the supervisor refused")),
            exits.AUTH if unknown else exits.BAD_INPUT,
        )
    return answer


def message_record(message: Message) -> dict[str, Any]:
    data = message.data
    if isinstance(data, bytes):
        data = {"$bytes": data.hex()}
    return {
        "id": message.id,
        "topic": message.topic,
        "sender": message.sender,
        "timestamp": message.timestamp,
        "correlation_id": message.correlation_id,
        "attempt": message.attempt,
        "data": data,
    }
