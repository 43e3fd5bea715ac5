"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the whole UNet (optionally the text encoder) on the concept's
images, with prior preservation on class images."""

from __future__ import annotations

from pathlib import Path

import torch

from mima.attacks.base import Attack, attacks
from mima.data.concepts import ConceptSpec
from mima.models.components import Components


@attacks.register("dreambooth")
class DreamBooth(Attack):
    default_lr = 2e-4  # the reference 5e-6 is for SD's 860 M parameters; the toy UNet is 1 M
    reference_lr = 5e-6  # diffusers examples/dreambooth/train_dreambooth.py
    default_steps = 200
    uses_prior = True

    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        self.components, self.concept = components, concept
        components.vae.requires_grad_(False)
        components.text_encoder.requires_grad_(self.config.train_text_encoder)
        components.unet.requires_grad_(True)

    def trains_text(self) -> bool:
        return self.config.train_text_encoder

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.components.unet] + ([self.components.text_encoder] if self.trains_text() else [])
        return [p for m in modules for p in m.parameters()]

    def export(self, out_dir: Path) -> Path:
        """A full pipeline folder: `DiffusionPipeline.from_pretrained(out_dir)` (the model's own pipeline class)."""
        return self.components.save_pretrained(out_dir)
