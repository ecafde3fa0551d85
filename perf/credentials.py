"""Credentials for the benchmarks, handed out the way the platform hands them out.

No credential is ever a file. A benchmark gets its apps' credentials in one of two ways:

* A benchmark that starts a bare broker (and the persistence service) itself plays the
  supervisor's part, as tests/conftest.py does: it holds a `supervisor.identity.Identities`
  (the platform's server keys and its live grants), hands each service its server key and
  grant channel at spawn (`procutil.spawn_bounded(..., identities=...)`), and grants every
  bench app a credential bound to its own pid (`app_token`). The worker processes it
  starts are its descendants, so their credentials pass the broker's process check.
* A benchmark that runs a whole platform (`plexus run`) is its operator: the platform's
  user outside every supervised app, admitted as `$cli` with any fresh key that pins the
  broker's and the store's public keys from the state file (`operator_token`, what
  `plexus.common.operator_credential` makes). Its bench apps are external (manifests
  without `command`): their credentials come from the supervisor (`issue`, the request
  `plexus env APP` sends), all over one operator Bus.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from broker import protocol as P
from broker.paths import PlatformPaths
from clients.bus import Bus
from security.credentials import Credential
from security.grants import GrantKind
from supervisor.identity import Identities

ISSUE_TIMEOUT_S = 15.0
ISSUE_S_PER_APP = 0.05
"""Time to allow per credential `issue`d (the supervisor's main loop wakes for each
operator command; a few ms each on a quiet box)."""


def app_token(identities: Identities, app_id: str) -> str:
    """A new credential for `app_id`, registered with every service of `identities`,
    usable from this process and its descendants."""
    _grant, credential = identities.grant(app_id, GrantKind.APP, pid=os.getpid())
    return credential.token


def operator_token(state: Mapping[str, Any]) -> str:
    """A fresh key pinning the running platform's broker and store keys (its state file's
    `broker_key` and `store_key`): nobody registered it, the broker admits it as the
    operator because this process is the user's and no supervised app's."""
    try:
        keys = bytes.fromhex(str(state["broker_key"])), bytes.fromhex(str(state["store_key"]))
    except (KeyError, ValueError):
        raise RuntimeError("the platform's state names no broker key") from None
    return Credential.mint(*keys).token


def operator_bus(paths: PlatformPaths, session: str, timeout: float = 30.0) -> Bus:
    """A Bus as the operator (`$cli`) on the running platform of `paths`."""
    state = paths.read_state()
    if state is None:
        raise RuntimeError(f"no platform runs with home {paths.home}")
    token = operator_token(state)
    return Bus.connect(paths.bus_endpoint(), P.CLI_ID, token, session=session, timeout=timeout)


def issue(operator: Bus, app_ids: Iterable[str]) -> dict[str, str]:
    """App id -> a credential the supervisor issued for that external app, each asked on
    the `operator` Bus (`{"op": "issue", "app": ...}`, as `plexus env` asks)."""
    tokens: dict[str, str] = {}
    for app_id in app_ids:
        reply = operator.request(
            P.SUPERVISOR_CONTROL_TOPIC, {"op": "issue", "app": app_id}, timeout=ISSUE_TIMEOUT_S
        )
        answer: dict[str, Any] = reply.data if isinstance(reply.data, dict) else {}
        token = answer.get("token")
        if not answer.get("ok") or not isinstance(token, str):
            error = answer.get("error", "no answer")
            raise RuntimeError(f"the supervisor issued no credential for {app_id}: {error}")
        tokens[app_id] = token
    return tokens
