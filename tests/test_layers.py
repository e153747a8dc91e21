"""Dependencies point one way: the model, its porting, the attention machinery, sampling, training, serving. Every
import of the package (module level or inside a function) is read from the source and checked against the layers,
and the graph must have no cycle. Benchmarks stand beside the tests and never import them."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagecraft"
# Lower layers never import higher ones. Within a layer, imports go either way as long as there is no cycle.
LAYERS = [
    ["files", "runtime", "tokenizer", "prompts", "testing", "shapes.world", "shapes.score"],  # import only each other
    ["unet"],  # the model
    ["port"],  # diffusers' and LDM layouts <-> UNet_SD
    ["explain"],  # capturing attention in UNet_SD's processors, the maps, their figures
    ["schedulers", "settings", "png", "loading", "lora", "embeddings", "pipeline"],  # sampling
    ["train", "shapes"],  # fine-tuning, the built-in model's recipe and training
    ["serve", "cli", "__main__"],  # what the app and the command line do
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in layer):
            return i
    raise AssertionError(f"imagecraft.{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it, as names relative to the package."""
    tree = ast.parse(path.read_text())
    parts = [p for p in module_name(path).split(".") if p]
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in
                   ast.unparse(block.test) for n in ast.walk(block)}  # annotations only, never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("imagecraft")]
            found |= {n.removeprefix("imagecraft").lstrip(".") for n in names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] if node.level > 1 else package
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("imagecraft"):
                prefix = node.module.removeprefix("imagecraft").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import world` names a module; `from .unet import UNet_SD` does not
                candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                found.add(candidate if _is_module(candidate) else prefix)
    return {_owning_module(n) for n in found if n}


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _owning_module(name: str) -> str:
    while name and not _is_module(name):
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path) - {name} for name, path in modules.items() if name}


def test_every_import_goes_down_or_across_the_layers():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(f"imagecraft.{name} imports imagecraft.{target}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(sorted(wrong))


def test_the_import_graph_has_no_cycle():
    edges = graph()
    done, active, cycles = set(), [], []

    def visit(node):
        if node in active:
            cycles.append(" -> ".join(active[active.index(node):] + [node]))
            return
        if node in done:
            return
        active.append(node)
        for target in sorted(edges.get(node, ())):
            if target:  # the package itself (imagecraft/__init__.py) is the public face, above everything
                visit(target)
        active.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_relative_and_function_local_imports(tmp_path):
    """The reader itself: a function-local relative import is found and resolved to its module."""
    assert "port" in imports_of(PACKAGE / "__init__.py")
    assert {"unet", "runtime"} <= imports_of(PACKAGE / "pipeline.py")
    assert "shapes.world" in imports_of(PACKAGE / "shapes" / "score.py")


def test_benches_never_import_the_tests():
    offenders = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("tests", "helpers",
                                                                                                  "conftest"):
                offenders.append(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("tests", "helpers") for a in node.names):
                offenders.append(f"{path.name}: import {node.names[0].name}")
        if '"tests"' in text or "'tests'" in text:
            offenders.append(f"{path.name}: puts tests/ on the path")
    assert not offenders, "\n".join(offenders)
