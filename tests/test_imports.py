"""The import graph of rlhf_lib/ and scripts/: no circles, the packages layered by stage, no private names across
packages.

Every import statement counts, wherever it sits: module level, inside a function (a lazy import still ties the two
modules together) and under ``if TYPE_CHECKING:``. Scripts are modules by file name, as they import each other with
scripts/ on sys.path. Check it alone with ``python -m pytest -q tests/test_imports.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rlhf_lib"


def module_files() -> dict[str, Path]:
    """Module name -> file, for the library package and the scripts."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "assets" in parts:  # data files' builder scripts, not modules of the library
            continue
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "scripts").glob("*.py")):
        out[path.stem] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that ``name`` (at ``path``) imports anywhere in its source."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import rlhf_lib.x.y` -> the longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with an explicit stack of the path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_detects_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_relative_lazy_and_type_checking_imports(tmp_path):
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c"}
    src = tmp_path / "a.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nfrom . import b\nif TYPE_CHECKING:\n    from .c import Thing\n"
        "def f():\n    from pkg import text_progress\n",
        encoding="utf-8",
    )
    assert imported_modules("pkg.a", src, known) == {"pkg", "pkg.b", "pkg.c"}


def test_no_import_cycles_in_library_and_scripts():
    graph = import_graph()
    assert "rlhf_lib.reward.train" in graph and "build_notebooks" in graph  # the walk found both folders
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# What each package of rlhf_lib may import (besides itself and the root package): the stages over lm/ over core/,
# and a stage reads another only where the data flows (ppo reads reward; evaluate reads data, reward and ppo; sweeps
# run the pipeline; the comparison evaluates every method). bench/ is outside every stage's imports.
ALLOWED = {
    "core": set(),
    "lm": {"core"},
    "data": {"core", "lm"},
    "reward": {"core", "lm"},
    "ppo": {"core", "lm", "reward"},
    "evaluate": {"core", "lm", "data", "reward", "ppo"},
    "pipeline": {"core", "ppo"},
    "sweeps": {"core", "pipeline"},
    "compare": {"core", "lm", "data", "reward", "ppo", "evaluate"},
    "bench": {"core", "lm", "reward", "ppo"},
}


def package_of(module: str) -> str | None:
    """'rlhf_lib.ppo.core' -> 'ppo', 'rlhf_lib.pipeline' -> 'pipeline'; None for the root and for scripts."""
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else None


def layering_violations(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    out = []
    for name, targets in sorted(graph.items()):
        src = package_of(name)
        if src is None:
            continue
        for target in sorted(targets):
            dst = package_of(target)
            if dst is not None and dst != src and dst not in allowed.get(src, set()):
                out.append(f"{name} imports {target} ({src} may import {sorted(allowed.get(src, set()))})")
    return out


def private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """Private names (one leading underscore) of another package that ``name`` imports or reads as an attribute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    own = package_of(name)
    bound: dict[str, str] = {}  # local name -> module it stands for
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    bound[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    if package_of(node.module) != own:
                        out.append(f"{name} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            target = bound[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and package_of(target) != own:
                out.append(f"{name} reads {target}.{node.attr}")
    return out


def test_layering_check_catches_an_upward_import_and_a_private_name(tmp_path):
    graph = {"rlhf_lib.core.io": {"rlhf_lib.ppo.core"}, "rlhf_lib.ppo.core": {"rlhf_lib.core.io"}}
    assert layering_violations(graph, ALLOWED) == ["rlhf_lib.core.io imports rlhf_lib.ppo.core (core may import [])"]
    src = tmp_path / "m.py"
    src.write_text("from rlhf_lib.reward import train\nfrom rlhf_lib.ppo.core import _x\ntrain._build()\n")
    known = {"rlhf_lib.reward.train", "rlhf_lib.ppo.core"}
    assert private_uses("rlhf_lib.bench.workers", src, known) == [
        "rlhf_lib.bench.workers imports rlhf_lib.ppo.core._x",
        "rlhf_lib.bench.workers reads rlhf_lib.reward.train._build",
    ]
    assert private_uses("rlhf_lib.reward.plots", src, known) == ["rlhf_lib.reward.plots imports rlhf_lib.ppo.core._x"]


def test_packages_are_layered_by_stage():
    graph = import_graph()
    assert set(ALLOWED) == {package_of(n) for n in graph if package_of(n)}, "a package without a layer in ALLOWED"
    assert layering_violations(graph, ALLOWED) == []


def test_no_private_name_is_used_across_packages():
    files = module_files()
    library = {n: p for n, p in files.items() if n.startswith(PACKAGE)}
    found = [use for name, path in library.items() for use in private_uses(name, path, set(files))]
    assert found == []


MAX_FUNCTION_LINES = 60  # def line to last line, docstring included: a function a reader holds in their head


def long_functions(source: str, where: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'<where>:<line> <name> (<n> lines)' for each function or method of `source` longer than `limit` lines."""
    return [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_the_length_check_catches_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(60))
    assert long_functions(f"def short():\n    return 1\n\n\ndef long():\n{body}", "m.py") == ["m.py:5 long (61 lines)"]


def test_no_library_function_is_over_60_lines():
    found = [
        hit
        for path in sorted((ROOT / "rlhf_lib").rglob("*.py"))
        for hit in long_functions(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []
