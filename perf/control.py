"""The harness <-> worker line: one queue up, one event plus one shared integer down.

Workers put ("ready", id, None) and later ("report", id, WorkerReport) on a
shared multiprocessing queue. The harness starts a run by writing t0 (monotonic
ns, a little in the future) into a shared integer and setting an event; a t0 of
-1 means "aborted". Every worker then derives the same Schedule from the same
plan, so nothing else has to be sent while the clock runs and the harness can
sleep through the measured windows.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Literal

from perf.model import PhasePlan, Schedule, WorkerReport, WorkerSpec, build_schedule

Message = tuple[Literal["ready", "report"], int, WorkerReport | None]
ABORTED = -1
_PR_SET_PDEATHSIG = 1


def _find_prctl() -> Callable[..., int] | None:
    # Resolved once at import: a preexec_fn runs between fork and exec, where
    # dlopen/dlsym could deadlock on a lock held by another thread of the parent.
    try:
        fn: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return fn


_PRCTL = _find_prctl()


class QueueControl:
    """WorkerControl over multiprocessing primitives (picklable at spawn time)."""

    def __init__(
        self,
        *,
        worker_id: int,
        queue: Queue[Message],
        go: Event,
        t0: Synchronized[int],
        plan: tuple[PhasePlan, ...],
        tail_ns: int,
    ) -> None:
        self.worker_id = worker_id
        self._queue = queue
        self._go = go
        self._t0 = t0
        self._plan = plan
        self._tail_ns = tail_ns

    def ready(self) -> None:
        self._queue.put(("ready", self.worker_id, None))

    def wait_start(self, timeout_s: float) -> Schedule | None:
        if not self._go.wait(timeout_s):
            return None
        t0 = int(self._t0.value)
        if t0 == ABORTED:
            return None
        return build_schedule(self._plan, t0, self._tail_ns)

    def report(self, report: WorkerReport) -> None:
        self._queue.put(("report", self.worker_id, report))


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (no orphans,
    even if the harness is killed with SIGKILL). Linux only; a no-op elsewhere."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def worker_main(adapter_name: str, spec: WorkerSpec, ctl: QueueControl, max_seconds: int) -> None:
    """Entry point of every worker process (target of multiprocessing.Process).

    The harness owns cleanup, so Ctrl-C is ignored here; SIGALRM (default action:
    terminate) bounds the worker's life even if the harness forgot it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    signal.alarm(max_seconds)
    from perf.systems import load_adapter

    try:
        adapter = load_adapter(adapter_name)
        run = adapter.publisher_worker if spec.role == "pub" else adapter.subscriber_worker
        run(spec, ctl)
    except Exception as exc:  # reported, not raised: the harness must hear about it
        ctl.report(WorkerReport(spec.worker_id, spec.role, [], [f"{type(exc).__name__}: {exc}"]))
