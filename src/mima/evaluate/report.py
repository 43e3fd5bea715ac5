"""Figures of an evaluation: similarity-vs-attack-step curves (like MIMA's Fig. 1) and sample grids."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mima.data.image_folder import read_image_folder

_COLOURS = {"without": "tab:blue", "with": "tab:red"}
_LABELS = {"without": "without immunization", "with": "with immunization"}


def slug(text: str) -> str:
    """`text` as a safe file name: runs of characters other than letters, digits, `.`, `_` and `-` become `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "_"


def plot_curves(concept: Mapping[str, Any], title: str, path: str | Path) -> Path:
    """Plot S(t) without and with immunization against the attack step; a second panel shows the attack-success rate.

    Args:
        concept (`Mapping[str, Any]`):
            One concept's block of an `evaluate_runs` result (`steps`, `s_without`, `s_with`, `asr_without`,
            `asr_with`).
        title (`str`):
            Figure title.
        path (`str` or `Path`):
            Output PNG; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [("s", "similarity S(G, R)")]
    if concept.get("asr_without") is not None:
        panels.append(("asr", "attack-success rate"))
    figure = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (prefix, label) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for condition in ("without", "with"):
            values = [np.nan if v is None else v for v in concept[f"{prefix}_{condition}"]]
            axes.plot(concept["steps"], values, "o-", color=_COLOURS[condition], label=_LABELS[condition])
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if prefix == "asr":
            axes.set_ylim(-0.05, 1.05)
        axes.set_xlabel("attack step")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def save_comparison_grid(without_dir: str | Path, with_dir: str | Path, path: str | Path, n: int = 8) -> Path:
    """Save up to `n` samples of each folder as a two-row grid: top row without immunization, bottom row with.

    Args:
        without_dir (`str` or `Path`):
            Image folder of the attacked model without immunization.
        with_dir (`str` or `Path`):
            Image folder of the attacked immunized model.
        path (`str` or `Path`):
            Output PNG.
        n (`int`, defaults to 8):
            Images per row.
    """
    from mima.sampling import save_grid  # imports diffusers: only when a grid is drawn

    rows = [read_image_folder(folder)[0] for folder in (without_dir, with_dir)]
    count = min(n, *(len(row) for row in rows))
    size = rows[0][0].size
    images = [
        image.resize(size, Image.BICUBIC) if image.size != size else image for row in rows for image in row[:count]
    ]
    return save_grid(np.stack([np.asarray(image) for image in images]), path, columns=count)
