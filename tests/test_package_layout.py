"""The package's layout is its architecture: imports flow one way, from errors and the schema to the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lib" / "llm_workbook"

# Each layer may import its own layer and the ones before it, never one after it.
LAYERS = [
    {"paths", "errors", "logger", "names", "schema", "corpus", "memory"},
    {"formats"},
    {"store"},
    {"runtime"},
    {"evaluation", "quantize"},
    {"inference"},  # AI-OS's import paths, over store, quantize and evaluation
    {"synthetic"},
    {"workbook"},
    {"cli", "__main__", "__init__"},  # the package root re-exports the documented names: it sits on top
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def top_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "llm_workbook" and len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; use llm_workbook.…")
            if node.module == "llm_workbook":  # a submodule by name, or a name the package root defines
                found += [(node.lineno, f"llm_workbook.{a.name}" if (PACKAGE / a.name).is_dir()
                           or (PACKAGE / f"{a.name}.py").is_file() else "llm_workbook.__init__") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_every_module_sits_in_a_layer_and_imports_flow_one_way():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert own in RANK, f"{path}: not in any layer of {LAYERS}"
        for line, module in imports_of(path):
            target = top_part(module)
            if target is None or target not in RANK:
                continue
            if RANK[target] > RANK[own]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} (layer {RANK[target]} > {RANK[own]})")
    assert not bad, "\n".join(bad)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_workbook"):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    own_package = ".".join(("llm_workbook", *path.relative_to(PACKAGE).parts[:-1]))
                    # a private module of one's own package (formats/_bitpack, formats/_codec) is fine
                    if private and not (node.module == own_package or node.module.endswith("._codec")):
                        bad.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {node.module}.{alias.name}")
    assert not bad, "\n".join(bad)


def test_every_registered_format_has_the_required_verbs_and_defaults_for_the_optional_ones():
    import copy
    import types

    import torch

    from llm_workbook import formats
    from llm_workbook.formats.base import Format, QuantizedTensor

    names = [f.NAME for f in formats.all_formats()]
    assert len(names) == len(set(names)) and "dense" in names and "ptq" in names
    dense = formats.get_format("dense")
    record = QuantizedTensor("dense", "layer", {"weight": torch.ones(2, 2)}, {})
    assert dense.to_hf(record).keys() == {"weight"}  # the default: the stored arrays as they are
    assert dense.hf_names({}, ["weight"]) == ["weight"] and dense.encode_dense("w", torch.ones(1)) is None
    assert formats.get_format("gguf").per_tensor and not dense.per_tensor
    assert copy.deepcopy(dense).NAME == "dense"
    broken = types.ModuleType("broken")
    broken.NAME = "broken"
    try:
        Format(broken)
    except TypeError as exc:
        assert "detect" in str(exc)
    else:
        raise AssertionError("a module without the verbs was accepted")


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at any depth of the file (function-level
    imports count: they are dependencies too)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name_of(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_workbook"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else resolve(node.module))
            elif isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("llm_workbook"))
        graph[name] = deps - {None, name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"
