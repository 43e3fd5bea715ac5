"""`lora`: fresh LoRA factors on the attention projections, as the LoRA attack trains (src/mima/attacks/lora.py).

The factors are plain tensors named apart from the UNet ("lora:<weight name>:down" / ":up"), drawn afresh at each
outer step: no module surgery, so one functional UNet call serves every copy and the meta-gradient flows through
the effective weights W + (alpha / rank) up @ down.
"""

from __future__ import annotations

import torch

from mima.data.concepts import ConceptSpec
from mima.errors import ConfigError
from mima.functional import Params
from mima.immunize.attackers.base import SimulatedAttacker
from mima.models.components import Components
from mima.models.cross_attention import attention_projection_names


class LoraAttacker(SimulatedAttacker):
    """Fresh rank-r LoRA factors on the attention projections in S^l, the only thing its inner steps train.

    down ~ N(0, 1/r^2) (peft's "gaussian" initialisation), up = 0 and alpha = r as the LoRA attack sets them, so
    each attack starts at the UNet's weights."""

    default_lr = 3.0  # measured on the toy (docs/method.md, "Simulated attackers"): the inner loss falls

    def prepare(self, components: Components, specs: list[ConceptSpec], lower_names: list[str]) -> None:
        lower = set(lower_names)
        self.adapted = [name for name in attention_projection_names(components.unet) if name in lower]
        if not self.adapted:
            raise ConfigError("simulated attacker 'lora': S^l (lower_params) holds no attention projection weight")

    def start(self, base: Params, concepts: list[int], generator: torch.Generator) -> Params:
        rank, phi = self.spec.rank, {}
        for name in self.adapted:
            weight = base[name]
            down = torch.randn(rank, weight.shape[1], generator=generator, device=generator.device) / rank
            phi[f"lora:{name}:down"] = down.to(weight.device, weight.dtype).requires_grad_()
            phi[f"lora:{name}:up"] = weight.new_zeros(weight.shape[0], rank).requires_grad_()
        return phi

    def weights(self, params: Params) -> Params:
        # the scale alpha / rank is 1 (alpha = rank)
        return {name: params[name] + params[f"lora:{name}:up"] @ params[f"lora:{name}:down"] for name in self.adapted}
