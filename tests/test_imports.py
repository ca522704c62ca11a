"""Imports point downward: no module imports one above it, and no cycles.

The layers, lowest first (a module may import its own layer's package and
anything below it, never above)::

    checkpoints, devices, stats, utils     shared helpers
    adapters                               PEFT adapter folders (checkpoints)
    spectra, lora, projections, allocation measurements, adapters, rank budgets
    reports                                ΔW of two checkpoints, layer by layer
    extract                                LoRA from a full fine-tune (spectra + lora)
    train                                  the one training loop
    tasks, subspace, plots                 models + data; subspace wrapper; figures
    methods, stacked                       one recipe per method; K runs in one model
    batched, adalora                       many LoRA runs in one model; AdaLoRA (PEFT)
    intrinsic, sweep, budgets              experiments
    figures                                the README's figures
    rankkit (the package), cli, __main__   entry points, each above the one before

The imports are read from the source with :mod:`ast` (function-level ones
included), so the test sees exactly what a reader sees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rankkit"

LAYERS = [
    ["rankkit.checkpoints", "rankkit.devices", "rankkit.stats", "rankkit.utils"],
    ["rankkit.adapters"],
    ["rankkit.spectra", "rankkit.lora", "rankkit.projections", "rankkit.allocation"],
    ["rankkit.reports"],
    ["rankkit.extract"],
    ["rankkit.train"],
    ["rankkit.tasks", "rankkit.subspace", "rankkit.plots"],
    ["rankkit.methods", "rankkit.stacked"],
    ["rankkit.batched", "rankkit.adalora"],
    ["rankkit.intrinsic", "rankkit.sweep", "rankkit.budgets"],
    ["rankkit.figures"],
    ["rankkit"],
    ["rankkit.cli"],
    ["rankkit.__main__"],
]
LAYER = {group: level for level, groups in enumerate(LAYERS) for group in groups}


def group_of(module: str) -> str:
    """The layer group a module belongs to: ``rankkit.train.loop`` -> ``rankkit.train``."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER:
            return ".".join(parts[:n])
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rankkit_imports(source: str, module: str) -> list[str]:
    """Every ``rankkit...`` module that ``source`` imports (anywhere in the file)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "rankkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                raise AssertionError(f"{module}: use absolute imports (from rankkit...).")
            if node.module and node.module.split(".")[0] == "rankkit":
                found.append(node.module)
    return found


def upward_imports(module: str, imports: list[str]) -> list[str]:
    """The imports of ``module`` that point to its own layer's other groups or above."""
    mine = group_of(module)
    return [
        target
        for target in imports
        if group_of(target) != mine and LAYER[group_of(target)] >= LAYER[mine]
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> imported modules) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    out = {}
    for name, path in modules.items():
        targets = set()
        for target in rankkit_imports(path.read_text(), name):
            # "from rankkit.tasks import base" names a module too; keep the deepest that exists
            targets.add(target if target in modules else target.rsplit(".", 1)[0])
        out[name] = targets - {name}
    return out


def test_every_module_has_a_layer(graph):
    for module in graph:
        group_of(module)  # raises KeyError for a module missing from LAYERS


def test_no_module_imports_a_layer_above_it(graph):
    problems = {m: upward_imports(m, sorted(t)) for m, t in graph.items()}
    assert {m: up for m, up in problems.items() if up} == {}


def test_the_imports_have_no_cycle(graph):
    assert find_cycle(graph) is None


def test_train_imports_nothing_from_tasks_lora_sweep_or_intrinsic(graph):
    forbidden = ("rankkit.tasks", "rankkit.lora", "rankkit.sweep", "rankkit.intrinsic")
    for module, targets in graph.items():
        if group_of(module) == "rankkit.train":
            assert not [t for t in targets if t.startswith(forbidden)], module


def test_the_checks_catch_an_upward_import_and_a_cycle():
    source = "def f():\n    from rankkit.sweep import run_sweep\n"
    assert upward_imports("rankkit.train", rankkit_imports(source, "rankkit.train")) == [
        "rankkit.sweep"
    ]
    assert upward_imports("rankkit.tasks.digits", ["rankkit.tasks.base", "rankkit.train"]) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
