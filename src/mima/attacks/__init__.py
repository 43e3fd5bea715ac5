"""Adaptation methods (attacks) behind one interface; importing this package registers them all."""

from mima.attacks import custom_diffusion, dreambooth, lora, textual_inversion  # noqa: F401  (registration)
from mima.attacks.base import Attack, AttackConfig, attacks
from mima.attacks.trainer import AttackRun

__all__ = ["Attack", "AttackConfig", "AttackRun", "attacks"]
