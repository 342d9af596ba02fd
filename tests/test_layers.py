"""The package's layers, kept by CI: no import cycles, no import upward, and no training stack
(Lightning, Hydra, OmegaConf, wandb, WebDataset) below the training layer, at import time or lazily.
Imports are read with `ast`, so a lazy import inside a function counts like any other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vgtrain"

# Lowest first; a module may import its own layer or a lower one. Top-level modules not listed
# here are an error: a new one must be given its place.
LAYERS: list[tuple[str, ...]] = [
    ("vgtrain", "vgtrain.errors", "vgtrain.files"),
    ("vgtrain.models", "vgtrain.metrics"),
    ("vgtrain.decode", "vgtrain.export", "vgtrain.data", "vgtrain.evaluation"),
    ("vgtrain.config", "vgtrain.training", "vgtrain.bench"),
    ("vgtrain.cli",),
]
TRAINING_STACK = ("lightning", "hydra", "omegaconf", "wandb", "webdataset")
# Decoding an export needs torch, transformers, open_clip and safetensors only.
STACK_FREE = (
    "vgtrain.errors",
    "vgtrain.files",
    "vgtrain.models",
    "vgtrain.metrics",
    "vgtrain.decode",
    "vgtrain.export",
    "vgtrain.evaluation",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every dotted name an import statement in ``path`` reaches, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> vgtrain modules it imports, module -> third-party top-level packages)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        edges[module], external[module] = set(), set()
        for name in imported_names(path):
            if name.split(".")[0] != "vgtrain":
                external[module].add(name.split(".")[0])
                continue
            target = name
            while target and target not in files:  # `from pkg import function` -> pkg
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges, external


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> int:
    best, depth = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = level, prefix.count(".")
    if best is None or (depth == 0 and module != "vgtrain"):
        raise AssertionError(f"{module} has no layer in tests/test_layers.py LAYERS; give it one")
    return best


def test_the_package_has_no_import_cycle():
    edges, _ = import_graph()
    assert find_cycles(edges) == []


def test_no_module_imports_a_higher_layer():
    edges, _ = import_graph()
    upward = [
        f"{module} (layer {layer_of(module)}) -> {target} (layer {layer_of(target)})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_libraries_below_training_import_no_training_stack():
    edges, external = import_graph()
    stack_free = [m for m in edges if any(m == p or m.startswith(p + ".") for p in STACK_FREE)]
    assert "vgtrain.decode.decoder" in stack_free and "vgtrain.export.writer" in stack_free
    reaching = [
        f"{module} imports {package}"
        for module in sorted(stack_free)
        for package in sorted(external[module] & set(TRAINING_STACK))
    ]
    assert reaching == []


@pytest.mark.parametrize(
    "source, cycles",
    [
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_cycle_finder_finds_cycles(source, cycles):
    assert find_cycles(source) == cycles


def test_lazy_and_relative_imports_are_read(tmp_path, monkeypatch):
    package = tmp_path / "vgtrain"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "mod.py").write_text("def f():\n    import wandb\n    from . import other\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    names = imported_names(package / "sub" / "mod.py")
    assert {"wandb", "vgtrain.sub", "vgtrain.sub.other"} <= names
