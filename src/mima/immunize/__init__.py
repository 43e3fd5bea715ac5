"""Immunization methods behind one interface; importing this package registers them all."""

from mima.immunize import erase, imma, mima  # noqa: F401  (registration)
from mima.immunize.base import ImmunizeConfig, Immunizer, immunizers
from mima.immunize.trainer import ImmunizationRun

__all__ = ["ImmunizationRun", "ImmunizeConfig", "Immunizer", "immunizers"]
