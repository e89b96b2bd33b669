"""No import circles in rlhf_lib/ or scripts/.

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
    for path in sorted((ROOT / PACKAGE).glob("*.py")):
        out[PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"] = path
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
    assert "rlhf_lib.reward" in graph and "build_notebooks" in graph  # the walk found both folders
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
