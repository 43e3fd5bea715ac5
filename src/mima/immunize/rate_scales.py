"""`upper_lr_scales`: multiples of the upper level's learning rate for the S^u parameters a name glob matches (light
to import)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

from mima.errors import ConfigError


def parse_rate_scale(entry: str) -> tuple[str, float]:
    """A `GLOB=SCALE` entry of `upper_lr_scales` as (glob, scale); a malformed one or a scale <= 0 is a ConfigError."""
    glob, sep, scale = entry.rpartition("=")
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not sep or not glob or not 0 < value < math.inf:
        raise ConfigError(f"upper_lr_scales entries are GLOB=SCALE with a positive SCALE, got {entry!r}")
    return glob, value


def rate_scales(entries: Sequence[str], upper_names: Sequence[str]) -> dict[str, float]:
    """Each S^u parameter's multiple of outer_lr: the last entry whose glob matches it, else 1. A glob matching none
    of them is a ConfigError, since a misspelt one would silently change nothing."""
    parsed = [parse_rate_scale(entry) for entry in entries]
    for glob, _ in parsed:
        if not any(fnmatchcase(name, glob) for name in upper_names):
            raise ConfigError(f"the upper_lr_scales glob {glob!r} matches no upper-level (S^u) parameter")
    return {name: next((scale for glob, scale in reversed(parsed) if fnmatchcase(name, glob)), 1.0)
            for name in upper_names}
