"""The five parts of a Stable-Diffusion-style model, loaded from and saved as a diffusers pipeline folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from mima.data.captions import load_caption_bank
from mima.errors import ModelError
from mima.utils.io import atomic_directory

TOY_MODEL_NAME = "toy"


def toy_model_dir() -> Path:
    """The folder of the embedded default model, the pretrained toy pipeline (diffusers format)."""
    return Path(str(resources.files("mima") / "assets" / "toy-model"))


def speaks_toy_vocabulary(model: str | Path) -> bool:
    """Whether `model`'s tokenizer has the toy world's words and not general English: every word of the toy caption
    bank is one of its tokens and some word of the generic bank is not. True for "toy", its exports and the models
    made from it (immunized, fine-tuned, pretrained again); a hub id is not read (False)."""
    if str(model) == TOY_MODEL_NAME:
        return True
    folder = Path(model) / "tokenizer"
    if not folder.is_dir():
        return False
    vocab = CLIPTokenizer.from_pretrained(folder).get_vocab()

    def knows(bank: str) -> bool:
        return all(f"{word}</w>" in vocab for caption in load_caption_bank(bank) for word in caption.split())

    return knows("toy") and not knows("generic")


@dataclass
class Components:
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of one model."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin

    @classmethod
    def from_pretrained(cls, model: str | Path) -> Components:
        """Load `model`: "toy" (the embedded default), a local diffusers pipeline folder, or a hub id.

        Args:
            model (`str` or `Path`): what to load. A hub id needs network access unless it is cached.
        """
        source = _resolve_model(model)
        # Per-component loading bars would bury mima's own progress bars; downloads keep theirs.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a diffusers pipeline from '{model}': {str(e).splitlines()[0]}") from e
        if len(pipe.tokenizer) == 0:
            raise ModelError(f"the tokenizer of '{model}' is empty (a missing hub id read offline?)")
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        """Move the text encoder, VAE and UNet to `device` (in place; returns self).

        Args:
            device (`torch.device` or `str`): where they run, as [`~mima.utils.device.resolve_device`] gives it.
            dtype (`torch.dtype`, *optional*): also cast their weights, for inference only; training keeps
                float32 weights and runs in lower precision under autocast instead.
        """
        for module in self.modules().values():
            # diffusers warns about any dtype argument, None included: pass one only when casting
            module.to(device) if dtype is None else module.to(device, dtype)
        return self

    def to_pipeline(self) -> StableDiffusionPipeline:
        """A diffusers pipeline sharing these modules, with a DDIM sampler and no safety checker."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=DDIMScheduler.from_config(self.scheduler.config), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a complete diffusers pipeline folder (safetensors), atomically."""
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            self.to_pipeline().save_pretrained(tmp, safe_serialization=True)
        return out_dir

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, tokens, width) for `prompts`, padded to the tokenizer's max length."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of images (B, 3, H, W) in [-1, 1]."""
        posterior = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "vae": self.vae, "unet": self.unet}


def _resolve_model(model: str | Path) -> str:
    if str(model) == TOY_MODEL_NAME:
        return str(toy_model_dir())
    path = Path(model)
    looks_local = path.exists() or str(model).startswith((".", "/", "~")) or os.sep * 2 in str(model)
    if looks_local and not (path / "model_index.json").is_file():
        raise ModelError(f"'{model}' is not a diffusers pipeline folder (no model_index.json in it)")
    return str(path)
