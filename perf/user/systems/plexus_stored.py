"""Adapter `plexus_stored`: `plexus_bus` on a platform with persistence on (the default).

Every message is stored by the persistence service (group commits, synced) and every
delivery is acknowledged by the subscriber's client (a Bus in `procs`, an AsyncBus on the
worker's loop in `mux`) after its handler returns: the acknowledged-and-persisted flood,
set against NATS JetStream (`jetstream`).
"""

from __future__ import annotations

from perf.model import WorkerSpec
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.user.systems import plexus_bus as base

NAME = "plexus_stored"


def unavailable_reason() -> str | None:
    return base.unavailable_reason()


def start_broker(config: BrokerConfig) -> BrokerHandle:
    """`plexus run` (persistence on) with one manifest per bench app."""
    return base.start_platform(config, persistence=True)


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    base.publisher_worker(spec, ctl)


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    base.subscriber_worker(spec, ctl)
