"""Caption banks: the generic captions whose embeddings (C_reg) anchor the Merge's least squares."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mima.config import read_text
from mima.errors import DataError

BUILTIN_BANKS = ("toy", "generic")


def load_caption_bank(name_or_path: str | Path) -> list[str]:
    """Captions from a built-in bank ("toy", "generic") or a text file with one caption per line."""
    if str(name_or_path) in BUILTIN_BANKS:
        path = Path(str(resources.files("mima") / "assets" / "captions" / f"{name_or_path}.txt"))
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise DataError(f"caption bank '{name_or_path}' is neither {' nor '.join(BUILTIN_BANKS)} nor a file")
    captions = [line.strip() for line in read_text(path, "caption bank").splitlines() if line.strip()]
    if not captions:
        raise DataError(f"caption bank '{path}' has no captions")
    return captions
