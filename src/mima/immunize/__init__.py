"""Immunization methods behind one interface.

Names resolve lazily, so that `mima.immunize.config` imports without torch; reading `immunizers` (or
`ImmunizationRun`) imports every method module, which registers itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_METHOD_MODULES = ("mima.immunize.erase", "mima.immunize.imma", "mima.immunize.mima")
_EXPORTS = {
    "ImmunizeConfig": "mima.immunize.config",
    "Immunizer": "mima.immunize.base",
    "immunizers": "mima.immunize.base",
    "ImmunizationRun": "mima.immunize.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mima.immunize' has no attribute '{name}'")
    for module in _METHOD_MODULES:
        importlib.import_module(module)
    return getattr(importlib.import_module(_EXPORTS[name]), name)
