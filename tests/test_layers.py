"""The package's shape: layers without cycles, and functions short enough to read at once.

Every import of a hpcbatch module is found by parsing (``ast``), including imports made
inside functions, so an import hidden in a function still counts.

Layers, lowest first (a module may import its own layer or lower ones, never higher):

- core: errors, units, resources, planner, config, calibrate
- runtime: cluster, slurm, runner, chunkstate, ledger, report, retry, security, workload,
  pipeline, sinks, api, options
- workloads: hpcbatch.stocks.*, hpcbatch.predictive.* (the public API only)
- cli: cli, slurm_cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpcbatch"

CORE = {"errors", "units", "resources", "planner", "config", "calibrate"}
CLI = {"cli", "slurm_cli"}
LEVEL = {"core": 0, "runtime": 1, "workloads": 2, "cli": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "runtime"  # hpcbatch/__init__.py: the public API
    if parts[1] in ("stocks", "predictive"):
        return "workloads"
    if parts[1] in CORE:
        return "core"
    if parts[1] in CLI:
        return "cli"
    return "runtime"


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The hpcbatch modules an ``import``/``from`` statement names."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("hpcbatch"):
        return []
    names = [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if _exists(n)] or [target]


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (
        PACKAGE.parent / rel / "__init__.py"
    ).exists()


def imports_of(path: Path) -> set[str]:
    module = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.update(resolve(module, path.name == "__init__.py", node))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hpcbatch"))
    found.discard(module)
    return {m for m in found if _exists(m)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _parents(module: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``: not counted as edges
    here (a package's ``__init__`` importing its own modules is not a cycle of ours)."""
    parts = module.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt in _parents(node):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_parser_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from hpcbatch import cli\n    import hpcbatch.runner\n")
    tree = ast.parse(src.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    assert names == {"hpcbatch.cli", "hpcbatch.runner"}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_hpcbatch():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_goes_up_a_layer():
    bad = [
        f"{src} ({layer(src)}) imports {dst} ({layer(dst)})"
        for src, dsts in graph().items()
        for dst in sorted(dsts)
        if LEVEL[layer(dst)] > LEVEL[layer(src)] and dst not in _parents(src)
    ]
    assert not bad, "layer violations:\n" + "\n".join(bad)


def _long_functions(limit: int, where: list[Path]) -> list[str]:
    found = []
    for path in where:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    rel = path.relative_to(PACKAGE.parent)
                    found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_longer_than_80_lines():
    long = _long_functions(80, sorted(PACKAGE.rglob("*.py")))
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


@pytest.mark.parametrize("name", ["runner.py", "chunkstate.py", "pipeline.py"])
def test_runner_and_pipeline_functions_at_most_50_lines(name):
    path = PACKAGE / name
    if not path.exists():
        pytest.fail(f"hpcbatch/{name} is missing")
    long = _long_functions(50, [path])
    assert not long, "functions over 50 lines:\n" + "\n".join(long)


def test_the_cli_and_a_plan_do_not_import_torch():
    """`hpcbatch --help` and `hpcbatch plan` load every installed workload: none of them
    may import torch (1.3-2 s) before a run needs it (the workers import it)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hpcbatch.cli import main\n"
        "try:\n"
        "    main(['plan', 'stocks', '--mem', '12G', '--cpus', '4', '--json'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("no torch"), out.stdout[-500:]
    assert '"n_workers"' in out.stdout  # the plan was made
