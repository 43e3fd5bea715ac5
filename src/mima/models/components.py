"""The parts of a Stable-Diffusion-style model (one or two text encoders), loaded from and saved as a folder."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from mima.data.captions import load_caption_bank
from mima.errors import ModelError
from mima.models.family import FAMILIES, ModelFamily, model_family
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


def load_tokenizers(model: str | Path) -> list[CLIPTokenizer]:
    """Every tokenizer that reads `model`'s prompts (SDXL has two), without loading any weights: for checks of a
    token before a run starts."""
    source = _resolve_model(model)
    folders = [Path(source) / tokenizer for tokenizer, _ in model_family(source).text_parts]
    try:
        return [CLIPTokenizer.from_pretrained(folder) for folder in folders]
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of '{model}': {str(e).splitlines()[0]}") from e


@dataclass
class Components:
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of one model.

    `scheduler` is a DDIM scheduler with the model's noise schedule (training noise and sampling); `source` is the
    pipeline folder the model came from, whose other components (its own scheduler, a safety checker, a feature
    extractor) `save_pretrained` carries over unchanged.
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin
    source: Path | None = None
    family: ModelFamily = FAMILIES["StableDiffusionPipeline"]
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tokenizer and text encoder
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path) -> Components:
        """Load `model`: "toy" (the embedded default), a local diffusers pipeline folder, or a hub id.

        Args:
            model (`str` or `Path`): what to load. A hub id needs network access unless it is cached.
        """
        source = _resolve_model(model)
        family = model_family(source)  # an unsupported family: one clear error before loading anything
        # Per-component loading bars would bury mima's own progress bars; downloads keep theirs.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        try:
            pipe = family.pipeline_class.from_pretrained(source, **family.load_kwargs())
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load a diffusers pipeline from '{model}': {str(e).splitlines()[0]}") from e
        if len(pipe.tokenizer) == 0:
            raise ModelError(f"the tokenizer of '{model}' is empty (a missing hub id read offline?)")
        family.prepare_unet(pipe.unet)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        second = {name: getattr(pipe, name) for name in ("tokenizer_2", "text_encoder_2") if hasattr(pipe, name)}
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler, Path(source), family, **second)

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

    def to_pipeline(self) -> DiffusionPipeline:
        """A diffusers pipeline of the model's family sharing these modules, with a DDIM sampler."""
        return self.family.sampling_pipeline(self)

    def text_pairs(self) -> list[tuple[CLIPTokenizer, CLIPTextModel]]:
        """Every (tokenizer, text encoder) that reads a prompt: one, or SDXL's two."""
        return [(getattr(self, tokenizer), getattr(self, encoder)) for tokenizer, encoder in self.family.text_parts]

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write a complete diffusers pipeline folder (safetensors), atomically.

        A model loaded from a folder keeps every component it came with: the tokenizer, text encoder, VAE and UNet
        are written from memory, everything else (scheduler, safety checker, feature extractor) is copied as is.
        """
        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as tmp:
            if self.source is None:
                self.to_pipeline().save_pretrained(tmp, safe_serialization=True)
            else:
                self._save_over_source(tmp)
        return out_dir

    def _save_over_source(self, out_dir: Path) -> None:
        written = {"tokenizer": self.tokenizer, **self.modules()}
        _copy_other_components(self.source, out_dir, skip=set(written))
        for name, part in written.items():
            part.save_pretrained(out_dir / name, **({} if name == "tokenizer" else {"safe_serialization": True}))

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The UNet's conditioning for `prompts` (B, tokens, width), padded to the tokenizer's max length; SDXL's
        carries its added conditions in one more row (see `mima.models.family`)."""
        return self.family.conditioning(self, prompts)

    def token_features(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and the per-token text features the cross-attention keys and values read (B, T, d)."""
        return self.family.token_features(self, prompts)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of images (B, 3, H, W) in [-1, 1]."""
        posterior = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        second = {"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {"text_encoder": self.text_encoder, **second, "vae": self.vae, "unet": self.unet}


def _copy_other_components(source: Path, out_dir: Path, skip: set[str]) -> None:
    """Copy `model_index.json` and every component folder it lists, except `skip`, from `source` to `out_dir`."""
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    shutil.copy2(source / "model_index.json", out_dir / "model_index.json")
    for name, value in index.items():
        listed = isinstance(value, list) and value[0] is not None
        if listed and name not in skip and (source / name).is_dir():
            shutil.copytree(source / name, out_dir / name)


def _resolve_model(model: str | Path) -> str:
    """The local pipeline folder of `model` (a hub id is downloaded, or found in the cache when offline)."""
    if str(model) == TOY_MODEL_NAME:
        return str(toy_model_dir())
    path = Path(model)
    looks_local = path.exists() or str(model).startswith((".", "/", "~")) or os.sep * 2 in str(model)
    if looks_local and not (path / "model_index.json").is_file():
        raise ModelError(f"'{model}' is not a diffusers pipeline folder (no model_index.json in it)")
    if looks_local:
        return str(path)
    try:
        return str(DiffusionPipeline.download(str(model)))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot find the model '{model}' locally or on the hub: {str(e).splitlines()[0]}") from e
