"""The import-layers contract: every import points down the floors of shared/STYLE.md.

    floor 6    plexus/                   the command line
    floor 5    supervisor/
    floor 4    persistence/ audit/ ...   the services: any other top-level package is one;
                                         a service never imports another service
    floor 3    examples/                 apps, standing on the client core
    floor 3    clients/                  the client core and its drivers
    floor 2    broker/
    floor 1    security/

A module may import its own package and any package on a lower floor (examples, the apps,
sit above the client core on its floor: they may import clients, nothing imports them).
Every import counts, also one inside a function or under `if TYPE_CHECKING:`; relative
imports are resolved. tests/ and perf/ are exempt (they may import anything); imports of
anything that is not one of our packages are ignored.

    python -m tests.layers [ROOT]     exit 1 and one line per violation (make lint)

`check_graph` is pure (module name -> imported names), so a test can feed it a synthetic
graph; `scan` builds the graph of a tree with `ast`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

FLOORS: Final[dict[str, float]] = {
    "security": 1,
    "broker": 2,
    "clients": 3,
    "examples": 3.5,
    "supervisor": 5,
    "plexus": 6,
}
SERVICE_FLOOR: Final = 4.0
"""Every other first-party package (persistence, audit, consent, gateway, ...)."""
EXEMPT: Final = frozenset({"tests", "perf"})

Graph = Mapping[str, Iterable[tuple[int, str]]]
"""module name -> (line, imported module name) of each of its imports."""


@dataclass(frozen=True, slots=True)
class Violation:
    module: str
    line: int
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: imports {self.imported}: {self.why}"


def floor_of(package: str) -> float:
    return FLOORS.get(package, SERVICE_FLOOR)


def check_graph(graph: Graph, packages: Iterable[str]) -> list[Violation]:
    """Every import of `graph` between first-party `packages` that does not point down."""
    ours = frozenset(packages)
    found: list[Violation] = []
    for module, imports in graph.items():
        source = module.split(".", 1)[0]
        if source in EXEMPT or source not in ours:
            continue
        for line, imported in imports:
            target = imported.split(".", 1)[0]
            if target == source or target not in ours:
                continue
            why = _refusal(source, target)
            if why:
                found.append(Violation(module, line, imported, why))
    return sorted(found, key=lambda v: (v.module, v.line, v.imported))


def _refusal(source: str, target: str) -> str:
    if target in EXEMPT:
        return f"{target}/ is for tests and benchmarks, never imported by the product"
    low, high = floor_of(target), floor_of(source)
    if low < high:
        return ""
    if low == high:
        return f"sideways: {source}/ and {target}/ are both on floor {int(low)}"
    return f"upward: {source}/ (floor {int(high)}) imports {target}/ (floor {int(low)})"


def first_party(root: Path) -> list[str]:
    """Top-level packages under `root` (directories with an __init__.py)."""
    return sorted(p.parent.name for p in root.glob("*/__init__.py"))


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in `tree`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if node.module is None:  # `from . import x`: x is a module of the package
                for alias in node.names:
                    yield node.lineno, f"{base}.{alias.name}" if base else alias.name
            else:
                yield node.lineno, base


def scan(root: Path) -> dict[str, list[tuple[int, str]]]:
    """The import graph of every first-party module under `root`."""
    graph: dict[str, list[tuple[int, str]]] = {}
    for package in first_party(root):
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(root, path)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            graph[name] = list(imports_of(tree, name, path.name == "__init__.py"))
    return graph


def check_tree(root: Path) -> list[Violation]:
    return check_graph(scan(root), first_party(root))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    violations = check_tree(root)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} import(s) break the floors (tests/layers.py says which way)")
        return 1
    print(f"import layers kept: {len(first_party(root))} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
