"""Where the broker's CPU per delivered message goes: py-spy samples turned into µs (pure).

py-spy (`record --format raw --function`) writes one line per distinct stack,
`frame;frame;...;leaf COUNT`, root first, each frame `function (file:first line)`, idle
samples left out, so a count is time the interpreter's threads were on a CPU. A
function's own time (py-spy's "self", cProfile's tottime) is the samples where it is
the leaf; its cumulative time the samples where it is anywhere on the stack (once per
stack, so recursion is not counted twice).

Samples give shares, not times: py-spy misses samples on a busy box and sees only the
threads that run Python. So a share is turned into µs per delivered message with the
broker's measured CPU in the same window: the interpreter threads' CPU (schedstat,
threads not named ZMQbg/...) ÷ delivered messages. libzmq's own I/O threads are shown
as one line beside it: py-spy cannot see inside them. Without `--native`, time in a C
extension (pyzmq's Cython send, msgpack) counts as the own time of the Python function
that called it, e.g. `Socket.send` holds the libzmq send call.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")
SITE_MARKERS = ("/site-packages/", "/lib/python3")
_DATACLASS_INIT = "__create_fn__.<locals>.__init__"  # what py-spy names a generated __init__


@dataclass(frozen=True, slots=True)
class Profile:
    """Sample counts of one recording: per frame, as leaf and anywhere on the stack."""

    total: int
    own: Counter[str]
    cumulative: Counter[str]


@dataclass(frozen=True, slots=True)
class FunctionCost:
    """One function's share of the samples and what that is per delivered message."""

    frame: str
    own_share: float
    cumulative_share: float
    own_us: float | None  # µs of the interpreter threads' CPU per delivered message
    cumulative_us: float | None


def short_frame(frame: str, roots: Sequence[str] = ()) -> str:
    """`function (file:line)` with the file relative to one of `roots` (the repository)
    or to site-packages / the standard library, so a table stays readable."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    if match["function"] == _DATACLASS_INIT and match["file"] == "<string>":
        return "__init__ of a dataclass (generated)"
    return f"{match['function']} ({_short_path(match['file'], roots)}:{match['line']})"


def _short_path(path: str, roots: Sequence[str]) -> str:
    for marker in SITE_MARKERS:  # first: the virtual environment may sit in the repository
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[-1] if marker == "/lib/python3" else rest
    for root in roots:
        prefix = root.rstrip("/") + "/"
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def parse_raw(lines: Iterable[str], roots: Sequence[str] = ()) -> Profile:
    """Counts from py-spy's raw (collapsed stack) output; malformed lines are skipped."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short_frame(f, roots) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    return Profile(total, own, cumulative)


def is_wrapper(profile: Profile, frame: str) -> bool:
    """A frame on every stack that never runs itself (`<module>`, `main`, the serve loop's
    callers): 100% cumulative says nothing, so the cumulative ranking leaves it out."""
    return profile.cumulative[frame] == profile.total and profile.own[frame] == 0


def costs(profile: Profile, us_per_msg: float | None, top: int, by: str) -> list[FunctionCost]:
    """The `top` functions by own ("own") or cumulative ("cumulative") samples, each with
    its share turned into µs per delivered message (None when that is unknown)."""
    if profile.total == 0:
        return []
    ranking = profile.own if by == "own" else profile.cumulative
    out: list[FunctionCost] = []
    for frame, _count in ranking.most_common():
        if len(out) == top:
            break
        if by != "own" and is_wrapper(profile, frame):
            continue
        own = profile.own[frame] / profile.total
        cum = profile.cumulative[frame] / profile.total
        out.append(
            FunctionCost(
                frame,
                own,
                cum,
                own * us_per_msg if us_per_msg is not None else None,
                cum * us_per_msg if us_per_msg is not None else None,
            )
        )
    return out


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_costs(title: str, rows: Sequence[FunctionCost]) -> str:
    """A fixed-width table of function costs under `title`."""
    head = ("own %", "own µs/msg", "cum %", "cum µs/msg", "function (file:line)")
    body = [
        (
            f"{100 * r.own_share:.1f}",
            _us(r.own_us),
            f"{100 * r.cumulative_share:.1f}",
            _us(r.cumulative_us),
            r.frame,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(4)]
    lines = [title]
    for line in [head, *body]:
        cells = [c.rjust(w) for c, w in zip(line[:4], widths, strict=True)]
        lines.append("  ".join([*cells, line[4]]))
    return "\n".join(lines)
