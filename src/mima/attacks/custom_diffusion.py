"""Custom Diffusion (Kumari et al., CVPR 2023): tune cross-attention keys and values plus a modifier token.

Loading an export: `load_custom_diffusion(pipe, DIR)`. diffusers 0.42's `pipe.unet.load_attn_procs(DIR, ...)`
parses the file but installs the processors only when given `_pipeline`, and then rejects the partial set
that the file holds (cross-attention K/V only, as diffusers' own saver writes it); this helper installs the
full set.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

from mima.attacks.base import Attack, attacks
from mima.attacks.config import AttackConfig
from mima.attacks.tokens import NewToken, load_token_embeddings
from mima.data.concepts import ConceptSpec
from mima.models.components import Components
from mima.models.cross_attention import cross_attention_modules
from mima.utils.io import load_tensors, save_tensors

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"


def install_processors(
    unet: torch.nn.Module, kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, CustomDiffusionAttnProcessor]:
    """Custom Diffusion processors on every attention layer: trainable K/V copies (initialised from `kv`, keyed by
    cross-attention module path) where given, plain ones elsewhere. Returns the trainable ones by module path."""
    plain = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
    processors, trainable = {name: plain for name in unet.attn_processors}, {}
    for path, (key, value) in kv.items():
        processor = CustomDiffusionAttnProcessor(
            train_kv=True, train_q_out=False, hidden_size=key.shape[0], cross_attention_dim=key.shape[1]
        ).to(key)
        processor.to_k_custom_diffusion.weight.data.copy_(key)
        processor.to_v_custom_diffusion.weight.data.copy_(value)
        processors[f"{path}.processor"] = trainable[path] = processor
    unet.set_attn_processor(processors)
    return trainable


def load_custom_diffusion(pipe: DiffusionPipeline, directory: str | Path) -> None:
    """Install a custom-diffusion export (K/V processors and modifier token) into a plain diffusers pipeline."""
    weights = load_tensors(Path(directory) / WEIGHTS_FILE)
    paths = {key.split(".processor.")[0] for key in weights}
    kv = {p: (weights[f"{p}.processor.to_k_custom_diffusion.weight"],
              weights[f"{p}.processor.to_v_custom_diffusion.weight"]) for p in paths}
    install_processors(pipe.unet, kv)
    load_token_embeddings(pipe, directory)


@attacks.register("custom-diffusion")
class CustomDiffusion(Attack):
    default_lr = 1e-3  # the reference 1e-5 x batch scaling is for SD; raised for the toy model
    reference_lr = 1e-5  # diffusers examples/custom_diffusion/train_custom_diffusion.py (unscaled)
    default_steps = 200
    uses_prior = True
    learns_token = True  # its default prompt mode, `concept`, keeps the concept's words beside the token

    @classmethod
    def token_for(cls, config: AttackConfig, concept: ConceptSpec) -> str:
        return config.token or f"<new-{concept.name}>"

    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        self.components, self.concept = components, concept
        for module in components.modules().values():
            module.requires_grad_(False)
        kv = {path: (a.to_k.weight, a.to_v.weight) for path, a in cross_attention_modules(components.unet).items()}
        self.processors = install_processors(components.unet, kv)
        init_word = (concept.class_prompt or "object").split()[-1]
        self.new_token = NewToken(components, self.token_for(self.config, concept), init_word)

    def trains_text(self) -> bool:
        return True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        kv = [p for processor in self.processors.values() for p in processor.parameters()]
        return [*kv, *self.new_token.vectors]

    def export(self, out_dir: Path) -> Path:
        """The K/V processors, in the file layout of diffusers' `save_attn_procs`, plus the modifier token:
        `load_custom_diffusion(pipe, out_dir)`."""
        weights = {f"{path}.processor.{name}": tensor
                   for path, processor in self.processors.items() for name, tensor in processor.state_dict().items()}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_tensors(Path(out_dir) / WEIGHTS_FILE, weights)
        return self.new_token.export(out_dir)
