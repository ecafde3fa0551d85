"""User benchmark command line: Plexus through `Bus` against NATS through nats-py.

    python -m perf.bench_user [--quick] [--repeat 3] [--apps 10,100,500] [--sections ...]

Runs the harness cells of `perf.user.matrix` (floods and latencies, real platforms and
servers, worker processes) interleaved, then the confirm section (`perf.user.confirms`,
with the paced publish -> synced figures of `perf.user.synced`), the publish-calls section
(`perf.user.publish`) and the broker profile (`perf.user.profiling`); prints one table
with ratios (`perf.user.table`) and the aims of issue 11 (`perf.user.aims`) to stdout,
writes every figure to JSON, the profile to a text file, and draws the PNG
(`perf.user.plot`). Progress goes to stderr. See perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from perf.cli import environment, int_list, name_list
from perf.harness import Layout, RunResult, plan_seconds, run_one, worker_groups
from perf.report import write_json
from perf.summary import aggregate
from perf.systems import load_adapter
from perf.user import aims, confirms, matrix, profiling, publish, synced
from perf.user.plot import write_plot
from perf.user.table import (
    build_rows,
    confirm_medians,
    publish_medians,
    render,
    row_document,
)

SCHEMA = "plexus-perf/user/2"
PAYLOAD = 256
TAIL_S = 0.3
SECTIONS = ("flood", "stored", "confirm", "publish", "profile")
GROUPS = ("at-most-once", "stored")
DEFAULT_JSON = Path("perf/results/user.json")
DEFAULT_PLOT = Path("perf/results/user.png")
DEFAULT_PROFILE = Path("perf/results/user-profile.txt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options; --quick changes only what was not given explicitly."""
    ap = argparse.ArgumentParser(
        prog="python -m perf.bench_user", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="100 apps, short windows: ~2 min")
    ap.add_argument("--repeat", type=int, help="repetitions, >= 3 for medians (5; quick 3)")
    ap.add_argument("--apps", type=int_list, help="mux app counts (default 10,100,500; quick 100)")
    ap.add_argument("--rates", type=int_list, default=[1000, 10000], help="offered msg/s")
    ap.add_argument(
        "--sections",
        type=name_list,
        help=f"{','.join(SECTIONS)} (default all; quick all but profile, which make bench runs)",
    )
    ap.add_argument("--stored-layouts", type=name_list, help="procs,mux (quick: mux)")
    ap.add_argument("--duration", type=float, help="measured window, s (default 3; quick 0.5)")
    ap.add_argument("--warmup", type=float, help="unmeasured sending first, s (1; quick 0.3)")
    ap.add_argument("--gap", type=float, help="silence after a latency window, s (1; quick 0.3)")
    ap.add_argument("--confirm-seconds", type=float, help="confirm-each time per rep (3; 0.5)")
    ap.add_argument("--pipelined", type=int, help="messages per pipelined batch (20000; 3000)")
    ap.add_argument("--paced-rate", type=int, default=10_000, help="paced confirms, msg/s")
    ap.add_argument("--paced-seconds", type=float, help="paced confirm window, s (3; quick 0.5)")
    ap.add_argument("--publish-messages", type=int, help="publish calls per rep (100000; 20000)")
    ap.add_argument(
        "--routing-apps", type=int_list, help="Plexus-alone latency cells (none; quick 500)"
    )
    ap.add_argument("--profile-groups", type=name_list, help="floods to profile (both; quick 1)")
    ap.add_argument("--profile-seconds", type=float, help="profiled flood window (4; quick 2)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    ap.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"default {DEFAULT_PLOT}")
    ap.add_argument("--profile-out", type=Path, default=DEFAULT_PROFILE, help="profile text")
    args = ap.parse_args(argv)
    q = args.quick
    if args.sections is None:  # the profile costs a flood of its own: not in the 3 minutes
        args.sections = [s for s in SECTIONS if not (q and s == "profile")]
    args.repeat = args.repeat or (3 if q else 5)  # a shared box: 5 medians resist outliers
    args.apps = args.apps or ([100] if q else [10, 100, 500])
    args.stored_layouts = args.stored_layouts or (["mux"] if q else ["procs", "mux"])
    args.duration = args.duration or (0.5 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if q else 1.0)
    args.gap = args.gap if args.gap is not None else (0.3 if q else 1.0)
    args.confirm_seconds = args.confirm_seconds or (0.5 if q else 3.0)
    args.pipelined = args.pipelined or (3000 if q else 20_000)
    args.paced_seconds = args.paced_seconds or (0.5 if q else 3.0)
    args.publish_messages = args.publish_messages or (20_000 if q else 100_000)
    if args.routing_apps is None:
        args.routing_apps = [matrix.ROUTING_APPS] if q else []
    args.profile_groups = args.profile_groups or (["at-most-once"] if q else list(GROUPS))
    args.profile_seconds = args.profile_seconds or (2.0 if q else 4.0)
    for group in args.profile_groups:
        if group not in GROUPS:
            ap.error(f"unknown profile group {group!r} (known: {', '.join(GROUPS)})")
    if any(n < 2 or n % 2 for n in [*args.apps, *args.routing_apps]):
        ap.error("--apps values must be even and >= 2 (half publish, half subscribe)")
    for name in args.sections:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r} (known: {', '.join(SECTIONS)})")
    for layout in args.stored_layouts:
        if layout not in ("procs", "mux"):
            ap.error(f"unknown layout {layout!r}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    return args


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup `finally`


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def _short(system: str) -> str:
    return load_adapter(system).NAME


def _headline(r: RunResult) -> str:
    if r.status != "ok":
        return f"FAILED: {r.error}"
    parts = [f"setup {r.setup_s:.1f} s"]
    for p in r.phases:
        if p.kind == "flood":
            share = 100 * (p.delivered_fraction or 0)
            parts.append(
                f"flood {p.delivered_rate:,.0f}/s ({share:.0f}% of accepted,"
                f" blocked {100 * p.blocked_fraction:.0f}%)"
            )
        elif p.e2e is not None:
            parts.append(f"{p.name} p99 {p.e2e.p99_us / 1000:.2f} ms")
    if r.worker_errors:
        parts.append(f"errors: {r.worker_errors[0]}")
    return ", ".join(parts)


def _matrix(args: argparse.Namespace) -> list[matrix.Cell]:
    mux = args.apps if "flood" in args.sections else []
    stored: list[Layout] = []
    if "stored" in args.sections:
        stored = ["procs" if s == "procs" else "mux" for s in args.stored_layouts]
    solo = args.routing_apps if "flood" in args.sections else []
    cells = matrix.cells(mux, stored, solo)
    return [c for c in cells if c.group == "stored" or "flood" in args.sections]


def _unavailable(cells: list[matrix.Cell]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    for cell in cells:
        for system in cell.systems:
            reason = load_adapter(system).unavailable_reason()
            if reason is not None:
                reasons[system] = reason
    return reasons


def _estimate_s(order: list[tuple[matrix.Cell, Any]], args: argparse.Namespace) -> float:
    harness = 0.0
    for _cell, cfg in order:
        workers = len(worker_groups(cfg.layout, cfg.n_apps // 2))
        harness += plan_seconds(cfg.plan, cfg.tail_ns) + 5 + 0.1 * workers
    confirm = publishing = profile = 0.0
    if "confirm" in args.sections:
        confirm = 10 + args.repeat * len(confirms.SYSTEMS) * (args.confirm_seconds + 1)
        confirm += args.repeat * 2 * (args.paced_seconds + 0.5)
    if "publish" in args.sections:
        publishing = 8 + args.repeat * 2 * args.publish_messages / 50_000
    if "profile" in args.sections:
        profile = len(args.profile_groups) * (12 + args.profile_seconds)
    return harness + confirm + publishing + profile


def _profile(
    args: argparse.Namespace,
    timing: matrix.Timing,
    cells: list[matrix.Cell],
    runs: list[RunResult],
) -> list[profiling.ProfileResult]:
    """One extra flood per group with py-spy on the broker (not in the medians), in the
    group's busiest flood cell of this run (`aims.busiest`), else its 100-app mux cell."""
    out: list[profiling.ProfileResult] = []
    args.profile_out.parent.mkdir(parents=True, exist_ok=True)
    summaries = aggregate(runs)
    for group in args.profile_groups:
        cell = aims.busiest(summaries, cells, group) or matrix.Cell(
            group, "mux", matrix.HEADLINE_APPS, latency=False
        )
        t_run = time.monotonic()
        result = profiling.run_profiled(
            cell, timing, args.profile_seconds, PAYLOAD, int(TAIL_S * 1e9), args.profile_out.parent
        )
        out.append(result)
        took = f"[{time.monotonic() - t_run:.0f} s]"
        if result.status != "ok":
            _progress(f"profile {group} {cell.label}: FAILED: {result.error} {took}")
        else:
            _progress(
                f"profile {group} {cell.label}: {result.samples} samples, delivered"
                f" {result.delivered_rate:,.0f}/s {took}"
            )
    return out


def _profile_summary(result: profiling.ProfileResult) -> str:
    """The CPU split and the top functions by own time: the stdout part of the profile."""
    text = profiling.render([result]).strip()
    return text.split("\n\ntop functions by cumulative")[0]


@dataclass(slots=True)
class Measured:
    """Everything one invocation measured; filled as it goes, so an interrupted run still
    writes what it has."""

    runs: list[RunResult] = field(default_factory=list)
    confirm_runs: list[confirms.ConfirmRun] = field(default_factory=list)
    publish_runs: list[publish.PublishRun] = field(default_factory=list)
    profiles: list[profiling.ProfileResult] = field(default_factory=list)
    interrupted: bool = False

    def failed(self) -> list[Any]:
        """Every failed run of every section."""
        found: list[Any] = [r for r in self.runs if r.status != "ok"]
        found += [c for c in self.confirm_runs if c.status != "ok"]
        found += [
            c.paced for c in self.confirm_runs if c.paced is not None and c.paced.status != "ok"
        ]
        found += [r for r in self.publish_runs if r.status != "ok"]
        return found + [r for r in self.profiles if r.status != "ok"]


def _run_all(
    args: argparse.Namespace,
    cells: list[matrix.Cell],
    order: list[tuple[matrix.Cell, Any]],
    timing: matrix.Timing,
    out: Measured,
) -> None:
    """The harness runs in order, then the confirm, publish and profile sections."""
    t_section = time.monotonic()
    for i, (cell, cfg) in enumerate(order, 1):
        label = f"[{i:>3}/{len(order)}] rep {cfg.rep + 1} {cell.group:12} {cell.label:15}"
        label += f" {_short(cfg.system):13}"
        t_run = time.monotonic()
        out.runs.append(run_one(cfg))
        _progress(f"{label} {_headline(out.runs[-1])} [{time.monotonic() - t_run:.0f} s]")
    if order:
        _progress(f"harness runs took {time.monotonic() - t_section:.0f} s")
    if "confirm" in args.sections:
        t_section = time.monotonic()
        peer_missing = load_adapter(matrix.PEER["stored"]).unavailable_reason()
        wanted = [s for s in confirms.SYSTEMS if s != "jetstream" or peer_missing is None]
        warmup = min(1.0, max(0.25, args.paced_seconds / 4))
        plan = synced.Plan(args.paced_rate, warmup, args.paced_seconds)
        out.confirm_runs = confirms.run_section(
            wanted, args.repeat, args.confirm_seconds, args.pipelined, PAYLOAD, _progress, plan
        )
        _progress(f"confirm section took {time.monotonic() - t_section:.0f} s")
    if "publish" in args.sections:
        t_section = time.monotonic()
        peer_missing = load_adapter(matrix.PEER["at-most-once"]).unavailable_reason()
        wanted = [s for s in publish.SYSTEMS if s != "nats" or peer_missing is None]
        out.publish_runs = publish.run_section(
            wanted, args.repeat, args.publish_messages, PAYLOAD, _progress
        )
        _progress(f"publish section took {time.monotonic() - t_section:.0f} s")
    if "profile" in args.sections:
        out.profiles = _profile(args, timing, cells, out.runs)


def main(argv: list[str] | None = None) -> int:
    """Run everything asked for; print the tables; 0 if every run succeeded."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    cells = _matrix(args)
    unavailable = _unavailable(cells)
    for system, why in unavailable.items():
        _progress(f"skipping cells with {system}: unavailable ({why})")
    cells = [c for c in cells if not any(s in unavailable for s in c.systems)]
    reason = profiling.unavailable_reason() if "profile" in args.sections else None
    if reason is not None:
        _progress(f"skipping the profile: {reason}")
        args.sections = [s for s in args.sections if s != "profile"]
    timing = matrix.Timing(args.duration, args.warmup, args.gap)
    order = matrix.run_order(cells, args.repeat, args.rates, timing, PAYLOAD, TAIL_S)
    env = environment()
    minutes = _estimate_s(order, args) / 60
    _progress(f"{len(order)} harness runs + other sections, about {minutes:.0f} min")
    started, t_start = dt.datetime.now(dt.UTC), time.monotonic()
    measured = Measured()
    try:
        _run_all(args, cells, order, timing, measured)
    except (KeyboardInterrupt, SystemExit):
        measured.interrupted = True
        _progress("interrupted: children stopped, writing what was measured")
    m = measured
    summaries = aggregate(m.runs)
    rows = build_rows(summaries, cells, args.rates, m.confirm_runs, m.publish_runs)
    confirm_figures = confirm_medians(m.confirm_runs)
    publish_figures = publish_medians(m.publish_runs)
    found = aims.aims(summaries, cells, args.rates, confirm_figures, publish_figures)
    if m.profiles:
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        args.profile_out.write_text(profiling.render(m.profiles))
    plot_error = write_plot(args.plot, summaries, cells, args.rates) if summaries else "no runs"
    document = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "interrupted": m.interrupted,
        "git_head": _git_head(),
        "environment": env,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {
            "payload_bytes": PAYLOAD,
            "fan_out": 1,
            "topic": "bench.<i>.prices",
            "cells": cells,
            "confirm_topic": confirms.TOPIC,
            "paced": {"topic": synced.TOPIC, "rate": args.paced_rate, "tick_s": synced.TICK_S},
            "publish_topic": publish.TOPIC,
            "lmdb_group": confirms.GROUP,
        },
        "unavailable": unavailable,
        "table": [row_document(r) for r in rows],
        "aims": found,
        "summary": summaries,
        "confirm": {"medians": confirm_figures, "runs": m.confirm_runs},
        "publish": {"medians": publish_figures, "runs": m.publish_runs},
        "profile": {"file": str(args.profile_out) if m.profiles else None, "runs": m.profiles},
        "runs": m.runs,
        "plot": None if plot_error else str(args.plot),
        "plot_error": plot_error,
    }
    write_json(args.json, document)
    print(render(rows))
    print("\n" + aims.render(found))
    for r in m.profiles:
        print("\n" + _profile_summary(r))
    print()
    if m.profiles:
        print(f"profile: {args.profile_out}")
    print(f"JSON: {args.json}   plot: {args.plot if plot_error is None else plot_error}")
    print(f"elapsed {time.monotonic() - t_start:.0f} s, git {document['git_head']}")
    failed = m.failed()
    if failed:
        print(f"{len(failed)} runs failed:")
        for f in failed[:10]:
            print(f"  {getattr(f, 'system', getattr(f, 'group', '?'))}: {f.error}")
    if m.interrupted:
        return 130
    return 1 if failed else 0
