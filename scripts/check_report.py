#!/usr/bin/env python
"""Check that a benchmark report renders: load `report.html` in headless Chromium, inspect the DOM and a screenshot.

    python scripts/check_report.py RUN/report [--chromium /usr/bin/chromium] [--timeout 90]

1. `chromium --dump-dom`: the rendered DOM must hold the table `id="summary"` with at least one data row (a `<tr>`
   with a `<td>`) and at least one `<img>` whose `src` is a `data:image/png;base64,` URL that decodes to a PNG.
2. `chromium --screenshot=<folder>/report.png --window-size=1280,2000`: the PNG must exist and not be blank (more
   than `--min-colours` distinct colours, counted with Pillow).

Exit status: 0 with a one-line summary; 1 with the reason when a check fails; 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HEADLESS_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)
PNG_PREFIX = "data:image/png;base64,"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = (1280, 2000)


class CheckFailed(Exception):
    """A check failed; the message says which and why (exit status 1)."""


class _ReportParser(HTMLParser):
    """Counts the data rows of `table#summary` and the `<img>` elements with an embedded PNG."""

    def __init__(self) -> None:
        super().__init__()
        self.summary_found = False
        self.summary_rows = 0
        self.pngs: list[str] = []
        self._table_depth = 0  # > 0 while inside table#summary (counts nested tables)
        self._row_has_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            if self._table_depth:
                self._table_depth += 1
            elif attributes.get("id") == "summary":
                self.summary_found, self._table_depth = True, 1
        elif tag == "tr" and self._table_depth:
            self._row_has_cell = False
        elif tag == "td" and self._table_depth and not self._row_has_cell:
            self._row_has_cell = True
            self.summary_rows += 1
        elif tag == "img" and (attributes.get("src") or "").startswith(PNG_PREFIX):
            self.pngs.append(attributes["src"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table_depth:
            self._table_depth -= 1


def find_chromium(explicit: str | None) -> str | None:
    """The Chromium binary: `--chromium`, else `$CHROMIUM`, else the first of `CANDIDATES` on the PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM")):
        if candidate:
            return candidate if Path(candidate).is_file() and os.access(candidate, os.X_OK) else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def run_chromium(chromium: str, args: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run headless Chromium with a throw-away profile; (exit status or None on timeout, stdout, stderr).

    Chromium starts helper processes, so it runs in its own session and, on a timeout, that whole group is ended.
    """
    profile = tempfile.mkdtemp(prefix="check-report-chromium-")
    command = [chromium, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               errors="replace", start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _tail(text: str, lines: int = 5) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return ("\n  chromium said: " + "\n  ".join(kept)) if kept else ""


def check_dom(chromium: str, url: str, timeout: float) -> tuple[int, int]:
    """(summary data rows, embedded PNG images) of the rendered DOM; `CheckFailed` if either is missing."""
    status, dom, stderr = run_chromium(chromium, ["--dump-dom", url], timeout)
    if status is None:
        raise CheckFailed(f"chromium --dump-dom did not finish within {timeout:.0f} s{_tail(stderr)}")
    if status != 0 or not dom.strip():
        raise CheckFailed(f"chromium --dump-dom failed (exit {status}, {len(dom)} characters of DOM){_tail(stderr)}")
    parser = _ReportParser()
    parser.feed(dom)
    parser.close()
    if not parser.summary_found:
        raise CheckFailed("the rendered DOM has no <table id='summary'>")
    if not parser.summary_rows:
        raise CheckFailed("table#summary has no data row (no <tr> with a <td>)")
    if not parser.pngs:
        raise CheckFailed(f"the rendered DOM has no <img> with a '{PNG_PREFIX}...' src")
    for index, src in enumerate(parser.pngs):
        try:
            data = base64.b64decode(src[len(PNG_PREFIX):], validate=True)
        except (binascii.Error, ValueError) as e:
            raise CheckFailed(f"embedded image {index + 1} is not valid base64: {e}") from None
        if not data.startswith(PNG_MAGIC):
            raise CheckFailed(f"embedded image {index + 1} is not a PNG (no PNG signature)")
    return parser.summary_rows, len(parser.pngs)


def check_screenshot(chromium: str, url: str, png: Path, timeout: float, min_colours: int) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a fresh screenshot; `CheckFailed` if it is missing or blank."""
    try:
        from PIL import Image
    except ImportError:
        raise CheckFailed("Pillow is needed to inspect the screenshot: pip install pillow") from None
    png.unlink(missing_ok=True)
    status, _, stderr = run_chromium(
        chromium, [f"--screenshot={png}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url], timeout)
    if not png.is_file():  # Chromium may hang after writing the file: judge the file, not the exit status
        state = "did not finish" if status is None else f"exited {status}"
        raise CheckFailed(f"chromium --screenshot {state} and wrote no '{png}'{_tail(stderr)}")
    try:
        with Image.open(png) as image:
            rgb = image.convert("RGB")
    except OSError as e:
        raise CheckFailed(f"cannot read the screenshot '{png}': {e}") from None
    colours = rgb.getcolors(maxcolors=rgb.width * rgb.height) or []
    if len(colours) <= min_colours:
        raise CheckFailed(f"the screenshot '{png}' looks blank: {len(colours)} distinct colour(s), "
                          f"expected more than {min_colours}")
    return rgb.width, rgb.height, len(colours)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="report folder holding report.html (e.g. RUN/report)")
    parser.add_argument("--chromium", help="Chromium binary (default: $CHROMIUM, else chromium on the PATH)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per Chromium run (default: %(default)s)")
    parser.add_argument("--min-colours", type=int, default=16,
                        help="a screenshot with this many distinct colours or fewer is blank (default: %(default)s)")
    args = parser.parse_args(argv)

    report = args.folder / "report.html"
    if not report.is_file():
        print(f"FAIL: no report.html in '{args.folder}' (expected the report folder of `mima benchmark`)",
              file=sys.stderr)
        return 1
    chromium = find_chromium(args.chromium)
    if chromium is None:
        where = f"'{args.chromium or os.environ.get('CHROMIUM')}' is not an executable file; " if (
            args.chromium or os.environ.get("CHROMIUM")) else ""
        print(f"chromium not found: {where}install it (Debian/Ubuntu: apt-get install -y chromium) "
              "or pass --chromium /path/to/chromium", file=sys.stderr)
        return 2
    url = report.resolve().as_uri()
    png = args.folder / "report.png"
    try:
        rows, images = check_dom(chromium, url, args.timeout)
        width, height, colours = check_screenshot(chromium, url, png, args.timeout, args.min_colours)
    except CheckFailed as e:
        print(f"FAIL: {report}: {e}", file=sys.stderr)
        return 1
    print(f"OK: {report}: table#summary has {rows} data row(s), {images} embedded PNG(s); "
          f"screenshot {png} {width}x{height} with {colours} colours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
