"""The planner's sub-packages show its pipeline and depend only downward; no module of loraplan imports in a
circle; no import of another planner module hides in a function to dodge one; the planner never imports the
training stack at module level."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loraplan"
PLANNER = PACKAGE / "planner"
# the pipeline, bottom first: each sub-package may import only those before it (and planner.errors, the tables)
LAYERS = ["facts", "architecture", "memory", "speed", "plugins", "decision", "planfile", "report"]
TOP = {"api": len(LAYERS), "formats": len(LAYERS) + 1}  # the entry point, and other tools' configs at the edge
HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported loraplan module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                target = f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                if target in MODULES:
                    yield target, id(node) in top
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    yield a.name, id(node) in top


def _layer(module: str):
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "planner":
        return None
    head = parts[2]
    if head in LAYERS:
        return LAYERS.index(head)
    return TOP.get(head, -1)  # planner.errors (and the package itself): below everything


def test_no_module_of_loraplan_imports_in_a_circle():
    graph = {m: {t for t, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_planner_depends_only_downward_and_never_on_the_executor():
    wrong = []
    for module, path in MODULES.items():
        mine = _layer(module)
        if mine is None:
            continue
        for target, _ in _imports(module, path):
            if target.startswith("loraplan.executor") or target == "loraplan.cli":
                wrong.append(f"{module} -> {target}")
                continue
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports upward:\n" + "\n".join(wrong)


def test_no_planner_import_waits_in_a_function():
    lazy = [f"{m} -> {t}" for m, p in MODULES.items() if m.startswith("loraplan.planner")
            for t, at_top in _imports(m, p) if not at_top and t.startswith("loraplan.")]
    assert not lazy, lazy


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("loraplan.planner")))
def test_the_planner_imports_no_training_library_at_module_level(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for n in names:
            assert n.split(".")[0] not in HEAVY, f"{module} imports {n} at module level"


def test_every_planner_module_sits_in_a_layer():
    loose = [m for m in MODULES if m.startswith("loraplan.planner.") and _layer(m) == -1
             and m not in ("loraplan.planner.errors",)]
    assert not loose, f"planner modules outside the pipeline's sub-packages: {loose}"
