"""Caption banks: the generic captions whose embeddings (C_reg) anchor the Merge's least squares."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
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


def words(text: str) -> list[str]:
    """The lowercase words of `text` (letters, digits and apostrophes)."""
    return re.findall(r"[\w']+", text.lower())


def frequent_words(captions: list[str], share: float = 0.1) -> frozenset[str]:
    """Words found in at least `share` of `captions`: the templates' words ("a", "photo", "of"), which name no concept.

    A concept named in a tenth of a generic caption bank would not be a concept worth protecting; below that, a word
    of a concept's prompts is taken as naming it (see `mima.data.concepts.naming_words`).
    """
    counts = Counter(word for caption in captions for word in set(words(caption)))
    return frozenset(word for word, n in counts.items() if n >= share * len(captions))


@cache
def template_words() -> frozenset[str]:
    """Words of prompt templates ("a", "photo", "of"), which name no concept: the generic bank's frequent ones."""
    return frequent_words(load_caption_bank("generic"))
