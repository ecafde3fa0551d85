"""Packaging stays honest: every folder that ships is declared, every dependency is used.

setuptools warns at every install (forty lines) about a data folder it was not told is a
package; and a dependency nothing imports costs every user an install for nothing. Both
are checked against the tree here, without building a wheel.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"pyzmq": "zmq"}
"""Distribution names whose import name differs."""


def _config() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _declared_packages() -> set[str]:
    setuptools = _config()["tool"]["setuptools"]  # type: ignore[index]
    return set(setuptools["packages"])


def test_every_shipped_folder_is_a_declared_package() -> None:
    declared = _declared_packages()
    missing = []
    for package in sorted(declared):
        folder = ROOT / package.replace(".", "/")
        assert folder.is_dir(), f"declared package {package} has no folder"
        for sub in folder.rglob("*"):
            if not sub.is_dir() or sub.name == "__pycache__":
                continue
            if not any(item.is_file() for item in sub.iterdir()):
                continue
            name = ".".join(sub.relative_to(ROOT).parts)
            if name not in declared:
                missing.append(name)
    assert missing == [], f"folders shipped but not declared in pyproject.toml: {missing}"


def _imported_top_names() -> set[str]:
    names: set[str] = set()
    for package in _declared_packages():
        for path in (ROOT / package.replace(".", "/")).glob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_product() -> None:
    dependencies = _config()["project"]["dependencies"]  # type: ignore[index]
    imported = _imported_top_names()
    unused = []
    for requirement in dependencies:
        distribution = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
        module = IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))
        if module not in imported:
            unused.append(distribution)
    assert unused == [], f"dependencies nothing in the product imports: {unused}"
