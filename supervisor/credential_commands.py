"""The operator's credential commands, as the supervisor serves them on its control topic.

    {"op": "credentials"}                     every live grant (no key material)
    {"op": "issue", "app": APP}               a credential for an external app (`plexus env`)
    {"op": "revoke", "target": APP|GRANT_ID}  take external credentials back at once

Only the operator (`$cli`, as the broker's stamp says, never the request body) may send
them. Only a manifest without `command` gets an external credential: an app the
supervisor launches gets its own, bound to its process, at each launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker import protocol as P
from broker.manifests import Manifest
from security.grants import GrantKind
from supervisor.identity import Identities


def credential_command(
    request: Mapping[str, Any],
    identities: Identities,
    manifests: Mapping[str, Manifest],
    ttl_s: float,
) -> dict[str, Any]:
    """The answer to one credential command."""
    if request.get("sender") != P.CLI_ID:
        return {"ok": False, "error": "only the operator (`plexus credentials`) may do this"}
    op = request.get("op")
    if op == "credentials":
        grants = sorted(identities.grants.values(), key=lambda g: (g.app_id, g.issued_at))
        return {"ok": True, "credentials": [g.as_dict() for g in grants]}
    if op == "issue":
        return _issue(request.get("app"), identities, manifests, ttl_s)
    return _revoke(request.get("target"), identities)


def _issue(
    app: Any, identities: Identities, manifests: Mapping[str, Manifest], ttl_s: float
) -> dict[str, Any]:
    manifest = manifests.get(app) if isinstance(app, str) else None
    if manifest is None:
        return {
            "ok": False,
            "unknown_app": True,
            "error": f"no manifest for app {app!r}; add APP.toml to the apps directory",
        }
    if not manifest.external:
        return {
            "ok": False,
            "error": f"{app} has a `command`: the supervisor launches it with its own "
            "credential; `plexus env` is only for manifests without one",
        }
    grant, credential = identities.grant(manifest.app_id, GrantKind.EXTERNAL, ttl_s=ttl_s)
    return {"ok": True, "token": credential.token, "credential": grant.as_dict()}


def _revoke(target: Any, identities: Identities) -> dict[str, Any]:
    if not isinstance(target, str) or not target:
        return {"ok": False, "error": "name an app id or a credential id to revoke"}
    chosen = [g for g in identities.external() if target in (g.grant_id, g.app_id)]
    if not chosen:
        return {
            "ok": False,
            "unknown_credential": True,
            "error": f"no external credential {target!r}; see `plexus credentials list`",
        }
    for grant in chosen:
        identities.revoke(grant.grant_id)
    return {"ok": True, "revoked": [g.as_dict() for g in chosen]}
