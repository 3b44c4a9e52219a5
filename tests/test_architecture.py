"""The tree is the architecture: layers import only downward, no import circles, no private names across modules.

The layers (the README's "Architecture" section explains them), lowest first. A module may import from its own
layer's packages and from layers below, never from above; a new package must be placed here."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gemma3n"

LAYERS = [
    {"config", "siglip_config", "kernels"},   # foundations: config parsing, native kernels
    {"checkpoint", "processor", "media"},     # file formats; prompts and media to tensors (nothing of the model)
    {"quant"},                                # quantised weights as modules
    {"model"},                                # the one description of the model (and its caches)
    {"engine", "structured"},                 # generation: sampling, the batch loop; grammars that constrain it
    {"convert", "matformer", "adapters", "onnx"},  # checkpoints written from checkpoints; LoRA; ONNX
    {"loading"},                              # files -> a LoadedModel record
    {"api", "__init__"},                      # the public facade: gemma3n.load, Model
    {"quant_quality", "server", "finetune"},  # tools and front ends; training
    {"scale"},                                # batch jobs and Ray: the server's app run offline or replicated
    {"cli"},                                  # the command line over all of it
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _package_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every gemma3n import, lazy ones included."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gemma3n":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "gemma3n"]
    return found


GRAPH = {m: {t for t, _, _ in _imports(m, p) if t != m} for m, p in MODULES.items()}


def test_every_package_has_a_layer():
    unplaced = sorted({_package_of(m) for m in MODULES} - set(RANK))
    assert not unplaced, f"place these packages in LAYERS (tests/test_architecture.py) and the README: {unplaced}"


def test_imports_only_go_down():
    upward = []
    for module, path in MODULES.items():
        for target, _, line in _imports(module, path):
            src, dst = _package_of(module), _package_of(target)
            if src != dst and RANK.get(dst, -1) > RANK.get(src, -1):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({dst} is above {src})")
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles_between_modules():
    # a package's __init__ re-exporting its own modules is not a circle of the design
    graph = {m: {t for t in deps if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, deps in GRAPH.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_import_circles_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(_package_of(module), set()).update(
            _package_of(t) for t in deps if _package_of(t) != _package_of(module))
    packages.pop("__init__", None)
    for deps in packages.values():
        deps.discard("__init__")
    cycle = _cycle(packages)
    assert cycle is None, " -> ".join(cycle)


def _private_names_defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_names_across_modules():
    """Neither `from x import _name` nor `obj._name` for a `_name` that the module itself does not define."""
    leaks = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target, name, line in _imports(module, path):
            if name.startswith("_") and not name.startswith("__"):
                leaks.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}.{name}")
        own = _private_names_defined(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in own and not _library_private(node):
                leaks.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} uses .{node.attr}")
    assert not leaks, "\n".join(leaks)


def _library_private(node: ast.Attribute) -> bool:
    """Private names of other libraries that their own documentation tells users to reach (sys._getframe ...)."""
    return node.attr in LIBRARY_PRIVATE


# torch's weight-only quantised matmul ops: private by name, but the kernels torch's own quantisation (and gpt-fast)
# run on; quant/modules.py checks each against its dequantised product. torch._check: how torch.export's
# documentation tells a traced model to state a data-dependent size's range (onnx/graphs.py).
LIBRARY_PRIVATE = {"_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu",
                   "_check"}


@pytest.mark.parametrize("package", sorted({_package_of(m) for m in MODULES} - {"__init__"}))
def test_package_is_documented_in_the_readme(package):
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[-1] if "## Architecture" in readme else ""
    assert f"`{package}`" in section or f"`{package}/`" in section or f"`{package}.py`" in section, \
        f"README's Architecture section does not say what `{package}` is"
