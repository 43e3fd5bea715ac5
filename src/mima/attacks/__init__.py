"""Adaptation methods (attacks) behind one interface.

Names resolve lazily, so that `mima.attacks.config` imports without torch; reading `attacks` (or `AttackRun`)
imports every method module, which registers itself.
"""

from __future__ import annotations

from mima.registry import lazy_package

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


__getattr__ = lazy_package("mima.attacks", _EXPORTS, _METHOD_MODULES)
