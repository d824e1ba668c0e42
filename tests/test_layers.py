"""The package's layering (docs/architecture.md) holds: a module's layer is its package, no import goes up,
so the package graph has no cycle. Size is guidance: a module over ~500 lines or a function over ~100 warns."""

import ast
import warnings
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "convae"

# lowest first, as in docs/architecture.md; "" is the top: the API, the command line and the package itself
LAYERS = ["utils", "data", "models", "config", "outputs", "evaluation", "training", "commands", ""]
MODULE_LINES, FUNCTION_LINES = 500, 100


def _name(path: Path) -> str:
    parts = [p for p in path.relative_to(PKG).with_suffix("").parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _package(module: str) -> str:
    return module.split(".")[0] if "." in module or (PKG / module).is_dir() else ""


def _imports(path: Path, names: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (relative imports; the package never imports itself absolutely)."""
    pkg = list(path.relative_to(PKG).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for cand in [target] + [f"{target}.{a.name}" if target else a.name for a in node.names]:
                if cand in names:
                    found.add(cand)
    return found


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in PKG.rglob("*.py")}


def test_a_modules_layer_is_its_package():
    packages = {_package(m) for m in _modules()}
    assert packages == set(LAYERS), "a package is missing from LAYERS (add it here and to docs/architecture.md)"


def test_no_import_goes_up_so_the_packages_have_no_cycle():
    files = _modules()
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    upward = sorted(
        (m, i) for m, p in files.items() for i in _imports(p, set(files)) - {m} if rank[_package(i)] > rank[_package(m)]
    )
    assert upward == []


def test_the_absolute_import_of_a_module_is_not_used_inside_the_package():
    absolute = sorted(
        _name(p)
        for p in PKG.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and not getattr(node, "level", 0)
        and any(
            n == "convae" or n.startswith("convae.")
            for n in ([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
        )
    )
    assert absolute == []


def _over(module_lines: int, function_lines: int) -> dict[str, int]:
    """Modules and functions (``module.function``) longer than the bounds, with their lengths."""
    found = {_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > module_lines}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            n = node.end_lineno - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
            if n > function_lines:
                found[f"{_name(p)}.{node.name}"] = n
    return found


def test_sizes_are_guidance():
    """A module or function above the guide is named in a warning, to be read, not obeyed: a file that is one
    concept stays whole (nanoGPT's model.py, timm's resnet.py)."""
    assert set(_modules()) <= set(_over(0, 0)), "the size scan missed a module"
    for what, size in _over(MODULE_LINES, FUNCTION_LINES).items():
        warnings.warn(f"{what}: {size} lines, above the guide", stacklevel=1)
