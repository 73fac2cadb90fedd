"""The package layering docs/architecture.md states, checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "core"

# What each package of core must not import (the direction of its dependencies).
FORBIDDEN = {
    "chip": {"ops", "nn", "engine", "learning", "data", "cli"},
    "ops": {"nn", "engine", "learning", "data", "cli"},
    "nn": {"engine", "learning", "cli"},
    "engine": {"learning", "data", "cli"},
    "learning": {"cli"},
    "data": {"chip", "ops", "nn", "engine", "learning", "cli"},
}


def _imported_packages(path: Path) -> set[str]:
    """Second components of every ``core.X`` a module imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "core" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    wrong = {str(path.relative_to(CORE)): sorted(_imported_packages(path) & FORBIDDEN[package])
             for path in (CORE / package).rglob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}


def test_serving_imports_neither_rich_nor_matplotlib() -> None:
    """Only the commands that print tables and draw plots load rich and matplotlib,
    when they run; the server, its command line and the library never do."""
    code = ("import sys, core.engine, core.learning, core.data.datasets, task_store.store, "
            "server.app, server.runtime, server.cli, core.cli.main, core.cli.evaluate; "
            "print(sorted(m for m in ('rich', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=CORE.parent)
    assert out.stdout.strip() == "[]"
