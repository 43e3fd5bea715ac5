"""Textual Inversion (Gal et al., ICLR 2023): learn one new token embedding; everything else frozen."""

from __future__ import annotations

from pathlib import Path

import torch

from mima.attacks.base import Attack, attacks
from mima.attacks.tokens import NewToken, with_token
from mima.data.concepts import ConceptSpec
from mima.models.components import Components


@attacks.register("textual-inversion")
class TextualInversion(Attack):
    default_lr = 5e-3  # the reference 5e-4 x batch scaling, raised for the toy world's short budget
    reference_lr = 5e-4  # diffusers examples/textual_inversion/textual_inversion.py (unscaled)
    default_steps = 300

    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        self.components, self.concept = components, concept
        for module in components.modules().values():
            module.requires_grad_(False)
        init_word = (concept.class_prompt or "object").split()[-1]
        self.new_token = NewToken(components, self.config.token or f"<{concept.name}>", init_word)

    def prompt(self, prompt: str) -> str:
        return with_token(prompt, self.concept, self.new_token.token)

    def trains_text(self) -> bool:
        return True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.new_token.vectors)

    def export(self, out_dir: Path) -> Path:
        """`learned_embeds.safetensors`: `pipe.load_textual_inversion(out_dir)`, for SDXL once per text encoder
        (`mima.attacks.tokens.load_token_embeddings`)."""
        return self.new_token.export(out_dir)
