"""The whiteboard's rules, checked: which part may import which (lazy imports included), one
import name (`apifast`), and every module importable."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import apifast

ROOT = Path(__file__).resolve().parent.parent
FEATURES = (
    "router",
    "catalog",
    "metering",
    "orders",
    "admin",
    "plugins",
    "embedded",
    "cli",
    "server",
)
FOLDERS = {"apifast": ROOT / "apifast", **{f: ROOT / f for f in FEATURES}}
# The contract a plugin may use: the hookimpl marker and the two base-type modules.
CONTRACT = {"apifast", "apifast.providers", "apifast.payments"}
FORBIDDEN = {
    "apifast": set(FEATURES),  # the core imports no feature
    "catalog": {"router", "metering", "orders", "admin", "server", "cli", "plugins"},
    "metering": {"router", "admin", "orders", "server", "cli", "plugins"},
    "router": {"admin", "orders", "server", "cli", "plugins"},
    "admin": {"router", "orders", "server", "cli", "plugins"},
    "orders": {"router", "admin", "metering", "server", "cli", "plugins"},
    "embedded": {"router", "admin", "orders", "metering", "server", "cli", "plugins"},
}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "apifast" or name.startswith("apifast.")}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FEATURES else "apifast"


def sources(part: str) -> list[Path]:
    return sorted(FOLDERS[part].rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_only_what_it_may(part: str) -> None:
    bad = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sources(part)
        for module in imported_modules(path)
        if part_of(module) in FORBIDDEN[part]
    }
    assert not bad, sorted(bad)


def import_time_modules(path: Path) -> set[str]:
    """The apifast modules `path` imports as it is imported: at module level (in `if` and
    `try` blocks too), but not under `if TYPE_CHECKING:` nor inside functions."""
    found: set[str] = set()
    body = list(ast.parse(path.read_text(encoding="utf-8")).body)
    while body:
        node = body.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                body += node.body
            body += node.orelse
        elif isinstance(node, ast.Try):
            body += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                body += handler.body
    return {name for name in found if name.startswith("apifast.")}


def test_router_modules_import_one_another_without_cycles() -> None:
    # The request core is split by step (core.py orchestrates; holding, route_calls,
    # streaming, finishing... never import it back): a cycle would need a lazy import on
    # the request path.
    modules = {
        f"apifast.router.{path.stem}": path for path in sources("router") if path.stem != "__init__"
    }
    graph = {
        name: sorted(m for m in import_time_modules(path) if m in modules and m != name)
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError(" -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_plugins_import_only_the_contract() -> None:
    bad = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sources("plugins")
        for module in imported_modules(path)
        if part_of(module) != "plugins" and module not in CONTRACT
        and not any(module == f"{c}.{name}" for c in CONTRACT for name in ("hookimpl",))
        and module.rsplit(".", 1)[0] not in CONTRACT
    }  # fmt: skip
    assert not bad, sorted(bad)


def test_every_module_imports() -> None:
    names = ["apifast"]
    for info in pkgutil.walk_packages(apifast.__path__, "apifast."):
        names.append(info.name)
    for feature in FEATURES:
        package = importlib.import_module(f"apifast.{feature}")
        names.append(package.__name__)
        names += [i.name for i in pkgutil.walk_packages(package.__path__, f"apifast.{feature}.")]
    for name in names:
        if not name.endswith(".__main__"):  # runs the CLI
            importlib.import_module(name)
    assert len(names) > 60


@pytest.mark.parametrize("bare", ["router", "admin", "metering", "plugins", "orders", "server"])
def test_no_bare_top_level_import(bare: str) -> None:
    # Run from the repository root, where the folders are on sys.path as plain directories.
    result = subprocess.run(
        [sys.executable, "-c", f"import {bare}"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_builtin_plugins_load_through_entry_points() -> None:
    # The entry-point names third parties see are unchanged; the modules moved under apifast.
    expected = {
        "apifast.providers": {"openai", "anthropic", "demo"},
        "apifast.payments": {"nowpayments", "btcpay"},
    }
    for group, names in expected.items():
        found = {ep.name: ep for ep in entry_points(group=group)}
        assert names <= set(found), (group, sorted(found))
        for name in names:
            assert found[name].value.startswith("apifast.plugins."), found[name]
            found[name].load()
