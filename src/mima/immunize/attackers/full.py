"""`full`: SGD on the UNet's own S^l from the current weights, DreamBooth-like (the former default attacker)."""

from __future__ import annotations

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.attackers.base import SimulatedAttacker
from mima.models.components import Components


class FullAttacker(SimulatedAttacker):
    """Steps on the UNet's own S^l from theta^{k-1} (phi = theta on S^l): the UNet weights ARE phi."""

    def prepare(self, components: Components, specs: list[ConceptSpec], lower_names: list[str]) -> None:
        self.lower_names = lower_names

    def start(self, base: Params, concepts: list[int], generator: torch.Generator) -> Params:
        return {name: base[name] for name in self.lower_names}

    def weights(self, params: Params) -> Params:
        return {name: params[name] for name in self.lower_names}

    def kept(self, phi: Params) -> Params:
        return {}  # the pull-back is the identity: no copy of S^l kept per concept

    def pull_back(self, base: Params, phi: Params, cotangent: Params, wrt: list[str]) -> tuple[Params, Params]:
        return {name: cotangent[name] for name in self.lower_names}, {}
