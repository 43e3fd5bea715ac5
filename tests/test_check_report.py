"""scripts/check_report.py on tiny synthetic reports: renders in headless Chromium when /usr/bin/chromium exists."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_report.py"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip("needs /usr/bin/chromium (apt-get install -y chromium)")
    return CHROMIUM


def _png_2x2() -> str:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (2, 2), bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0])).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_report(folder: Path, *, table: bool) -> Path:
    summary = ("<table id='summary'><tr><th>method</th><th>MSGR %</th></tr>"
               "<tr><td>mima</td><td>12.3</td></tr></table>") if table else "<p>no table here</p>"
    style = "width:200px;height:200px;image-rendering:pixelated"
    image = f"<img src='data:image/png;base64,{_png_2x2()}' style='{style}'>"
    html = f"<!doctype html><html><body><h1>mima benchmark report</h1>{summary}{image}</body></html>"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.html").write_text(html, encoding="utf-8")
    return folder


def _check(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(folder), *extra], capture_output=True, text=True,
                          timeout=180)


def test_valid_report_passes(tmp_path: Path, chromium: Path) -> None:
    folder = _write_report(tmp_path / "report", table=True)
    result = _check(folder, "--chromium", str(chromium))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK:") and "1 data row(s), 1 embedded PNG(s)" in result.stdout
    assert (folder / "report.png").is_file()


def test_report_without_summary_table_fails(tmp_path: Path, chromium: Path) -> None:
    folder = _write_report(tmp_path / "report", table=False)
    result = _check(folder, "--chromium", str(chromium))
    assert result.returncode == 1
    assert "summary" in result.stderr


def test_missing_report_fails(tmp_path: Path) -> None:
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "no report.html" in result.stderr


def test_missing_chromium_exits_2(tmp_path: Path) -> None:
    folder = _write_report(tmp_path / "report", table=True)
    result = _check(folder, "--chromium", str(tmp_path / "no-such-chromium"))
    assert result.returncode == 2
    assert "apt-get install -y chromium" in result.stderr
