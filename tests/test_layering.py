"""The dependency direction of docs/architecture.md, checked on every file:

    realtime -> chat, tracking -> orders -> kernel;  storage implements them.

- kernel imports nothing of ours; each domain only what is below it;
- no domain and no storage module imports the edge (realtime) or its
  frameworks (socketio, engineio, aiohttp);
- inside realtime, only realtime/transport reaches into framework internals:
  no engineio import, no private aiohttp module, no `x._private` attribute of
  an object that is not the module's own (self, cls), and no namespace
  reaches python-socketio's manager or a socket's link.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import ROOT

FRAMEWORKS = {"socketio", "engineio", "aiohttp"}
OURS = {"realtime", "kernel", "orders", "scheduling", "tracking", "chat", "storage", "loadtest",
        "tests", "outbox", "feedback"}
# What each package may import of ours (itself always).
ALLOWED: dict[str, set[str]] = {
    "kernel": set(),
    "orders": {"kernel"},
    "tracking": {"kernel", "orders"},
    "chat": {"kernel", "orders"},
    "scheduling": {"kernel", "orders", "tracking"},
    "outbox": {"kernel"},
    "feedback": {"kernel"},
    "storage": {"kernel", "orders", "scheduling", "tracking", "chat", "outbox", "feedback"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files(package: str) -> list[Path]:
    found = sorted((ROOT / package).rglob("*.py"))
    assert found, package
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_is_below_it(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    for path in files(package):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FRAMEWORKS, f"{path.relative_to(ROOT)} imports {name}"
            if top in OURS:
                assert top in allowed, f"{path.relative_to(ROOT)} imports {name}"


def edge_files() -> list[Path]:
    transport = ROOT / "realtime" / "transport"
    return [p for p in files("realtime") if transport not in p.parents]


def test_only_the_transport_imports_framework_internals() -> None:
    for path in edge_files():
        for name in imported_modules(path):
            where = f"{path.relative_to(ROOT)} imports {name}"
            assert not name.startswith("engineio"), where
            assert not any(part.startswith("_") and not part.startswith("__")
                           for part in name.split(".")), where


def private_reaches(path: Path) -> list[str]:
    """`x._name` where x is not self or cls (a dunder is not private)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_outside_the_transport_nothing_reaches_private_attributes() -> None:
    reaches = [r for path in edge_files() for r in private_reaches(path)]
    assert not reaches, reaches


@pytest.mark.parametrize("attr", ["manager", "link", "eio"])
def test_no_namespace_reaches_the_socketio_manager_or_a_link(attr: str) -> None:
    for path in files("realtime/namespaces"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr != attr, f"{path.relative_to(ROOT)}:{node.lineno} .{attr}"


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a planted private reach is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(self, server):\n    return self._ok, server.manager._fwdm, x.__doc__\n")
    assert private_reaches(bad) == ["bad.py:2 ._fwdm"]
