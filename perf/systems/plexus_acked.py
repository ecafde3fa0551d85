"""Adapter `plexus_acked`: the `plexus` workload with acknowledged delivery.

Subscriber sessions keep the default `ack: true`: the broker tracks every delivery in the
session's in-flight window until the subscriber's ACK (one per DELIVER received, as the
Python client batches them). Beside `plexus` in one run, it shows what reliability costs.
"""

from __future__ import annotations

from perf.model import WorkerSpec
from perf.systems import BrokerConfig, BrokerHandle, WorkerControl
from perf.systems import plexus as base

NAME = "plexus_acked"


def unavailable_reason() -> str | None:
    return base.unavailable_reason()


def start_broker(config: BrokerConfig) -> BrokerHandle:
    return base.start_broker(config)


def publisher_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    base.run_publisher(spec, ctl)


def subscriber_worker(spec: WorkerSpec, ctl: WorkerControl) -> None:
    base.run_subscriber(spec, ctl, acked=True)
