"""LoRA (Hu et al., ICLR 2022) on the UNet's attention projections, through peft."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

from mima.attacks.base import Attack, attacks
from mima.data.concepts import ConceptSpec
from mima.models.components import Components
from mima.models.cross_attention import ATTENTION_PROJECTIONS


@attacks.register("lora")
class LoRA(Attack):
    default_lr = 1e-3  # diffusers' LoRA example uses 1e-4 on SD; the toy model's smaller layers take more
    reference_lr = 1e-4  # diffusers examples/text_to_image/train_text_to_image_lora.py
    default_steps = 200

    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        self.components, self.concept = components, concept
        for module in components.modules().values():
            module.requires_grad_(False)
        adapter = LoraConfig(
            r=self.config.rank, lora_alpha=self.config.rank, init_lora_weights="gaussian",
            target_modules=list(ATTENTION_PROJECTIONS),
        )
        components.unet.add_adapter(adapter)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.components.unet.parameters() if p.requires_grad]

    def export(self, out_dir: Path) -> Path:
        """`pytorch_lora_weights.safetensors`: `pipe.load_lora_weights(out_dir)`."""
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.components.unet))
        pipeline_class = self.components.family.pipeline_class
        pipeline_class.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
        return out_dir
