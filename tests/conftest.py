"""Shared fixtures: a real broker process, a real platform (`plexus run`), operator helpers.

Every process started here is stopped at teardown (SIGTERM, then SIGKILL) so no test leaks
processes into the next; every waiting is a bounded poll, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from broker import protocol as P
from broker.config import CONFIG_FD_VARIABLE, PlatformConfig
from broker.delivery import DELIVERY_FIELDS, DeliveryConfig
from broker.paths import PlatformPaths
from clients.bus import Bus
from security.credentials import Credential
from security.grant_channel import GRANTS_FD_VARIABLE
from security.grants import GrantKind
from security.handoff import CREDENTIAL_FD_VARIABLE, SERVER_KEY_FD_VARIABLE, handoff_pipe
from supervisor.identity import CredentialGate, Identities

REPO = Path(__file__).resolve().parent.parent

# Property tests assert behaviour, never speed: on a loaded 2-core CI machine one example
# can take 700 ms where it usually takes 3 ms, and Hypothesis's default 200 ms deadline
# then fails a correct test (seen in test_events). pytest-timeout still bounds every test.
settings.register_profile("plexus", deadline=None)
settings.load_profile("plexus")


PROCESS_START_S = 60.0
"""How long a started service or platform may take to be ready (its socket bound, `plexus
status` answering). Usually well under a second; a wait, so a generous bound costs nothing
when things go well. 10-20 s was too little on a 2-core CI box while a benchmark spawned
500 worker processes (seen: four fixtures timed out at start, every test itself fine)."""


def await_start(process: subprocess.Popen[Any], ready: Callable[[], bool]) -> None:
    """Wait until a just-spawned service is `ready`; if it never is, stop it before the
    test fails (a fixture that raises never reaches its teardown, so the process would
    outlive the test run: seen as an orphan broker after a CI run)."""
    try:
        wait_for(ready, PROCESS_START_S)
    except BaseException:
        stop_process(process)
        raise


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(grace)


def platform_config(**settings: Any) -> PlatformConfig:
    """The config of a test broker or service: the defaults with persistence off, changed by
    `settings` (PlatformConfig fields; DeliveryConfig fields go to [delivery])."""
    delivery = {name: settings.pop(name) for name in DELIVERY_FIELDS if name in settings}
    settings.setdefault("persistence", False)
    return PlatformConfig(**settings, delivery=DeliveryConfig(**delivery))


def spawn_service(
    module: str,
    home: Path,
    apps: Path,
    config: PlatformConfig,
    identities: Identities,
    identity: str | None = None,
) -> subprocess.Popen[bytes]:
    """`python -m MODULE` as the supervisor starts it: `config` on PLEXUS_CONFIG_FD, its
    server key and grant channel from `identities`, and (for a bus client) a credential
    for `identity` bound to the new process."""
    fd = handoff_pipe(config.to_document())
    channel = identities.service_channel(module)
    gate = CredentialGate.new() if identity is not None else None
    env = {
        **os.environ,
        CONFIG_FD_VARIABLE: str(fd),
        SERVER_KEY_FD_VARIABLE: str(channel.key_fd),
        GRANTS_FD_VARIABLE: str(channel.channel_fd),
    }
    fds = [fd, *channel.fds()]
    if gate is not None:
        env[CREDENTIAL_FD_VARIABLE] = str(gate.read_end)
        fds.append(gate.read_end)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--home", str(home), "--apps", str(apps)],
            cwd=REPO,
            env=env,
            pass_fds=tuple(fds),
        )
    finally:
        os.close(fd)
    if identities.platform_root is None:  # the test plays supervisor and operator both:
        identities.platform_root = process.pid  # the platform's tree is the broker's
    identities.service_started(module, channel, process.pid, gate, identity)
    return process


@dataclass
class TestCredentials:
    """What a test mints: a credential for an app, bound to this test process (the
    supervisor's role here is the test's)."""

    identities: Identities

    def mint(self, app_id: str, pid: int | None = None) -> str:
        _grant, credential = self.identities.grant(
            app_id, GrantKind.APP, pid=os.getpid() if pid is None else pid
        )
        return credential.token

    def external(self, app_id: str, ttl_s: float | None = None) -> tuple[str, str]:
        """(grant id, token) of an external app's credential."""
        grant, credential = self.identities.grant(app_id, GrantKind.EXTERNAL, ttl_s=ttl_s)
        return grant.grant_id, credential.token

    def unregistered(self) -> str:
        """A well-formed token nobody granted."""
        return self.identities.mint().token

    def revoke(self, app_id: str, token: str) -> None:
        """Take back the grant `token` holds (as the supervisor does at an app's exit)."""
        public = Credential.parse(token).public
        for grant in [g for g in self.identities.grants.values() if g.public_key == public]:
            self.identities.revoke(grant.grant_id)

    def revoke_app(self, app_id: str) -> None:
        for grant in [g for g in self.identities.grants.values() if g.app_id == app_id]:
            self.identities.revoke(grant.grant_id)


def authenticate(sock: Any, token: str, store: bool = False) -> None:
    """Make a raw test socket a CurveZMQ client of the broker (or the store) with `token`."""
    credential = Credential.parse(token)
    if store:
        credential.connect_to_store(sock)
    else:
        credential.connect_to_broker(sock)


def write_manifest(apps: Path, app_id: str, body: str) -> Path:
    path = apps / f"{app_id}.toml"
    path.write_text(f'id = "{app_id}"\n{body}', encoding="utf-8")
    return path


@dataclass
class BrokerHandle:
    """A real broker process on a temporary home, plus a way to connect apps to it."""

    home: Path
    apps: Path
    process: subprocess.Popen[bytes] | None = None
    persistence: subprocess.Popen[bytes] | None = None
    buses: list[Bus] = field(default_factory=list)
    identities: Identities = field(default_factory=Identities)

    @classmethod
    def prepared(cls, root: Path, manifests: dict[str, str]) -> BrokerHandle:
        """A home and an apps dir under `root`, with one manifest per (app id, body)."""
        (root / "apps").mkdir()
        handle = cls(root / "home", root / "apps")
        handle.paths.prepare()
        for app_id, body in manifests.items():
            handle.manifest(app_id, body)
        return handle

    @property
    def paths(self) -> PlatformPaths:
        return PlatformPaths.resolve(self.home)

    @property
    def endpoint(self) -> str:
        return self.paths.bus_endpoint()

    @property
    def credentials(self) -> TestCredentials:
        return TestCredentials(self.identities)

    def start(self, **settings: Any) -> None:
        """The broker, with `platform_config(**settings)` (persistence off unless asked)."""
        self.process = spawn_service(
            "broker", self.home, self.apps, platform_config(**settings), self.identities
        )
        endpoint = Path(self.endpoint.removeprefix("ipc://"))
        await_start(self.process, endpoint.exists)

    def start_persistence(self, **settings: Any) -> None:
        """The persistence service of this home (start the broker with persistence=True)."""
        self.persistence = spawn_service(
            "persistence",
            self.home,
            self.apps,
            platform_config(**settings),
            self.identities,
            identity=P.PERSISTENCE_ID,
        )
        store = Path(self.paths.store_endpoint().removeprefix("ipc://"))
        await_start(self.persistence, store.exists)

    def kill_persistence(self) -> None:
        assert self.persistence is not None
        self.persistence.kill()
        self.persistence.wait(5)
        Path(self.paths.store_endpoint().removeprefix("ipc://")).unlink(missing_ok=True)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)
        Path(self.endpoint.removeprefix("ipc://")).unlink(missing_ok=True)

    def connect(self, app_id: str, **kwargs: Any) -> Bus:
        """A Bus as `app_id`; each gets its own session unless `session=` says otherwise."""
        kwargs.setdefault("session", f"test-{len(self.buses)}")
        bus = Bus.connect(self.endpoint, app_id, self.credentials.mint(app_id), **kwargs)
        self.buses.append(bus)
        return bus

    def write_state(self) -> None:
        """What `plexus run` records, so the real CLI can talk to this broker."""
        self.paths.write_state(
            {
                "pid": self.process.pid if self.process else None,
                "endpoint": self.endpoint,
                "apps_dir": str(self.apps),
                "broker_key": self.identities.broker_keys.public.hex(),
                "store_key": self.identities.store_keys.public.hex(),
            }
        )

    def manifest(self, app_id: str, body: str) -> None:
        write_manifest(self.apps, app_id, body)

    def close(self) -> None:
        for bus in self.buses:
            bus.close(timeout=0.5)
        if self.process is not None:
            stop_process(self.process)
        if self.persistence is not None:
            stop_process(self.persistence)
        self.identities.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (ipc socket paths must stay under ~100 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="px-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def broker(short_tmp: Path) -> Iterator[BrokerHandle]:
    handle = BrokerHandle.prepared(
        short_tmp,
        {
            "pub": '[permissions]\npublish = ["market.>", "orders.*"]\n',
            "sub": '[permissions]\nsubscribe = ["market.>", "orders.*"]\n',
            "both": '[permissions]\npublish = ["market.>", "chat.>"]\n'
            'subscribe = ["market.>", "chat.>"]\n',
        },
    )
    handle.start()
    yield handle
    handle.close()


def plexus_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `plexus` command."""
    return subprocess.run(
        [sys.executable, "-m", "plexus", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        input=input_text,
        check=False,
    )


@contextmanager
def running_platform(home: Path, apps: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`plexus run --home HOME --apps APPS ARGS` until the block ends (then SIGTERM)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "plexus", "run", "--home", str(home), "--apps", str(apps), *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(lambda: plexus_cli("status", "--home", str(home)).returncode == 0, PROCESS_START_S)
        yield process
    finally:
        stop_process(process, 15)


def operator_token(home: Path) -> str:
    """An operator credential for the running platform of `home` (as `plexus` makes one:
    a fresh key, admitted because this process is the user's, outside every app)."""
    state = PlatformPaths.resolve(home).read_state()
    assert state is not None, f"no platform runs with home {home}"
    keys = bytes.fromhex(state["broker_key"]), bytes.fromhex(state["store_key"])
    return Credential.mint(*keys).token


def external_token(home: Path, app_id: str) -> str:
    """The credential `plexus env APP_ID` issues for an external app of the running
    platform of `home` (its manifest has no `command`)."""
    issued = plexus_cli("env", "--home", str(home), app_id, "--json")
    assert issued.returncode == 0, issued.stderr
    token: str = json.loads(issued.stdout)["PLEXUS_TOKEN"]
    return token


def operator_on(home: Path) -> Bus:
    """A Bus as the operator (`$cli`) on the running platform of `home`, own session."""
    paths = PlatformPaths.resolve(home)
    token = operator_token(home)
    return Bus.connect(paths.bus_endpoint(), P.CLI_ID, token, session=f"t{time.monotonic_ns()}")


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every regular file under `root` whose raw bytes contain `needle`."""
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]
