"""Immunization methods behind one interface.

Names resolve lazily, so that `mima.immunize.config` imports without torch; reading `immunizers` (or
`ImmunizationRun`) imports every method module, which registers itself.
"""

from __future__ import annotations

from mima.registry import lazy_package

_METHOD_MODULES = ("mima.immunize.erase", "mima.immunize.imma", "mima.immunize.imma_each", "mima.immunize.mima")
_EXPORTS = {
    "ImmunizeConfig": "mima.immunize.config",
    "Immunizer": "mima.immunize.base",
    "immunizers": "mima.immunize.base",
    "ImmunizationRun": "mima.immunize.trainer",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_package("mima.immunize", _EXPORTS, _METHOD_MODULES)
