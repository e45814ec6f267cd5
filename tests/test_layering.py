"""The dependency direction of ARCHITECTURE.md: the domain and storage packages
never import the transport edge or its frameworks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import ROOT

FORBIDDEN = ("realtime", "socketio", "engineio", "aiohttp")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["kernel", "orders", "tracking", "chat", "storage"])
def test_domain_does_not_import_the_edge(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {name}"
