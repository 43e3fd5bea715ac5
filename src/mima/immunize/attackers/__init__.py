"""Simulated attackers: what the lower level of the bi-level immunizers trains (docs/method.md).

One module per kind, registered lazily by name, so that reading the registry imports only what a run uses.
"""

from __future__ import annotations

from mima.immunize.attackers.base import SimulatedAttacker, simulated_attackers

simulated_attackers.register("full", "mima.immunize.attackers.full:FullAttacker")
simulated_attackers.register("lora", "mima.immunize.attackers.lora:LoraAttacker")

__all__ = ["SimulatedAttacker", "simulated_attackers"]
