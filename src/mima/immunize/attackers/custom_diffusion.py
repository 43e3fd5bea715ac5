"""`custom-diffusion`: the cross-attention keys and values in S^l plus a fresh token, as Custom Diffusion trains.

MIMA merges the concepts' K/V copies in closed form, as every copy that changes keys and values; the tokens are
each concept's own, nothing to merge (docs/method.md, "Simulated attackers").
"""

from __future__ import annotations

import torch

from mima.attacks.config import CONCEPT_PROMPT
from mima.data.concepts import ConceptSpec
from mima.errors import ConfigError
from mima.functional import Params
from mima.immunize.attackers.textual_inversion import TextualInversionAttacker
from mima.immunize.attackers.tokens import FreshTokens
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names


class CustomDiffusionAttacker(TextualInversionAttacker):
    """The cross-attention keys and values in S^l plus a fresh token per concept, as Custom Diffusion trains.

    phi = the UNet's own K/V weights (from theta^{k-1}) and concept n's token "<new-<concept name>>", which under
    the default `concept` prompt stands beside the concept's words.
    """

    default_prompt = CONCEPT_PROMPT

    def prepare(self, components: Components, specs: list[ConceptSpec], lower_names: list[str]) -> None:
        lower = set(lower_names)
        self.key_values = [name for name in key_value_parameter_names(components.unet) if name in lower]
        if not self.key_values:
            raise ConfigError("simulated attacker 'custom-diffusion': S^l (lower_params) holds no cross-attention "
                              "key or value weight")
        self.tokens = FreshTokens(components, specs, [self.token(n) for n in range(len(specs))])

    def token(self, concept: int) -> str:
        return f"<new-{self.specs[concept].name}>"

    def start(self, base: Params, concepts: list[int], generator: torch.Generator) -> Params:
        return {**{name: base[name] for name in self.key_values}, **super().start(base, concepts, generator)}

    def weights(self, params: Params) -> Params:
        return {name: params[name] for name in self.key_values}

    def kept(self, phi: Params) -> Params:
        return {name: p for name, p in phi.items() if name not in self.key_values}  # the K/V copies: in the Merge

    def pull_back(self, base: Params, phi: Params, cotangent: Params, wrt: list[str]) -> tuple[Params, Params]:
        """The identity on the K/V weights (they ARE phi's); nothing reaches the tokens from the weights."""
        tokens, _ = super().pull_back(base, phi, cotangent, wrt)
        return {**{name: cotangent[name] for name in self.key_values}, **tokens}, {}
