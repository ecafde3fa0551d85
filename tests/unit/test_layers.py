"""The import-layers contract (tests/layers.py): the tree keeps its floors, and the checker
does catch an upward or sideways import (synthetic graphs, and one planted in a copy)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.layers import check_graph, check_tree, first_party, imports_of, main

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["audit", "broker", "clients", "examples", "persistence", "plexus", "security"]
PACKAGES += ["supervisor", "tests", "perf", "gateway"]


def test_the_tree_keeps_its_floors() -> None:
    violations = check_tree(REPO)
    assert violations == [], "\n".join(map(str, violations))


def test_first_party_packages_are_found() -> None:
    found = first_party(REPO)
    assert {"security", "broker", "clients", "persistence", "supervisor", "plexus"} <= set(found)


@pytest.mark.parametrize(
    ("module", "imported", "why"),
    [
        ("security.keyring", "broker.errors", "upward"),
        ("broker.recovery", "persistence.state", "upward"),
        ("broker.server", "clients.bus", "upward"),
        ("clients.store", "persistence.queries", "upward"),
        ("clients.bus", "examples.ticker", "upward"),
        ("persistence.service", "audit.log", "sideways"),
        ("audit.log", "gateway.http", "sideways"),  # a future service is a service too
        ("persistence.service", "supervisor.config", "upward"),
        ("supervisor.supervisor", "plexus.cli", "upward"),
        ("broker.router", "tests.conftest", "tests/ is for tests"),
    ],
)
def test_upward_and_sideways_imports_are_reported(module: str, imported: str, why: str) -> None:
    (violation,) = check_graph({module: [(3, imported)]}, PACKAGES)
    assert (violation.module, violation.line, violation.imported) == (module, 3, imported)
    assert violation.why.startswith(why)


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("broker.server", "security.zap"),
        ("clients.stream", "broker.wire"),
        ("examples.ticker", "clients.bus"),
        ("persistence.service", "clients.stream"),
        ("persistence.restore", "security.keyring"),
        ("audit.log", "broker.event_records"),
        ("supervisor.supervisor", "persistence.service"),
        ("plexus.cli", "supervisor.supervisor"),
        ("broker.router", "broker.topics"),
        ("broker.router", "zmq"),  # not ours
        ("tests.conftest", "plexus.cli"),  # tests and benchmarks may import anything
        ("perf.bench_persistence", "persistence.writer"),
    ],
)
def test_downward_own_and_foreign_imports_pass(module: str, imported: str) -> None:
    assert check_graph({module: [(1, imported)]}, PACKAGES) == []


def test_imports_inside_functions_and_relative_imports_are_seen() -> None:
    source = (
        "from __future__ import annotations\n"
        "import zmq\n"
        "from . import codec\n"
        "from .topics import TopicIndex\n"
        "from .. import persistence\n"
        "def late() -> None:\n"
        "    import supervisor.config\n"
        "    from clients import bus\n"
        "if True:\n"
        "    from persistence.store import MessageStore\n"
    )
    found = sorted(imports_of(ast.parse(source), "broker.recovery", is_package=False))
    assert found == [
        (1, "__future__"),
        (2, "zmq"),
        (3, "broker.codec"),
        (4, "broker.topics"),
        (5, "persistence"),
        (7, "supervisor.config"),
        (8, "clients"),
        (10, "persistence.store"),
    ]
    violations = check_graph({"broker.recovery": found}, PACKAGES)
    assert [(v.line, v.imported) for v in violations] == [
        (5, "persistence"),
        (7, "supervisor.config"),
        (8, "clients"),
        (10, "persistence.store"),
    ]


def _copy_tree(destination: Path) -> None:
    for package in first_party(REPO):
        shutil.copytree(
            REPO / package,
            destination / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )


def test_an_upward_import_planted_in_a_copy_fails_the_contract(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    before = {str(v) for v in check_tree(tmp_path)}
    target = tmp_path / "broker" / "topics.py"
    target.write_text(
        target.read_text() + "\n\ndef _planted() -> None:\n    from persistence import store\n"
    )
    after = [v for v in check_tree(tmp_path) if str(v) not in before]
    assert [(v.module, v.imported) for v in after] == [("broker.topics", "persistence")]
    assert after[0].why.startswith("upward: broker/ (floor 2) imports persistence/ (floor 4)")
    assert main([str(tmp_path)]) == 1


def test_the_command_line_passes_on_the_tree_and_fails_on_a_planted_copy(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    (tmp_path / "security" / "planted.py").write_text("import broker.errors\n")
    run = subprocess.run(
        [sys.executable, "-m", "tests.layers", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert "security.planted:1: imports broker.errors: upward" in run.stdout
