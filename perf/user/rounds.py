"""Interleaved rounds over systems started once: the loop of the single-publisher sections.

The confirm and publish sections each start every system once (a platform, a server, a
database), warm it up, then run `repeat` rounds in which every started system is
measured once, the order rotated each round so a busy moment of a shared box does not
always hit the same system; a system that does not start gets a failed result per round
instead of stopping the section, and every system is closed at the end, whatever
happened, its working directory removed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar


class Closeable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=Closeable)
R = TypeVar("R")


def interleaved(
    section: str,
    systems: list[str],
    factories: Mapping[str, Callable[[Path], T]],
    warm_up: Callable[[T], None],
    measure: Callable[[T, int], R],
    failed: Callable[[str, int, str], R],
    describe: Callable[[R], str],
    repeat: int,
    progress: Callable[[str], None],
) -> list[R]:
    """Results of `measure(target, rep)` for every started system and round, and
    `failed(name, rep, error)` per round for a system that did not start."""
    root = Path(tempfile.mkdtemp(prefix=f"px-user-{section}-"))
    targets: dict[str, T] = {}
    runs: list[R] = []
    width = max((len(name) for name in systems), default=0)
    try:
        for name in systems:
            workdir = root / name
            workdir.mkdir()
            try:
                targets[name] = factories[name](workdir)
                warm_up(targets[name])
            except Exception as exc:
                progress(f"{section}: {name} did not start: {type(exc).__name__}: {exc}")
                runs += [failed(name, rep, f"start: {exc}") for rep in range(repeat)]
        started = [name for name in systems if name in targets]
        for rep in range(repeat):
            k = rep % len(started) if started else 0
            for name in started[k:] + started[:k]:
                run = measure(targets[name], rep)
                runs.append(run)
                progress(f"{section} rep {rep + 1} {name:{width}} {describe(run)}")
    finally:
        for target in targets.values():
            target.close()
        shutil.rmtree(root, ignore_errors=True)
    return runs
