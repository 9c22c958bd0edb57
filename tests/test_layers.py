"""The package's layers, enforced by reading every module with ``ast``.

config -> data / models / losses -> pruning / eval -> train -> stages -> pipeline / tune / cli.
Every import counts, at module level and inside functions (a lazy import hides a circle
from Python, not from this test): no module may import a module of a higher layer, no
import circle may exist among ``elmm_ray`` modules, and ``ray`` / ``deepspeed`` are
imported only where the architecture allows it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "elmm_ray"

# Rank of each top-level part of the package: a module may import its own rank or lower.
LAYERS: dict[str, int] = {
    "config": 0, "layout": 0, "remote": 0, "integrity": 0, "faults": 0, "tables": 0,
    "console": 0, "tracking": 0,
    "data": 1, "models": 1, "losses": 1,
    "pruning": 2, "eval": 2, "export": 2,
    "train": 3, "ray_session": 3,
    "stages": 4,
    "pipeline": 5, "tune": 5, "plan": 5, "cli": 5, "__main__": 5,
}

# Where Ray and DeepSpeed may be imported (module names or package prefixes).
RAY_ALLOWED = ("elmm_ray.train", "elmm_ray.tune", "elmm_ray.stages", "elmm_ray.ray_session",
               "elmm_ray.data.extraction", "elmm_ray.data.shards")
DEEPSPEED_ALLOWED = ("elmm_ray.train",)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def collect_imports(root: Path = PACKAGE) -> dict[str, list[tuple[str, int]]]:
    """Every import of every module under ``root``: (imported name, line)."""
    imports: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        found = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.module, node.lineno))
                # `from elmm_ray.pkg import module` imports that module too
                found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        imports[name] = found
    return imports


def internal_edges(imports: dict[str, list[tuple[str, int]]]) -> dict[str, dict[str, int]]:
    """module -> {imported elmm_ray module: line}, resolved to modules that exist."""
    modules = set(imports)
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for source, found in imports.items():
        for target, line in found:
            if not target.startswith("elmm_ray"):
                continue
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != source:
                edges[source].setdefault(target, line)
    return edges


def rank(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    return LAYERS.get(parts[1])


def upward_imports(edges: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    for source, targets in sorted(edges.items()):
        for target, line in sorted(targets.items()):
            low, high = rank(source), rank(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{source}:{line} imports {target} (layer {high} > {low})")
    return problems


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def forbidden_imports(imports: dict[str, list[tuple[str, int]]], library: str,
                      allowed: tuple[str, ...]) -> list[str]:
    return [f"{module}:{line} imports {name}" for module, found in sorted(imports.items())
            for name, line in found
            if (name == library or name.startswith(f"{library}."))
            and not any(module == a or module.startswith(f"{a}.") for a in allowed)]


def test_every_module_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in collect_imports() if "." in m} - set(LAYERS))
    assert not unknown, f"add these parts of the package to LAYERS: {unknown}"


def test_no_import_goes_up_the_layers():
    problems = upward_imports(internal_edges(collect_imports()))
    assert not problems, "imports up the layers:\n" + "\n".join(problems)


def test_no_import_circle():
    found = cycles(internal_edges(collect_imports()))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(("library", "allowed"), [("ray", RAY_ALLOWED),
                                                  ("deepspeed", DEEPSPEED_ALLOWED)])
def test_ray_and_deepspeed_only_where_allowed(library, allowed):
    problems = forbidden_imports(collect_imports(), library, allowed)
    assert not problems, f"{library} imported outside {allowed}:\n" + "\n".join(problems)


def test_the_checks_catch_an_injected_upward_import_and_circle(tmp_path):
    """The test fails on what it is meant to catch: a copy of the package with one lazy
    upward import (models -> train) and one circle."""
    import shutil

    copy = tmp_path / "elmm_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "models" / "mvtc.py"
    target.write_text(target.read_text() + "\n\ndef _sneaky():\n"
                      "    from elmm_ray.train.loop import run_loop\n    return run_loop\n")
    kg = copy / "data" / "kg.py"
    kg.write_text(kg.read_text() + "\n\ndef _loop():\n"
                  "    import elmm_ray.data.collate\n    return elmm_ray.data.collate\n")
    collate = copy / "data" / "collate.py"
    collate.write_text(collate.read_text() + "\nimport ray  # noqa\nfrom elmm_ray.data import kg\n")
    imports = collect_imports(copy)
    edges = internal_edges(imports)
    assert any(p.startswith("elmm_ray.models.mvtc:") and "elmm_ray.train.loop" in p
               for p in upward_imports(edges))
    assert ["elmm_ray.data.collate", "elmm_ray.data.kg"] in cycles(edges)
    assert any(p.startswith("elmm_ray.data.collate:") for p in
               forbidden_imports(imports, "ray", RAY_ALLOWED))


def test_no_module_is_over_about_500_lines():
    """One idea per module: nothing over 550 lines (the synthetic KG generator is the
    longest, ~550)."""
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 550}
    assert not long, f"split these modules by idea: {long}"
