"""Routing benchmark command line: the same pub/sub workload on several systems, one run.

    python -m perf.bench_routing [--quick] [--systems bare,nats,mosquitto] ...

Cells (system x layout x apps) are run interleaved, repetition by repetition,
with the system order rotated each repetition, so slow drift of the machine
hits every system alike. Progress goes to stderr, the tables to stdout, every
figure to the JSON file. See perf/README.md for what is measured and why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from perf import procutil
from perf.harness import Layout, RunConfig, RunResult, plan_seconds, run_one, worker_groups
from perf.model import NS_PER_S, PhasePlan
from perf.report import render, write_json
from perf.summary import aggregate
from perf.systems import BASELINE, adapter_names, load_adapter

DEFAULT_JSON = Path("perf/results/routing.json")
PAYLOAD = 256
SCHEMA = "plexus-perf/routing/1"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; --quick only changes what was not given explicitly."""
    ap = argparse.ArgumentParser(
        prog="python -m perf.bench_routing", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--systems", type=name_list, help="comma list (default: all available)")
    ap.add_argument(
        "--apps",
        type=int_list,
        help="connected apps per cell, half publishers (default 10,100,500)",
    )
    ap.add_argument("--layouts", type=name_list, default=["procs", "mux"], help="procs,mux")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per cell (>= 3 for medians)")
    ap.add_argument("--duration", type=float, help="measured window per phase, s (default 3)")
    ap.add_argument(
        "--warmup", type=float, help="unmeasured sending before each window, s (default 1)"
    )
    ap.add_argument("--gap", type=float, help="silence after a latency window, s (default 1)")
    ap.add_argument(
        "--rates",
        type=int_list,
        default=[1000, 10000],
        help="offered total msg/s of the latency phases",
    )
    ap.add_argument(
        "--quick", action="store_true", help="apps 10,100 and short windows: a few minutes"
    )
    ap.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"result file (default {DEFAULT_JSON})"
    )
    args = ap.parse_args(argv)
    quick = args.quick
    args.apps = args.apps or ([10, 100] if quick else [10, 100, 500])
    args.duration = args.duration or (1.0 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.gap = args.gap if args.gap is not None else (0.5 if quick else 1.0)
    for layout in args.layouts:
        if layout not in ("procs", "mux"):
            ap.error(f"unknown layout {layout!r}")
    if any(n < 2 or n % 2 for n in args.apps):
        ap.error("--apps values must be even and >= 2 (half publish, half subscribe)")
    if args.repeat < 1 or args.duration <= 0:
        ap.error("--repeat must be >= 1 and --duration > 0")
    return args


def build_plan(
    rates: list[int], duration: float, warmup: float, gap: float
) -> tuple[PhasePlan, ...]:
    """Latency phases in rising rate order, the flood last (its backlog harms nobody)."""
    ns = NS_PER_S
    phases = [
        PhasePlan(f"latency@{r}", "latency", r, int(warmup * ns), int(duration * ns), int(gap * ns))
        for r in sorted(rates)
    ]
    phases.append(PhasePlan("flood", "flood", 0, int(warmup * ns), int(duration * ns), 0))
    return tuple(phases)


def choose_systems(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(usable systems in run order, unavailable name -> reason)."""
    known = adapter_names()
    unavailable: dict[str, str] = {}
    usable: list[str] = []
    for name in requested or known:
        if name not in known:
            unavailable[name] = f"no adapter perf/systems/{name}.py"
            continue
        reason = load_adapter(name).unavailable_reason()
        if reason is None:
            usable.append(name)
        else:
            unavailable[name] = reason
    return usable, unavailable


def interleaved(
    args: argparse.Namespace, systems: list[str], plan: tuple[PhasePlan, ...], tail_ns: int
) -> list[RunConfig]:
    """Run order: repetition by repetition, each cell for every system back to back,
    the system order rotated each repetition."""
    order: list[RunConfig] = []
    for rep in range(args.repeat):
        k = rep % len(systems) if systems else 0
        rotated = systems[k:] + systems[:k]
        for n_apps in args.apps:
            for layout in args.layouts:
                lay: Layout = "procs" if layout == "procs" else "mux"
                order += [RunConfig(s, lay, n_apps, rep, plan, PAYLOAD, tail_ns) for s in rotated]
    return order


def _groups(cfg: RunConfig) -> list[tuple[str, tuple[int, ...]]]:
    return list(worker_groups(cfg.layout, cfg.n_apps // 2))


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment() -> dict[str, Any]:
    """Machine and versions, for reading the JSON on another day."""
    packages: dict[str, str | None] = {}
    for pkg in ("pyzmq", "nats-py", "paho-mqtt", "msgpack"):
        try:
            packages[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            packages[pkg] = None
    import zmq

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libzmq": zmq.zmq_version(),
        "packages": packages,
        "nats-server": _version(["nats-server", "--version"]),
        "mosquitto": _version(["mosquitto", "-h"]),
        "fd_limit": procutil.raise_fd_limit(),
    }


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup `finally`


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _headline(r: RunResult) -> str:
    if r.status != "ok":
        return f"FAILED: {r.error}"
    parts = [f"setup {r.setup_s:.1f} s"]
    for p in r.phases:
        if p.kind == "flood":
            parts.append(f"flood {p.delivered_rate:,.0f}/s")
        elif p.e2e is not None:
            share = 100 * (p.delivered_fraction or 0)
            parts.append(f"{p.name} p99 {p.e2e.p99_us / 1000:.2f} ms ({share:.0f}%)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, print the tables, write the JSON; 0 if every run succeeded."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    systems, unavailable = choose_systems(args.systems)
    for name, reason in unavailable.items():
        _progress(f"skipping {name}: unavailable ({reason})")
    plan = build_plan(args.rates, args.duration, args.warmup, args.gap)
    tail_ns = int(0.3 * NS_PER_S)
    env = environment()
    matrix = interleaved(args, systems, plan, tail_ns)
    total = len(matrix)
    estimate = sum(plan_seconds(plan, tail_ns) + 3 + 0.1 * len(_groups(c)) for c in matrix)
    _progress(
        f"{total} runs, about {estimate / 60:.0f} min; systems: {', '.join(systems) or 'none'}"
    )
    started, t_start = dt.datetime.now(dt.UTC), time.monotonic()
    runs: list[RunResult] = []
    interrupted = False
    try:
        for i, cfg in enumerate(matrix, 1):
            label = f"[{i:>3}/{total}] rep {cfg.rep + 1} {cfg.layout:5} {cfg.n_apps:>4} apps"
            label += f" {cfg.system:10}"
            _progress(f"{label} starting broker + {len(_groups(cfg))} worker processes")
            t_run = time.monotonic()
            runs.append(run_one(cfg))
            _progress(f"{label} {_headline(runs[-1])} [{time.monotonic() - t_run:.0f} s]")
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
        _progress("interrupted: children stopped, writing what was measured")
    summary = aggregate(runs)
    failed = [r for r in runs if r.status != "ok"]
    document = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "interrupted": interrupted,
        "environment": env,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {
            "payload_bytes": PAYLOAD,
            "fan_out": 1,
            "topic": "bench.<i>.prices",
            "baseline": BASELINE,
            "phases": plan,
            "tail_s": tail_ns / NS_PER_S,
        },
        "systems": {name: {"available": True, "reason": None} for name in systems}
        | {name: {"available": False, "reason": reason} for name, reason in unavailable.items()},
        "summary": summary,
        "runs": runs,
    }
    write_json(args.json, document)
    print(render(summary, BASELINE, unavailable, failed))
    _progress(f"wrote {args.json} after {time.monotonic() - t_start:.0f} s")
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
