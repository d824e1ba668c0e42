"""The package's layering (docs/architecture.md) holds: no import goes up, no cycle, no module over 300 lines,
no function over 60."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "convae"

# highest last, as in docs/architecture.md
LAYERS = [
    {"errors", "files", "records", "device", "cores", "distributed", "knobs", "heap"},
    {"arch", "stages", "models", "patchnet", "blocks", "ops", "objectives", "augment", "recipe"},
    {"config", "validation"},
    {"data", "data.images", "data.archives", "data.decode", "data.cache", "data.sources", "data.batches",
     "data.rundata", "data.rows", "data.inventory",
     "data.memory"},
    {"checkpoint", "rundir", "report", "pages", "visualise", "reference", "hub", "sweep_table"},
    {"loop", "evaluate", "probes", "fit", "joint"},
    {"phases", "pipeline", "sweep", "embeddings", "prediction", "export", "evaluation"},
    {"commands", "api", "cli", "__main__", "__init__"},
]


def _name(path: Path) -> str:
    parts = [p for p in path.relative_to(PKG).with_suffix("").parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def _imports(path: Path, names: set[str]) -> set[str]:
    pkg = _name(path).split(".") if path.name == "__init__.py" and path.parent != PKG else _name(path).split(".")[:-1]
    if path == PKG / "__init__.py":
        pkg = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for cand in [target] + [f"{target}.{a.name}" if target else a.name for a in node.names]:
                if cand in names:
                    found.add(cand)
    return found


def test_every_module_has_a_layer_and_imports_only_downward():
    files = {_name(p): p for p in PKG.rglob("*.py")}
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    assert set(files) == set(layer), "a module is missing from the layers (add it here and to docs/architecture.md)"
    upward = [(m, i) for m, p in files.items() for i in _imports(p, set(files)) - {m} if layer[i] > layer[m]]
    assert upward == []


def test_no_module_is_over_300_lines():
    long = {_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_no_function_is_over_60_lines():
    long = {f"{_name(p)}.{node.name}": node.end_lineno - node.lineno + 1
            for p in PKG.rglob("*.py") for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60}
    assert long == {}
