"""What the threaded `Bus` and the asyncio `AsyncBus` share beyond the core: where and as
whom to connect (from the arguments, else the PLEXUS_* environment), and the errors
their waits raise, written once so both drivers say the same thing with the same hint.
"""

from __future__ import annotations

import os

from clients.connection import ConnectSettings, credential_of
from clients.errors import AuthenticationError, BrokerUnavailable, RequestTimeout, WouldBlock
from security import handoff
from security.handoff import HandoffError


def credential_from_environment() -> str:
    """The app's credential (`security.handoff`: PLEXUS_TOKEN, else the inherited pipe,
    read once per process), its absence as the client's `AuthenticationError`."""
    try:
        return handoff.credential_from_environment()
    except HandoffError as exc:
        raise AuthenticationError(str(exc), hint=exc.hint) from None


def required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise BrokerUnavailable(
            f"{name} is not set", hint="launch the app through `plexus run` or `plexus env APP_ID`"
        )
    return value


def connect_settings(
    endpoint: str | None,
    app_id: str | None,
    token: str | None,
    heartbeat_ms: int | None,
    session: str,
) -> ConnectSettings:
    """The settings of `connect()`: each argument, else its PLEXUS_* variable."""
    settings = ConnectSettings(
        endpoint=endpoint or required_env("PLEXUS_ENDPOINT"),
        app_id=app_id or required_env("PLEXUS_APP_ID"),
        token=token or credential_from_environment(),
        heartbeat_ms=heartbeat_ms,
        session=session,
    )
    credential_of(settings)  # a token that is no credential fails here, not in the I/O thread
    return settings


def no_welcome(endpoint: str, timeout: float) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"no WELCOME from {endpoint} within {timeout:g}s",
        hint="check `plexus status`; is the platform running with this --home?",
    )


def no_answer(what: str, timeout: float) -> BrokerUnavailable:
    """A wait for the broker (SUBOK, CONFIRM, STATS, DLQ) that ran out."""
    return BrokerUnavailable(
        f"no answer for {what} within {timeout:g}s",
        hint="the broker may be down or overloaded; check `plexus status`",
    )


def no_reply(topic: str, timeout: float) -> RequestTimeout:
    return RequestTimeout(
        f"no reply to {topic} within {timeout:g}s",
        hint="the responder may be slow or stuck; raise the timeout, or look at the serving "
        "app (`plexus status`, its log)",
    )


def still_unconfirmed(count: int, timeout: float) -> RequestTimeout:
    return RequestTimeout(
        f"{count} publishes still unconfirmed after {timeout:g}s",
        hint="check `plexus status`: is the broker (and persistence) running?",
    )


def window_full(count: int, window: int, waiting_call: str) -> WouldBlock:
    """`publish_nowait` refused: `waiting_call` names the variant that waits for room."""
    return WouldBlock(
        f"{count} publishes await confirmation (window {window})",
        hint=f"retry later, or {waiting_call}, which waits for room",
    )
