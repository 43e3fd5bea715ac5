"""Adaptation methods (attacks) behind one interface.

Names resolve lazily, so that `mima.attacks.config` imports without torch; reading `attacks` (or `AttackRun`)
imports every method module, which registers itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_METHOD_MODULES = (
    "mima.attacks.custom_diffusion", "mima.attacks.dreambooth", "mima.attacks.lora", "mima.attacks.textual_inversion",
)
_EXPORTS = {
    "AttackConfig": "mima.attacks.config",
    "Attack": "mima.attacks.base",
    "attacks": "mima.attacks.base",
    "AttackRun": "mima.attacks.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mima.attacks' has no attribute '{name}'")
    for module in _METHOD_MODULES:
        importlib.import_module(module)
    return getattr(importlib.import_module(_EXPORTS[name]), name)
