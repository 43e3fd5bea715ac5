"""The architecture's checkable rules: small modules and functions, one diffusion loss, no hard-coded widths,
accelerators named in one module only."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mima"
MODULES = sorted(SRC.rglob("*.py"))


def test_modules_under_400_lines_and_functions_under_60():
    too_long = [f"{p.relative_to(SRC)}: {n} lines" for p in MODULES if (n := len(p.read_text().splitlines())) > 400]
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{path.relative_to(SRC)}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long


def test_one_diffusion_loss_no_widths_and_accelerators_in_one_module():
    sources = {p.relative_to(SRC).as_posix(): p.read_text() for p in MODULES}
    assert [name for name, text in sources.items() if "add_noise(" in text] == ["losses.py"]
    widths = [name for name, text in sources.items() if re.search(r"\b(768|1024)\b", text)]
    assert widths in ([], ["utils/device.py"])  # device.py converts KiB to bytes
    assert {name for name, text in sources.items() if re.search(r"[\"']cuda|[\"']mps", text)} <= {"utils/device.py"}
