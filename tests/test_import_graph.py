"""The package's import graph: layers import only from layers below them (or their own), and there is no circle.

Lazy imports inside functions count too: they hide a dependency, they do not remove it.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the longest prefix listed.
LAYERS = [
    ("mima.errors", "mima.registry", "mima.utils", "mima.config", "mima.executors"),
    ("mima.losses", "mima.functional", "mima.training", "mima.toy.world", "mima.data"),
    ("mima.models",),
    ("mima.merge", "mima.sampling"),
    ("mima.toy",),
    ("mima.immunize", "mima.attacks", "mima.evaluate"),
    ("mima.benchmark",),
    ("mima.cli", "mima.__main__", "mima"),
]


def _layer(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from ..errors import X` in mima.utils.device is mima.errors
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {next(c for c in candidates if c in modules or c == candidates[-1])}
        graph[name] = {t for t in targets if t.split(".")[0] == "mima" and t != name}
    return graph


def test_no_import_reaches_up_a_layer():
    upward = [f"{m} -> {t}" for m, targets in _imports().items() for t in targets if _layer(t) > _layer(m)]
    assert not upward


def test_no_import_circle_between_packages():
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges = {(package(m), package(t)) for m, ts in _imports().items() for t in ts if package(m) != package(t)}
    circles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not circles
