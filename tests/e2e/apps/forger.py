"""A launched app that tries to become someone else, and writes what happened to FORGER_OUT.

It plants a credential file where the old file-based store kept them, reads every file it
can under the platform home and every same-user process's environment, and tries every
token it found (and a key of its own making) as `$supervisor`, `$cli` and its neighbour;
then a double-forked grandchild, escaped from its process tree, tries a fresh key as the
operator. Each attempt is one JSON object: who it claimed, with which token, what the
broker answered.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from broker.paths import PlatformPaths
from clients.bus import Bus, BusError
from security.credentials import Credential
from security.handoff import credential_from_environment

TOKEN = re.compile(rb"px1\.[A-Za-z0-9_-]{100,140}")


def found_tokens(home: Path) -> set[str]:
    """Every credential-looking string in files under `home` and in processes' environments."""
    found: set[str] = set()
    for path in home.rglob("*"):
        try:
            if path.is_file() and not path.is_socket():
                found.update(m.decode() for m in TOKEN.findall(path.read_bytes()))
        except OSError:
            continue
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            found.update(m.decode() for m in TOKEN.findall(environ.read_bytes()))
        except OSError:
            continue
    return found


def attempt(endpoint: str, claimed: str, token: str, what: str) -> dict[str, Any]:
    try:
        with Bus.connect(endpoint, claimed, token, timeout=5, session=f"forge-{time.time_ns()}"):
            return {"claimed": claimed, "token": what, "ok": True}
    except BusError as exc:
        return {"claimed": claimed, "token": what, "ok": False, "code": exc.code}


def escaped_grandchild(endpoint: str, keys: tuple[bytes, bytes], out: Path) -> None:
    """Double-fork so the grandchild is orphaned (re-parented away from this app), then try
    a fresh key as the operator; the outcome goes to `out`."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(0.5)  # let the middle process die: this one is an orphan now
            result = attempt(endpoint, "$cli", Credential.mint(*keys).token, "escaped-fresh")
            result["ppid"] = os.getppid()
            out.write_text(json.dumps(result), encoding="utf-8")
            os._exit(0)
        os._exit(0)
    os.wait()


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = Path(os.environ["FORGER_OUT"])
    endpoint = os.environ["PLEXUS_ENDPOINT"]
    neighbour = os.environ["FORGER_NEIGHBOUR"]
    paths = PlatformPaths.resolve(os.environ["PLEXUS_HOME"])
    own = credential_from_environment()
    out.with_suffix(".token").write_text(own, encoding="utf-8")  # leaked, for another process
    go = Path(os.environ["FORGER_GO"])
    while not go.exists() and not stop.is_set():
        time.sleep(0.1)
    keys = Credential.parse(own).broker_key, Credential.parse(own).store_key
    planted = Credential.mint(*keys).token  # the old scheme: a file named after the token
    creds = paths.run_dir / "creds"
    creds.mkdir(parents=True, exist_ok=True)
    for app in ("$supervisor", "$cli", neighbour):
        digest = hashlib.sha256(f"{app}\0{planted}".encode()).hexdigest()
        (creds / digest).write_text(app, encoding="utf-8")
    tokens = {"found": sorted(found_tokens(paths.home)), "own": [own], "planted": [planted]}
    results = []
    for what, group in tokens.items():
        for token in group:
            for claimed in ("$supervisor", "$cli", neighbour):
                results.append(attempt(endpoint, claimed, token, what))
    escaped = out.with_suffix(".escaped")
    escaped_grandchild(endpoint, keys, escaped)
    deadline = time.monotonic() + 20
    while not escaped.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    report = {
        "pid": os.getpid(),
        "found": len(tokens["found"]),
        "attempts": results,
        "escaped": json.loads(escaped.read_text()) if escaped.exists() else None,
    }
    out.write_text(json.dumps(report), encoding="utf-8")
    stop.wait()


if __name__ == "__main__":
    main()
