"""The profile section: py-spy on the broker during one extra flood, costs per message.

The figures say how much CPU the broker spends per delivered message; this says on
what. One more harness run of a flood cell (not counted in the medians: the sampler
costs CPU too), and during its window `py-spy record --nonblocking` samples the broker
process (`python -m broker`, found among `plexus run`'s children by its command line),
so the broker needs no change and is never paused. py-spy is started when the clock
starts, so it has attached by the end of the warm-up (the same flood, unmeasured, so its
samples count too); the interpreter threads' and libzmq's I/O threads' CPU are read from
/proc at the window's edges, which turns sample shares into µs per delivered message
(`perf.user.profile`).

py-spy comes from PyPI (perf/setup.sh installs it into the venv) and needs ptrace on
the broker: root, or kernel.yama.ptrace_scope 0 for a process of the same user. Without
it the section reports why and the rest of the benchmark runs as before.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from perf import procutil
from perf.control import die_with_parent
from perf.harness import RunConfig, run_one
from perf.model import NS_PER_S, Phase, PhasePlan
from perf.systems import BrokerHandle
from perf.user import profile
from perf.user.matrix import PLEXUS, Cell, Timing

RATE_HZ = 500  # samples/s: py-spy itself then costs ~0.07 cores here (0.14 at 1,000)
TOP = 15
FINISH_S = 30.0
WARMUP_S = 1.0  # at least: py-spy attaches during the warm-up, the flood already running
FEW_SAMPLES = 200  # below: shares are rough (py-spy starved by a busy box)
ZMQ_THREADS = "ZMQbg"  # libzmq names its I/O and reaper threads ZMQbg/IO/0, ZMQbg/Reaper
REPO = str(Path(__file__).resolve().parents[2])


def pyspy_binary() -> str | None:
    """py-spy beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def unavailable_reason() -> str | None:
    """None when py-spy is installed (whether ptrace is allowed shows when it runs)."""
    return None if pyspy_binary() else "py-spy not installed (perf/setup.sh installs it)"


@dataclass(slots=True)
class ProfileResult:
    """One profiled flood: what it delivered, the broker's CPU split, the top functions."""

    group: str
    cell: str
    status: str = "ok"
    error: str | None = None
    window_s: float = 0.0
    delivered_rate: float = 0.0
    broker_cores: float | None = None  # the broker process: both below, py-spy's span
    python_cores: float | None = None  # its interpreter threads
    zmq_cores: float | None = None  # its libzmq threads (ZMQbg/...)
    samples: int = 0
    pyspy_cores: float | None = None  # what the sampler itself cost, same span
    broker_us_per_msg: float | None = None
    python_us_per_msg: float | None = None
    zmq_us_per_msg: float | None = None
    top_own: list[profile.FunctionCost] = field(default_factory=list)
    top_cumulative: list[profile.FunctionCost] = field(default_factory=list)
    pyspy_output: str = ""


def _per_msg(cores: float | None, rate: float) -> float | None:
    return cores * 1e6 / rate if cores is not None and rate > 0 else None


class PySpyHook:
    """A `perf.harness.WindowHook`: py-spy on the broker from the start of the clock (it
    needs up to a second or two to attach on a busy box) to the end of one phase's window;
    the CPU split is read over that window."""

    def __init__(
        self, phase_name: str, raw: Path, log: Path, bound_s: float, rate_hz: int = RATE_HZ
    ) -> None:
        self._phase = phase_name
        self._bound_s = bound_s
        self._raw, self._log, self._rate = raw, log, rate_hz
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._threads: list[tuple[int, dict[str, int]]] = []  # (t_ns, cpu_ns by name)
        self._sampler_at_start = 0
        self.sampler_cpu_ns = 0  # py-spy's own CPU in the window (once it ended)
        self.error: str | None = None

    def on_start(self, broker: BrokerHandle) -> None:
        self._start(broker)

    def on_window(self, broker: BrokerHandle, phase: Phase, edge: Literal["start", "end"]) -> None:
        if phase.name != self._phase or self._proc is None or self._pid is None:
            return
        self._threads.append((time.monotonic_ns(), procutil.thread_cpu_ns(self._pid)))
        sampler = procutil.cpu_ns([self._proc.pid])
        if edge == "start":
            self._sampler_at_start = sampler
        else:
            self.sampler_cpu_ns = sampler - self._sampler_at_start
            self._proc.send_signal(signal.SIGINT)  # py-spy writes what it has and exits

    def _start(self, broker: BrokerHandle) -> None:
        binary = pyspy_binary()
        pids = broker.cpu_groups().get("broker", [])
        pid = pids[0] if pids else None
        if binary is None or pid is None:
            self.error = "no py-spy" if binary is None else "no broker process found"
            return
        self._pid = pid
        argv = [binary, "record", "--pid", str(pid), "--rate", str(self._rate)]
        argv += ["--format", "raw", "--function", "--nonblocking", "--output", str(self._raw)]
        argv += ["--duration", str(math.ceil(self._bound_s))]  # if it is never stopped
        with self._log.open("wb") as out:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # noqa: PLW1509
            )

    def span_s(self) -> float | None:
        """Seconds from the start edge to the end edge (None if py-spy never ran)."""
        if len(self._threads) < 2:
            return None
        return max(1e-9, (self._threads[-1][0] - self._threads[0][0]) / NS_PER_S)

    def finish(self) -> tuple[profile.Profile | None, float | None, float | None]:
        """Wait for py-spy; (profile, interpreter cores, libzmq cores) over its span."""
        if self._proc is None:
            return None, None, None
        try:
            self._proc.wait(FINISH_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5.0)
            self.error = "py-spy did not finish"
        try:
            lines = self._raw.read_text(errors="replace").splitlines()
        except OSError:
            self.error = self.error or f"py-spy wrote no samples: {self.output()}"
            return None, None, None
        found = profile.parse_raw(lines, [REPO])
        span_s = self.span_s()
        if span_s is None:
            return found, None, None
        first, last = self._threads[0][1], self._threads[-1][1]
        python = zmq = 0
        for name, ns in last.items():
            delta = ns - first.get(name, 0)
            if name.startswith(ZMQ_THREADS):
                zmq += delta
            else:
                python += delta
        return found, python / NS_PER_S / span_s, zmq / NS_PER_S / span_s

    def output(self) -> str:
        """What py-spy printed (its errors, e.g. ptrace refused)."""
        try:
            return " | ".join(self._log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""


def run_profiled(
    cell: Cell, timing: Timing, window_s: float, payload: int, tail_ns: int, out_dir: Path
) -> ProfileResult:
    """One flood of `cell`'s Plexus system with py-spy on the broker for its window."""
    result = ProfileResult(cell.group, cell.label, window_s=window_s)
    ns = NS_PER_S
    warmup_s = max(timing.warmup, WARMUP_S)
    plan = (PhasePlan("flood", "flood", 0, int(warmup_s * ns), int(window_s * ns), 0),)
    raw, log = out_dir / f"py-spy-{cell.group}.raw", out_dir / f"py-spy-{cell.group}.log"
    raw.unlink(missing_ok=True)
    hook = PySpyHook("flood", raw, log, bound_s=warmup_s + window_s + 30)
    cfg = RunConfig(PLEXUS[cell.group], cell.layout, cell.n_apps, 0, plan, payload, tail_ns)
    run = run_one(cfg, hook)
    found, python_cores, zmq_cores = hook.finish()
    result.pyspy_output = hook.output()
    span_s = hook.span_s()
    if span_s is not None:
        result.pyspy_cores = hook.sampler_cpu_ns / NS_PER_S / span_s
    if run.status != "ok" or not run.phases:
        result.status, result.error = "failed", run.error
        return result
    flood = run.phases[0]
    rate = flood.delivered_rate
    result.delivered_rate = rate
    result.python_cores, result.zmq_cores = python_cores, zmq_cores
    if python_cores is not None and zmq_cores is not None:
        result.broker_cores = python_cores + zmq_cores
    result.broker_us_per_msg = _per_msg(result.broker_cores, rate)
    result.python_us_per_msg = _per_msg(python_cores, rate)
    result.zmq_us_per_msg = _per_msg(zmq_cores, rate)
    if found is None or found.total == 0:
        result.status = "failed"
        result.error = hook.error or f"no samples: {result.pyspy_output}"
        return result
    result.samples = found.total
    result.top_own = profile.costs(found, result.python_us_per_msg, TOP, "own")
    result.top_cumulative = profile.costs(found, result.python_us_per_msg, TOP, "cumulative")
    return result


def _value(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(results: Sequence[ProfileResult]) -> str:
    """The text of perf/results/user-profile.txt: per profiled flood, the CPU split and
    the top functions by own and by cumulative time, in µs per delivered message."""
    parts: list[str] = []
    for r in results:
        head = f"== broker profile: flood {r.group}, {r.cell}, {r.window_s:g} s window"
        if r.status != "ok":
            parts.append(f"{head}\nFAILED: {r.error}\n")
            continue
        parts.append(
            "\n".join(
                [
                    head,
                    f"delivered {r.delivered_rate:,.0f} msg/s; broker process"
                    f" {_value(r.broker_cores, '.2f')} cores ="
                    f" {_value(r.broker_us_per_msg, '.2f')} µs per delivered msg, of which"
                    f" interpreter threads {_value(r.python_us_per_msg, '.2f')} µs"
                    f" and libzmq I/O threads {_value(r.zmq_us_per_msg, '.2f')} µs (not"
                    f" visible to py-spy); {r.samples} samples at {RATE_HZ} Hz, py-spy itself"
                    f" {_value(r.pyspy_cores, '.2f')} cores"
                    + (" (few samples: shares are rough)" if r.samples < FEW_SAMPLES else ""),
                    "",
                    profile.render_costs("top functions by own time (tottime)", r.top_own),
                    "",
                    profile.render_costs("top functions by cumulative time", r.top_cumulative),
                    "",
                ]
            )
        )
    return "\n".join(parts)
