"""The import graph of the project's packages, read from the source (no import runs):

* no cycle among first-party modules, counting imports inside functions too;
* the core's rooms stand on each other in one order (text, checkpoint, cache, kernels, runtime,
  serving, the CLI), and nothing in the core but the CLI imports a framework or an adapter;
* an import inside a function is only for an optional dependency: Triton, vLLM, SGLang, transformers,
  or a first-party module that imports one of them when it loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"v4_plugin": ROOT / "v4_plugin", "v4_kernels": ROOT / "kernels", "vllm_backend": ROOT / "vllm_backend",
            "sglang_backend": ROOT / "sglang_backend"}
OPTIONAL = ("triton", "vllm", "sglang", "transformers")  # not in the core's dependencies
# The core's rooms, lowest first: a module may import its own room and the rooms below it.
ROOMS = ("v4_plugin.text", "v4_plugin.checkpoint", "v4_plugin.cache", "v4_kernels", "v4_plugin.runtime",
         "v4_plugin.serving", "v4_plugin.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if path.name.startswith("test_") or "__pycache__" in path.parts:
                continue
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str) -> Iterator[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement of `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield from ((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # `from pkg import module` imports the module
                    yield (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base), in_function
            yield from visit(child, nested)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def _first_party(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@cache
def _edges(module: str, in_functions: bool) -> frozenset[str]:
    return frozenset(t for name, inside in _imports(module) if (in_functions or not inside)
                     and (t := _first_party(name)) is not None and t != module)


@cache
def _loads_optional(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing `module` imports an optional dependency (top-level imports, transitively)."""
    if any(name.split(".")[0] in OPTIONAL for name, inside in _imports(module) if not inside):
        return True
    return any(_loads_optional(t, seen | {module}) for t in _edges(module, False) if t not in seen | {module})


def _room(module: str) -> int | None:
    for i, room in enumerate(ROOMS):
        if module == room or module.startswith(room + "."):
            return i
    return None


def test_the_graph_is_read():
    assert {"v4_plugin.runtime.model", "v4_kernels.kv_store.kernel", "vllm_backend.plugin",
            "sglang_backend.plugin"} <= MODULES.keys()
    assert "v4_plugin.checkpoint.config" in _edges("v4_plugin.runtime.model", False)
    assert "v4_kernels.sparse_attention.kernel" in _edges("v4_plugin.runtime.dispatch", True)


def test_no_import_cycle():
    """Depth-first search over every import, in functions too; a cycle is printed module by module."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(_edges(m, True)):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m) is not None))
def test_core_rooms_import_downwards(module):
    room = _room(module)
    for name, _ in _imports(module):
        top = name.split(".")[0]
        if room < ROOMS.index("v4_plugin.cli"):
            assert top not in ("vllm", "sglang", "vllm_backend", "sglang_backend"), \
                f"{module} imports {name}: framework knowledge belongs in the adapters"
        target = _first_party(name)
        if target is not None and _room(target) is not None:
            assert _room(target) <= room, f"{module} ({ROOMS[room]}) imports {target} ({ROOMS[_room(target)]})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_are_for_optional_dependencies(module):
    for name, inside in _imports(module):
        if not inside or name.split(".")[0] in OPTIONAL:
            continue
        target = _first_party(name)
        assert target is None or _loads_optional(target), \
            f"{module} imports {name} inside a function, which loads no optional dependency: import it at the top"
