"""Figures of an evaluation: similarity-vs-attack-step curves (like MIMA's Fig. 1) and sample grids."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from mima.data.image_folder import read_image_folder
from mima.evaluate.metrics import CONDITIONS
from mima.evaluate.results import ConceptResult

_COLOURS = {"without": "tab:blue", "with": "tab:red"}
_LABELS = {"without": "without immunization", "with": "with immunization"}


def slug(text: str) -> str:
    """`text` as a safe file name: runs of characters other than letters, digits, `.`, `_` and `-` become `_`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "_"


def plot_curves(concept: ConceptResult, title: str, path: str | Path) -> Path:
    """Plot S(t) without and with immunization against the attack step; a second panel shows the attack-success rate.

    Args:
        concept (`ConceptResult`):
            One concept's curves of an `evaluate_runs` result.
        title (`str`):
            Figure title.
        path (`str` or `Path`):
            Output PNG; parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(concept.similarity, "similarity S(G, R)", None)]
    if concept.asr_without is not None:
        panels.append((concept.success_rate, "attack-success rate", (-0.05, 1.05)))
    figure = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (curve, label, limits) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for condition in CONDITIONS:
            axes.plot(concept.steps, curve(condition), "o-", color=_COLOURS[condition], label=_LABELS[condition])
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if limits is not None:
            axes.set_ylim(*limits)
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
