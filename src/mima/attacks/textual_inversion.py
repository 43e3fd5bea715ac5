"""Textual Inversion (Gal et al., ICLR 2023): learn one new token embedding; everything else frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from mima.attacks.base import Attack, attacks
from mima.attacks.config import FRESH_TOKEN_PROMPT, AttackConfig
from mima.attacks.tokens import NewToken
from mima.data.concepts import ConceptSpec
from mima.models.components import Components


@attacks.register("textual-inversion")
class TextualInversion(Attack):
    default_lr = 5e-3  # the reference 5e-4 x batch scaling, raised for the toy world's short budget
    reference_lr = 5e-4  # diffusers examples/textual_inversion/textual_inversion.py (unscaled)
    default_steps = 300
    default_prompt = FRESH_TOKEN_PROMPT
    learns_token = True

    @classmethod
    def token_for(cls, config: AttackConfig, concept: ConceptSpec) -> str:
        return config.token or f"<{concept.name}>"

    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        self.components, self.concept = components, concept
        for module in components.modules().values():
            module.requires_grad_(False)
        init_word = (concept.class_prompt or "object").split()[-1]
        self.new_token = NewToken(components, self.token_for(self.config, concept), init_word)

    def trains_text(self) -> bool:
        return True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.new_token.vectors)

    def export(self, out_dir: Path) -> Path:
        """`learned_embeds.safetensors`: `pipe.load_textual_inversion(out_dir)`, for SDXL once per text encoder
        (`mima.attacks.tokens.load_token_embeddings`)."""
        return self.new_token.export(out_dir)
