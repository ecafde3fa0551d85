"""The contract between the routing benchmark and one compared message system.

An adapter is one public module in this package (``perf/systems/<name>.py``);
modules whose name starts with ``_`` are helpers and are not adapters. Adding a
system (e.g. ``plexus``) means writing one module with these four names::

    NAME: str  # the system's name on the command line and in the results

    def unavailable_reason() -> str | None:
        # Cheap check, run in the harness: None if usable, else a one-line reason
        # ("nats-server not found"). Must not import the client library eagerly.

    def start_broker(config: BrokerConfig) -> BrokerHandle:
        # Start the broker (a child process), wait until it accepts clients,
        # return a handle. Called once per run, in the harness process. The broker
        # must stop by itself after config.max_seconds even if never stopped.

    def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
        # Run inside a fresh worker process (multiprocessing "spawn"). Connect one
        # socket/connection per pair in spec.pairs to spec.endpoint (subscribers
        # also subscribe to topic_for(pair) and wait until that is in effect where
        # the protocol allows), then:
        #     ctl.ready()
        #     schedule = ctl.wait_start(timeout_s)   # None: the run was aborted, return
        #     ... follow the schedule ...
        #     ctl.report(WorkerReport(...))          # exactly once
        # perf.workload.publish_schedule / subscribe_schedule do the "follow the
        # schedule" part for any blocking-socket client; see SyncPublisher and
        # SyncSubscriber there. An asyncio client reuses Pacer and Recorder.

The harness, per run: ``start_broker`` -> ``BrokerHandle.credentials`` of every worker
(handed over in ``WorkerSpec.credentials``) -> spawn workers -> wait for every
``ready`` -> publish t0 -> at each measurement window edge read the broker's CPU
time (``BrokerHandle.pids``) and call ``BrokerHandle.on_window`` -> collect the
reports -> ``BrokerHandle.routing_latency`` -> ``BrokerHandle.stop``.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol, cast

from perf.model import LatencySummary, Phase, Role, Schedule, WorkerReport, WorkerSpec

BASELINE = "bare"

__all__ = [
    "BASELINE",
    "Adapter",
    "BrokerConfig",
    "BrokerHandle",
    "WorkerControl",
    "adapter_names",
    "load_adapter",
]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where and for how long a broker may live."""

    workdir: Path  # private temp dir of this run (ipc sockets, config files, logs)
    max_seconds: float  # hard bound: the broker must be gone after this
    n_apps: int  # connections to expect (for limits such as max_connections)


class BrokerHandle(abc.ABC):
    """A running broker, owned by the harness process."""

    endpoint: str  # handed to every worker as WorkerSpec.endpoint

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """OS processes whose CPU time is "the broker's" (read via /proc)."""

    def cpu_groups(self) -> dict[str, list[int]]:
        """The processes of `pids()` by role (e.g. "broker", "persistence", "plexus" for
        the supervisor), each group's CPU sampled at the window edges beside the total, so
        a table can show the broker process alone. {} (the default): no split."""
        return {}

    def credentials(self, role: Role, pairs: tuple[int, ...]) -> tuple[str, ...]:
        """The credentials of the apps of one worker, one per pair in `pairs` order
        (WorkerSpec.credentials). Called in the harness for every worker before any is
        spawned, so it may take time without counting as setup. () (the default): the
        system authenticates nobody."""
        return ()

    def on_window(self, phase: Phase, edge: Literal["start", "end"]) -> None:  # noqa: B027
        """Called at each measurement window edge; e.g. snapshot broker counters.

        Runs inside the measured time, so it must be cheap (no sorting, no I/O
        beyond one small request).
        """

    def routing_latency(self, phases: Sequence[Phase]) -> dict[str, LatencySummary]:
        """In-broker routing latency per phase name (message in -> last send out).

        Called once after the workers have reported, before stop(). Systems whose
        broker cannot tell return {} (the default) and the field stays empty.
        """
        return {}

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the broker and reap its processes; must not raise if already dead."""


class WorkerControl(Protocol):
    """A worker's line to the harness (implemented by perf.control.QueueControl)."""

    def ready(self) -> None:
        """Every socket of this worker is connected (and subscribed)."""

    def wait_start(self, timeout_s: float) -> Schedule | None:
        """Block until the harness starts the run; None if it aborted or timed out."""

    def report(self, report: WorkerReport) -> None:
        """Hand the final counters to the harness (call exactly once)."""


class Adapter(Protocol):
    """The shape of an adapter module (checked at load time, see load_adapter)."""

    NAME: str

    def unavailable_reason(self) -> str | None: ...

    def start_broker(self, config: BrokerConfig) -> BrokerHandle: ...

    def publisher_worker(self, spec: WorkerSpec, ctl: WorkerControl) -> None: ...

    def subscriber_worker(self, spec: WorkerSpec, ctl: WorkerControl) -> None: ...


_REQUIRED = ("NAME", "unavailable_reason", "start_broker", "publisher_worker", "subscriber_worker")


def adapter_names() -> list[str]:
    """Module names of all adapters, the baseline first, the rest sorted."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return sorted(found, key=lambda n: (n != BASELINE, n))


def load_adapter(name: str) -> Adapter:
    """Import adapter module `name` and check that it has the four names above.

    A dotted `name` is a full module path: adapters of another benchmark (perf/user/)
    reuse the harness without joining this package's list of routing systems.
    """
    module: ModuleType = importlib.import_module(name if "." in name else f"{__name__}.{name}")
    missing = [attr for attr in _REQUIRED if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"adapter {name!r} lacks {', '.join(missing)}")
    return cast(Adapter, module)
