"""How one app is started: its argv and its environment.

The credential never appears on a command line or in the environment: the child inherits
the read end of a pipe as `PLEXUS_CREDENTIAL_FD`, into which the supervisor writes the
credential once the broker knows its grant (`supervisor.identity.CredentialGate`). The
platform services get the platform config the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from broker.config import CONFIG_FD_VARIABLE
from broker.manifests import Manifest
from broker.paths import PlatformPaths

_SCRUBBED = (
    "PLEXUS_TOKEN",
    "PLEXUS_CREDENTIAL_FD",
    "PLEXUS_SERVER_KEY_FD",  # a service's secret key and grant channel are its own
    "PLEXUS_GRANTS_FD",
    CONFIG_FD_VARIABLE,  # the platform config is for the platform's services only
    "PLEXUS_APP_ID",
    "PLEXUS_ENDPOINT",
    "PLEXUS_KEY_PASSPHRASE",  # the key ring's secret is for the persistence service only
    "PLEXUS_KEY_PASSPHRASE_FD",
)


def app_argv(manifest: Manifest) -> list[str]:
    """The manifest's command; a leading `python`/`python3` means this interpreter."""
    assert manifest.command is not None, "external apps are not launched"
    argv = list(manifest.command)
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def app_environment(
    manifest: Manifest,
    paths: PlatformPaths,
    endpoint: str,
    credential_fd: int,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a launched app (DESIGN.md "Contracts")."""
    env = {
        k: v for k, v in (base if base is not None else os.environ).items() if k not in _SCRUBBED
    }
    env.update(dict(manifest.env))
    env.update(
        {
            "PLEXUS_ENDPOINT": endpoint,
            "PLEXUS_APP_ID": manifest.app_id,
            "PLEXUS_CREDENTIAL_FD": str(credential_fd),
            "PLEXUS_HOME": str(paths.home),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
