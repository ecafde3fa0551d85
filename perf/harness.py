"""Runs one (system, layout, apps, repetition) and turns worker counters into results.

Order of a run: start the broker; get the credentials of every worker's apps from it
(`BrokerHandle.credentials`, before any worker starts, so not in the setup time); spawn
every worker (multiprocessing "spawn", so each is a fresh interpreter like a real app);
wait until all are connected and subscribed; publish t0 a little in the future; sleep
through the schedule, waking only at window edges to read the broker's and the machine's
CPU time; collect the reports; ask the broker for its routing latency; tear everything
down. The harness itself does nothing else while a window is open.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_mod
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Literal, Protocol

from perf import procutil
from perf.control import ABORTED, Message, QueueControl, worker_main
from perf.model import (
    NS_PER_S,
    LatencySummary,
    Phase,
    PhasePlan,
    Role,
    Schedule,
    WorkerReport,
    WorkerSpec,
    build_schedule,
    summarize_ns,
)
from perf.systems import BrokerConfig, BrokerHandle, load_adapter
from perf.workload import sleep_until

Layout = Literal["procs", "mux"]
MUX_PROCS_PER_SIDE = 2
MAX_ERRORS = 10


@dataclass(frozen=True, slots=True)
class RunConfig:
    """One cell of the benchmark matrix, one repetition."""

    system: str
    layout: Layout
    n_apps: int
    rep: int
    plan: tuple[PhasePlan, ...]
    payload_size: int
    tail_ns: int


@dataclass(slots=True)
class PhaseResult:
    """What one phase of one run measured (all rates in msg/s, summed over apps)."""

    name: str
    kind: str
    offered_rate: int  # 0 for the flood
    window_s: float
    sent: int  # publishers, inside the window
    delivered: int  # latency: tagged & sent in window; flood: arrived in window
    sent_rate: float
    delivered_rate: float
    delivered_fraction: float | None
    blocked_fraction: float  # mean share of the window publishers waited on the transport
    late_fraction: float  # paced messages sent > 1 ms behind schedule
    max_lag_ms: float
    e2e: LatencySummary | None
    routing: LatencySummary | None
    broker_cores: float  # broker CPU during the window, in cores
    broker_cpu_us_per_msg: float | None
    host_busy: float  # share of all CPUs busy during the window
    workers_cores: float  # CPU used by all publisher and subscriber processes, in cores
    other_cores: float  # CPU used by anything else on the machine (noise), in cores
    edge_skew_ms: float  # how late the harness sampled the CPU counters
    process_cores: dict[str, float] = field(default_factory=dict)  # BrokerHandle.cpu_groups


@dataclass(slots=True)
class RunResult:
    """One run: ok with phases, or failed with the reason."""

    system: str
    layout: Layout
    n_apps: int
    rep: int
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    setup_s: float = 0.0  # spawn + connect + subscribe of all workers
    phases: list[PhaseResult] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)


class RunError(RuntimeError):
    """The run cannot produce trustworthy figures (worker died, timed out, ...)."""


class WindowHook(Protocol):
    """Something the caller of `run_one` wants done when the clock starts and at each
    window edge, after the CPU counters were read and the broker's own `on_window` ran
    (e.g. attach a profiler to the broker, which takes a while, before the flood's window,
    and stop it at the window's end). It runs inside the run: keep it cheap."""

    def on_start(self, broker: BrokerHandle) -> None:
        """Called once every worker is ready and t0 is set, before the first warm-up."""

    def on_window(self, broker: BrokerHandle, phase: Phase, edge: Literal["start", "end"]) -> None:
        """Called at the start and at the end of every phase's window."""


@dataclass(frozen=True, slots=True)
class _Edge:
    t_ns: int  # when sampled (the harness may wake late on a saturated box)
    cpu_ns: int  # broker, all threads
    workers: int  # clock ticks, all worker processes
    host: tuple[int, int]  # (busy, total) clock ticks, whole machine
    groups: dict[str, int]  # cpu_ns of each of the broker's process groups

    @classmethod
    def now(
        cls, broker_pids: list[int], worker_pids: list[int], groups: dict[str, list[int]]
    ) -> _Edge:
        return cls(
            time.monotonic_ns(),
            procutil.cpu_ns(broker_pids),
            procutil.process_jiffies(worker_pids),
            procutil.host_jiffies(),
            {name: procutil.cpu_ns(pids) for name, pids in groups.items()},
        )


def worker_groups(layout: Layout, n_pairs: int) -> list[tuple[Role, tuple[int, ...]]]:
    """Which pairs each worker process serves: one each, or split over 2 + 2 processes."""
    if layout == "procs":
        subs: list[tuple[Role, tuple[int, ...]]] = [("sub", (i,)) for i in range(n_pairs)]
        return subs + [("pub", (i,)) for i in range(n_pairs)]
    chunks = [tuple(range(n_pairs))[k::MUX_PROCS_PER_SIDE] for k in range(MUX_PROCS_PER_SIDE)]
    groups: list[tuple[Role, tuple[int, ...]]] = [("sub", c) for c in chunks if c]
    return groups + [("pub", c) for c in chunks if c]


def plan_seconds(plan: tuple[PhasePlan, ...], tail_ns: int) -> float:
    """Length of the clocked part of a run."""
    return (sum(p.warmup_ns + p.measure_ns + p.gap_ns for p in plan) + tail_ns) / NS_PER_S


def run_one(cfg: RunConfig, hook: WindowHook | None = None) -> RunResult:
    """Run one configuration; never raises except on KeyboardInterrupt/SystemExit."""
    result = RunResult(cfg.system, cfg.layout, cfg.n_apps, cfg.rep)
    groups = worker_groups(cfg.layout, cfg.n_apps // 2)
    ready_timeout = 30.0 + 0.25 * len(groups)
    max_seconds = ready_timeout + plan_seconds(cfg.plan, cfg.tail_ns) + 90.0
    workdir = Path(tempfile.mkdtemp(prefix="plexus-perf-"))
    ctx = mp.get_context("spawn")
    q: Queue[Message] = ctx.Queue()
    procs: list[BaseProcess] = []
    broker: BrokerHandle | None = None
    try:
        broker = load_adapter(cfg.system).start_broker(
            BrokerConfig(workdir, max_seconds, cfg.n_apps)
        )
        go, t0 = ctx.Event(), ctx.Value("q", 0)
        specs = [
            WorkerSpec(
                cfg.system,
                role,
                wid,
                pairs,
                cfg.n_apps // 2,
                broker.endpoint,
                cfg.payload_size,
                broker.credentials(role, pairs),
            )
            for wid, (role, pairs) in enumerate(groups)
        ]
        t_setup = time.monotonic()
        for wid, spec in enumerate(specs):
            ctl = QueueControl(
                worker_id=wid, queue=q, go=go, t0=t0, plan=cfg.plan, tail_ns=cfg.tail_ns
            )
            proc = ctx.Process(
                target=worker_main,
                args=(cfg.system, spec, ctl, int(max_seconds)),
                name=f"perf-{cfg.system}-{spec.role}{wid}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        try:
            _await_ready(q, procs, ready_timeout)
        except RunError:
            t0.value = ABORTED
            go.set()
            raise
        result.setup_s = time.monotonic() - t_setup
        start = time.monotonic_ns() + int((0.5 + 0.005 * len(procs)) * NS_PER_S)
        t0.value = start
        go.set()
        if hook is not None:
            hook.on_start(broker)
        schedule = build_schedule(cfg.plan, start, cfg.tail_ns)
        worker_pids = [p.pid for p in procs if p.pid is not None]
        edges = _observe(schedule, broker, broker.pids(), worker_pids, hook)
        reports = _collect(q, procs, deadline_s=15.0 + 0.05 * len(procs))
        routing = broker.routing_latency(schedule.phases)
        result.phases = [
            _phase_result(p, reports, edges[p.index], routing.get(p.name)) for p in schedule.phases
        ]
        result.worker_errors = sorted({e for r in reports for e in r.errors})[:MAX_ERRORS]
    except RunError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        _reap(procs)
        with contextlib.suppress(Exception):
            q.close()
            q.cancel_join_thread()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _await_ready(q: Queue[Message], procs: list[BaseProcess], timeout_s: float) -> None:
    ready: set[int] = set()
    deadline = time.monotonic() + timeout_s
    strikes = 0  # a worker may exit just after our get() timed out: look twice
    while len(ready) < len(procs):
        try:
            kind, wid, report = q.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in ready]
            strikes = strikes + 1 if dead else 0
            if strikes > 1:
                raise RunError(
                    f"worker {dead[0]} exited with {procs[dead[0]].exitcode} before ready"
                ) from None
            if time.monotonic() > deadline:
                raise RunError(
                    f"only {len(ready)}/{len(procs)} workers ready after {timeout_s:.0f} s"
                ) from None
            continue
        if kind == "report" and report is not None:
            raise RunError(f"worker {wid} failed before start: {'; '.join(report.errors)}")
        ready.add(wid)


def _observe(
    schedule: Schedule,
    broker: BrokerHandle,
    broker_pids: list[int],
    worker_pids: list[int],
    hook: WindowHook | None,
) -> list[tuple[_Edge, _Edge]]:
    """Sleep through the schedule, sampling CPU counters at each window edge."""
    edges: list[tuple[_Edge, _Edge]] = []
    groups = broker.cpu_groups()
    for phase in schedule.phases:
        sleep_until(phase.window_start_ns)
        first = _Edge.now(broker_pids, worker_pids, groups)
        broker.on_window(phase, "start")
        if hook is not None:
            hook.on_window(broker, phase, "start")
        sleep_until(phase.window_end_ns)
        last = _Edge.now(broker_pids, worker_pids, groups)
        broker.on_window(phase, "end")
        if hook is not None:
            hook.on_window(broker, phase, "end")
        edges.append((first, last))
    sleep_until(schedule.end_ns)
    return edges


def _collect(q: Queue[Message], procs: list[BaseProcess], deadline_s: float) -> list[WorkerReport]:
    reports: dict[int, WorkerReport] = {}
    deadline = time.monotonic() + deadline_s
    strikes = 0
    while len(reports) < len(procs):
        try:
            kind, wid, report = q.get(timeout=0.5)
        except queue_mod.Empty:
            silent = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in reports]
            strikes = strikes + 1 if silent else 0
            if strikes > 1 or time.monotonic() > deadline:
                missing = len(procs) - len(reports)
                raise RunError(
                    f"{missing} workers did not report (e.g. worker {silent[:1]})"
                ) from None
            continue
        if kind == "report" and report is not None:
            if not report.tallies:
                raise RunError(f"worker {wid} failed: {'; '.join(report.errors)}")
            reports[wid] = report
    return list(reports.values())


def _reap(procs: list[BaseProcess]) -> None:
    """SIGTERM every live worker, then SIGKILL what is left; join them all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 3.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(1.0)


def _phase_result(
    phase: Phase,
    reports: list[WorkerReport],
    edges: tuple[_Edge, _Edge],
    routing: LatencySummary | None,
) -> PhaseResult:
    pubs = [r.tallies[phase.index] for r in reports if r.role == "pub"]
    subs = [r.tallies[phase.index] for r in reports if r.role == "sub"]
    window_s = phase.window_s
    sent = sum(t.sent_in_window for t in pubs)
    if phase.kind == "flood":
        delivered = sum(t.arrived_in_window for t in subs)
        e2e = None
    else:
        delivered = sum(t.received_in_window for t in subs)
        e2e = summarize_ns([x for t in subs for x in t.latencies_ns])
    first, last = edges
    # CPU figures are rates over the span actually sampled, which can be later
    # than the nominal window when the machine is saturated (see edge_skew_ms).
    span_s = max(1e-9, (last.t_ns - first.t_ns) / NS_PER_S)
    broker_cores = (last.cpu_ns - first.cpu_ns) / NS_PER_S / span_s
    busy = last.host[0] - first.host[0]
    total = last.host[1] - first.host[1]
    workers_cores = (last.workers - first.workers) / procutil.TICKS_PER_S / span_s
    other_cores = busy / procutil.TICKS_PER_S / span_s - workers_cores - broker_cores
    skew_ns = max(first.t_ns - phase.window_start_ns, last.t_ns - phase.window_end_ns)
    blocked = sum(min(t.blocked_ns, phase.window_end_ns - phase.window_start_ns) for t in pubs)
    return PhaseResult(
        name=phase.name,
        kind=phase.kind,
        offered_rate=phase.rate,
        window_s=window_s,
        sent=sent,
        delivered=delivered,
        sent_rate=sent / window_s,
        delivered_rate=delivered / window_s,
        delivered_fraction=delivered / sent if sent else None,
        blocked_fraction=blocked / (len(pubs) * window_s * NS_PER_S) if pubs else 0.0,
        late_fraction=sum(t.late for t in pubs) / sent if sent else 0.0,
        max_lag_ms=max((t.max_lag_ns for t in pubs), default=0) / 1e6,
        e2e=e2e,
        routing=routing,
        broker_cores=broker_cores,
        broker_cpu_us_per_msg=broker_cores * window_s * 1e6 / delivered if delivered else None,
        host_busy=busy / total if total else 0.0,
        workers_cores=workers_cores,
        other_cores=max(0.0, other_cores),
        edge_skew_ms=skew_ns / 1e6,
        process_cores={
            name: (last.groups[name] - ns) / NS_PER_S / span_s for name, ns in first.groups.items()
        },
    )
