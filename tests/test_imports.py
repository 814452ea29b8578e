"""The package's import graph has no cycles, counting imports inside functions.

Imports are read from the source with ``ast`` (not by importing), so an import hidden
in a function body counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import shardkit

ROOT = Path(shardkit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the shardkit modules it imports anywhere in its body."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module) if node.level else node.module or ""
                # `from .pkg import mod` imports the submodule when there is one.
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                targets = subs or [base]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_imports_inside_functions():
    graph = import_graph()
    # source.backend_for imports the remote backends inside a function body.
    assert "shardkit.storage.remote.http" in graph["shardkit.storage.dispatch"]
    assert "shardkit.storage.backend" in graph["shardkit.storage.remote.http"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles among shardkit modules: {cycles}"


def test_backend_vocabulary_imports_nothing_from_the_package():
    assert import_graph()["shardkit.storage.backend"] == set()


def test_backends_never_import_the_cache():
    graph = import_graph()
    for name in (
        "shardkit.storage.remote.http",
        "shardkit.storage.remote.s3",
        "shardkit.storage.remote.pipe",
        "shardkit.storage.remote.fsspec_backend",
        "shardkit.storage.localfile",
        "shardkit.storage.remote.stream",
    ):
        assert "shardkit.storage.cache" not in graph[name] and "shardkit.storage.dispatch" not in graph[name], name
    assert "shardkit.storage.dispatch" not in graph["shardkit.storage.cache"]


# Which stages each stage may import (besides itself and the shared modules). The folder
# list of shardkit/ is the data path; these edges are the only ones it has.
SHARED = {"shardkit", "shardkit.errors", "shardkit.sizes", "shardkit.threadmap", "shardkit.compat"}
ALLOWED = {
    "format": set(),
    "storage": set(),
    "plan": set(),
    "decode": set(),
    "ingest": {"decode"},
    "read": {"format", "storage", "plan", "decode"},
    "gpu": {"read", "decode", "plan"},
    "writing": {"format", "storage", "decode", "ingest"},
    "loader": {"read", "gpu", "plan", "decode"},
    "cli": {"format", "storage", "plan", "decode", "ingest", "read", "gpu", "writing", "loader"},
}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, deps in sorted(graph.items()):
        if module in SHARED:
            if module != "shardkit":
                out += [f"{module} -> {d}" for d in sorted(deps) if d not in SHARED]
            continue
        stage = _stage(module)
        assert stage in ALLOWED, f"{module} is in no stage: add its folder to ALLOWED"
        for dep in sorted(deps):
            if dep in SHARED:
                continue
            other = _stage(dep)
            if other != stage and other not in ALLOWED[stage]:
                out.append(f"{module} -> {dep}")
    return out


def test_layering_checker_catches_a_back_edge():
    graph = {"shardkit.format.tar": {"shardkit.read.reader"}, "shardkit.read.reader": {"shardkit.format.tar"}}
    assert layering_violations(graph) == ["shardkit.format.tar -> shardkit.read.reader"]


def test_stages_import_only_the_stages_below_them():
    assert layering_violations(import_graph()) == []


def test_nothing_outside_the_cli_imports_it():
    graph = import_graph()
    users = {m for m, deps in graph.items() if any(_stage(d) == "cli" for d in deps) and _stage(m) != "cli"}
    assert users == set()


def test_read_and_write_do_not_import_each_other():
    graph = import_graph()
    for module, deps in graph.items():
        if _stage(module) in ("read", "writing"):
            assert not {_stage(d) for d in deps} & ({"read", "writing"} - {_stage(module)}), module


def test_old_flat_module_paths_are_the_new_modules():
    import importlib

    from shardkit.compat import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"shardkit.{old}") is importlib.import_module(f"shardkit.{new}"), old
    # A path the 0.1 README documented; imported by name so no import sorter reorders it.
    write_files = importlib.import_module("shardkit.write_parallel").write_files
    from shardkit.writing.parallel import write_files as now

    assert write_files is now


def test_every_module_imports_first_in_a_fresh_interpreter():
    """`from shardkit.<package> import <module>` as the very first import works: a package's
    backward-compatible __getattr__ must not recurse while its module is importing."""
    import subprocess
    import sys

    names = sorted(n for n in _modules() if n.count(".") == 2 and not n.endswith("__main__"))  # __main__ runs
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    package, module = name.rsplit('.', 1)\n"
    script += "    exec(f'from {package} import {module}')\n"
    # One interpreter per package, so each package's first import is the tested form.
    by_package: dict[str, list[str]] = {}
    for name in names:
        by_package.setdefault(name.rsplit(".", 1)[0], []).append(name)
    for package, members in by_package.items():
        if package == "shardkit.gpu":
            members = [m for m in members if m != "shardkit.gpu.nvimgcodec"]  # optional library
        done = subprocess.run(
            [sys.executable, "-c", script, *members], capture_output=True, text=True, cwd=ROOT.parent, timeout=120
        )
        assert done.returncode == 0, f"{package}: {done.stderr[-800:]}"
