"""The packages under src/megaflow import one another in one direction only.

Each package has a layer; a module may import its own package and packages of lower
layers, never a higher layer or a sibling of its own layer (store, model and env do not
know each other). Imports inside functions count; imports under ``if TYPE_CHECKING:``
do not (they never run). A dotted-path string ``"megaflow.x.y:Attr"`` (how registries
name a built-in they load lazily) counts as an import too, so a string cannot hide a
dependency the import statements would not be allowed.

`megaflow.testing` (fixtures) is above everything: only tests, benchmarks and the
composition of the embedded default use it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "megaflow"

LAYERS: list[set[str]] = [
    {"v1"},  # generated protobuf code
    {"core"},  # errors, registries, shared helpers
    {"contract"},  # the service protocols
    {"rpc"},  # gRPC transport of the contract
    {"store", "model", "env"},  # the roles below the agent, independent of each other
    {"agent"},
    {"scheduler"},
    {"tasks"},  # task sources and generators
    {"deploy", "integrations"},  # composition: processes, the embedded system, other harnesses
    {"api"},  # megaflow/__init__.py and megaflow/_*.py, the public Python API
    {"cli"},
    {"testing"},  # fixtures
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}

ALLOWED: dict[tuple[str, str], str] = {
    (
        "megaflow.model.factory",
        "megaflow.testing.simulated_model:build_simulated",
    ): "the `simulated` backend is the embedded default but a fixture; the registry names "
    "it by dotted path and loads it only when a `simulated` spec is built",
}
"""(importing module, what it imports) -> why the layering allows it. Keep it short."""

_DOTTED_PATH = re.compile(r"megaflow(\.\w+)+:\w[\w.]*")


def _package(module: str) -> str | None:
    """The layer's package of a dotted module name (``api`` for megaflow / megaflow._x)."""
    parts = module.split(".")
    if parts[0] != "megaflow":
        return None
    if len(parts) == 1 or parts[1].startswith("_"):
        return "api"
    return parts[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported name) of every import that can run, and every dotted-path string."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for branch in child.orelse:
                yield from _imports(ast.Module(body=[branch], type_ignores=[]), module, is_package)
            continue
        if isinstance(child, ast.Import):
            yield from ((child.lineno, alias.name) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - child.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield from ((child.lineno, f"{base}.{alias.name}") for alias in child.names)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str):
            if _DOTTED_PATH.fullmatch(child.value):
                yield child.lineno, child.value
        yield from _imports(child, module, is_package)


def _every_import() -> Iterator[tuple[str, int, str]]:
    """(module, line, imported name) for every module under src/megaflow."""
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for line, imported in _imports(tree, module, path.name == "__init__.py"):
            yield module, line, imported


def _violations() -> list[str]:
    found = []
    for module, line, imported in _every_import():
        own, target = _package(module), _package(imported)
        assert own in RANK, f"{module}: package {own!r} has no layer; add it to LAYERS"
        if target is None or target == own or target not in RANK:
            continue
        if RANK[target] < RANK[own] or (module, imported) in ALLOWED:
            continue
        found.append(f"{module}:{line} imports {imported} ({own} -> {target})")
    return found


def test_no_package_imports_against_the_layers() -> None:
    assert _violations() == []


def test_every_allowed_exception_is_still_needed() -> None:
    seen = {(module, imported) for module, _, imported in _every_import()}
    assert set(ALLOWED) <= seen, f"stale exceptions: {set(ALLOWED) - seen}"


def test_the_walk_sees_function_level_imports_and_skips_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from megaflow.tasks import rows\n"
        "else:\n    import megaflow.agent\n"
        "def f():\n    from megaflow.testing import scripted\n"
        "X = 'megaflow.scheduler.state:State'\n"
    )
    names = [name for _, name in _imports(ast.parse(source), "megaflow.model.x", False)]
    assert names == [
        "typing.TYPE_CHECKING",
        "megaflow.agent",
        "megaflow.testing.scripted",
        "megaflow.scheduler.state:State",
    ]
