"""Which harness runs the user benchmark makes, and in which order (pure).

Two groups of cells, each Plexus against its peer:

- `at-most-once`: Plexus `Bus` on `plexus run --no-persistence` against core NATS
  (nats-server, nats-py). A 10 + 10 process cell (flood only), and one `mux` cell per
  app count (apps in 4 processes: latency phases at each offered rate, then the flood).
- `stored`: Plexus `Bus` with persistence on against JetStream (file stream, acked push
  consumers): flood only, in the 10 + 10 process layout and with 100 apps multiplexed.

Repetition by repetition every cell runs each of its two systems back to back, the
order rotated each repetition, so a slow drift of this shared machine hits both alike.

A `solo` cell runs Plexus alone, latency phases only, for fewer repetitions: it exists to
read the broker's own routing latency with many apps (its STATS histogram) where a whole
peer comparison would not fit the time (`--quick` has one, with 500 apps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from perf.harness import Layout, RunConfig
from perf.model import NS_PER_S, PhasePlan

Group = Literal["at-most-once", "stored"]

PLEXUS = {
    "at-most-once": "perf.user.systems.plexus_bus",
    "stored": "perf.user.systems.plexus_stored",
}
PEER = {"at-most-once": "perf.systems.nats", "stored": "perf.user.systems.jetstream"}
PEER_LABEL = {"at-most-once": "nats core", "stored": "JetStream"}
PROCS_APPS = 20  # 10 publisher + 10 subscriber processes
STORED_MUX_APPS = 100
HEADLINE_APPS = 100  # the mux cell every mode has: full percentiles, the aims, the profile
ROUTING_APPS = 500  # the app count of the routing-latency aim


@dataclass(frozen=True, slots=True)
class Cell:
    """One (group, layout, apps) of the matrix and whether it has latency phases."""

    group: Group
    layout: Layout
    n_apps: int
    latency: bool
    solo: bool = False  # Plexus alone, latency phases only
    reps: int | None = None  # at most this many repetitions (None: every one)

    @property
    def systems(self) -> tuple[str, ...]:
        """(Plexus adapter, peer adapter), as module paths for the harness; a solo cell
        has only the first."""
        if self.solo:
            return (PLEXUS[self.group],)
        return PLEXUS[self.group], PEER[self.group]

    @property
    def flood(self) -> bool:
        return not self.solo

    @property
    def label(self) -> str:
        if self.layout == "procs":
            half = self.n_apps // 2
            return f"{half}+{half} procs"
        return f"{self.n_apps} apps/4 procs"


@dataclass(frozen=True, slots=True)
class Timing:
    """Window lengths of the harness phases, in seconds."""

    duration: float
    warmup: float
    gap: float


def cells(
    mux_apps: list[int],
    stored_layouts: list[Layout],
    solo_apps: list[int] | None = None,
    solo_reps: int = 1,
) -> list[Cell]:
    """The matrix: at-most-once procs + one mux cell per app count; the stored cells;
    a solo mux cell per `solo_apps` count that is not already a mux cell."""
    found = [Cell("at-most-once", "procs", PROCS_APPS, latency=False)]
    found += [Cell("at-most-once", "mux", n, latency=True) for n in mux_apps]
    for layout in stored_layouts:
        n = PROCS_APPS if layout == "procs" else STORED_MUX_APPS
        found.append(Cell("stored", layout, n, latency=False))
    for n in solo_apps or []:
        if n not in mux_apps:
            found.append(Cell("at-most-once", "mux", n, latency=True, solo=True, reps=solo_reps))
    return found


def plan_for(cell: Cell, rates: list[int], timing: Timing) -> tuple[PhasePlan, ...]:
    """Latency phases in rising rate order (if the cell has them), the flood last (if
    it has one)."""
    ns = NS_PER_S
    warm, window, gap = int(timing.warmup * ns), int(timing.duration * ns), int(timing.gap * ns)
    phases = [
        PhasePlan(f"latency@{r}", "latency", r, warm, window, gap)
        for r in (sorted(rates) if cell.latency else [])
    ]
    if cell.flood:
        phases.append(PhasePlan("flood", "flood", 0, warm, window, 0))
    return tuple(phases)


def rotated(pair: tuple[str, ...], rep: int) -> list[str]:
    """The two systems of a cell in repetition `rep`'s order."""
    k = rep % len(pair)
    return list(pair[k:] + pair[:k])


def run_order(
    matrix: list[Cell], repeat: int, rates: list[int], timing: Timing, payload: int, tail_s: float
) -> list[tuple[Cell, RunConfig]]:
    """Every run, interleaved: repetition, then cell, then the cell's systems rotated."""
    order: list[tuple[Cell, RunConfig]] = []
    tail_ns = int(tail_s * NS_PER_S)
    for rep in range(repeat):
        for cell in matrix:
            if cell.reps is not None and rep >= cell.reps:
                continue
            plan = plan_for(cell, rates, timing)
            for system in rotated(cell.systems, rep):
                cfg = RunConfig(system, cell.layout, cell.n_apps, rep, plan, payload, tail_ns)
                order.append((cell, cfg))
    return order
