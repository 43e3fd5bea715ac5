"""Model families: what the immunizers, the Merge, the attacks and sampling need from a kind of pipeline.

A family says how a pipeline folder loads, which tokenizer / text-encoder pairs read a prompt, how prompts become
the UNet's conditioning and the per-token text features the cross-attention keys and values read (the Merge's rows),
and which diffusers pipeline samples. The family is read from `model_index.json`; SD 1.x and 2.x share one (their
differences, text width and prediction type, are configs), SDXL is the other.

SDXL's UNet also takes added conditions (the second encoder's pooled embedding and the size / crop ids). So that
batches, losses and the parameter-dict inner step stay one tensor of conditioning for every family, SDXL's
conditioning carries them in one extra row after the tokens, and a pre-hook on its UNet moves them to
`added_cond_kwargs` (a caller that passes `added_cond_kwargs` itself, as diffusers' pipeline does, is left alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from mima.errors import ModelError

if TYPE_CHECKING:
    from mima.models.components import Components

TIME_IDS = 6  # SDXL's (original height, width, crop top, left, target height, width)


class ModelFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden states condition the UNet."""

    name: ClassVar[str] = "Stable Diffusion 1.x / 2.x"
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionPipeline
    text_parts: ClassVar[tuple[tuple[str, str], ...]] = (("tokenizer", "text_encoder"),)

    def token_features(self, components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) of the first tokenizer and the text features every cross-attention reads (B, T, d)."""
        ids = _token_ids(components.tokenizer, prompts)
        return ids, components.text_encoder(ids.to(components.text_encoder.device))[0]

    def conditioning(self, components: Components, prompts: list[str]) -> torch.Tensor:
        """What the UNet is conditioned on for `prompts` (B, T, d): the token features."""
        return self.token_features(components, prompts)[1]

    def unconditional(self, components: Components) -> torch.Tensor:
        """The conditioning (1, T, d) of the unconditional prediction that classifier-free guidance extrapolates
        from, as the family's sampling pipeline gives it: the empty prompt's."""
        return self.conditioning(components, [""])

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        """Make the UNet accept `conditioning` as its only text input (nothing to do here)."""

    def sampling_pipeline(self, components: Components) -> DiffusionPipeline:
        """A diffusers pipeline sharing the components' modules, with a DDIM sampler and no safety checker."""
        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=DDIMScheduler.from_config(components.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def load_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments: the safety checker is not loaded (saving copies its folder unchanged)."""
        return {"safety_checker": None, "requires_safety_checker": False}


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP text encoders whose penultimate hidden states are concatenated, plus added conditions."""

    name = "Stable Diffusion XL"
    pipeline_class = StableDiffusionXLPipeline
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))

    def _encode(self, components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, pooled, ids = [], None, None
        for tokenizer, encoder in components.text_pairs():
            tokens = _token_ids(tokenizer, prompts)
            ids = tokens if ids is None else ids
            out = encoder(tokens.to(encoder.device), output_hidden_states=True)
            features.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled embedding, as diffusers' pipeline takes it
        return ids, torch.cat(features, dim=-1), pooled

    def token_features(self, components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, features, _ = self._encode(components, prompts)
        return ids, features

    def conditioning(self, components: Components, prompts: list[str]) -> torch.Tensor:
        """Token features (B, T, d) and one more row: [pooled embedding, size / crop ids, zeros]: (B, T + 1, d)."""
        _, features, pooled = self._encode(components, prompts)
        size = components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=features.dtype, device=features.device)
        row = torch.zeros(features.shape[0], 1, features.shape[2], dtype=features.dtype, device=features.device)
        row[:, 0, : pooled.shape[1]] = pooled
        row[:, 0, pooled.shape[1] : pooled.shape[1] + TIME_IDS] = time_ids
        return torch.cat([features, row], dim=1)

    def unconditional(self, components: Components) -> torch.Tensor:
        """Zeros for the token features and the pooled embedding, the size ids kept: the sampling pipeline's
        `force_zeros_for_empty_prompt` default."""
        hidden = self.conditioning(components, [""])
        pooled_width = components.text_encoder_2.config.projection_dim
        hidden[:, :-1] = 0
        hidden[:, -1, :pooled_width] = 0
        return hidden

    def prepare_unet(self, unet: torch.nn.Module) -> None:
        config = unet.config
        pooled_width = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
        if pooled_width + TIME_IDS > config.cross_attention_dim:
            raise ModelError("SDXL's pooled embedding and size ids do not fit in one row of its text features")

        def unpack(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if kwargs.get("added_cond_kwargs") is not None:
                return args, kwargs
            hidden = kwargs["encoder_hidden_states"]
            extra = hidden[:, -1]  # (B, d)
            time_ids = extra[:, pooled_width : pooled_width + TIME_IDS]
            added = {"text_embeds": extra[:, :pooled_width], "time_ids": time_ids}
            return args, {**kwargs, "encoder_hidden_states": hidden[:, :-1], "added_cond_kwargs": added}

        unet.register_forward_pre_hook(unpack, with_kwargs=True)

    def sampling_pipeline(self, components: Components) -> DiffusionPipeline:
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=DDIMScheduler.from_config(components.scheduler.config), add_watermarker=False,
        )

    def load_kwargs(self) -> dict[str, Any]:
        return {}


# Pipeline class (model_index.json's `_class_name`) -> its family.
FAMILIES: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": ModelFamily(),
    "StableDiffusionXLPipeline": StableDiffusionXLFamily(),
}


def model_family(folder: str | Path) -> ModelFamily:
    """The family of the pipeline in `folder`; an unsupported class is a ModelError naming the supported ones."""
    index = Path(folder) / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8
        raise ModelError(f"cannot read '{index}': {e}") from e
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or name not in FAMILIES:
        supported = ", ".join(f"{cls} ({family.name})" for cls, family in FAMILIES.items())
        what = "names no pipeline class in model_index.json"
        if isinstance(name, str):
            what = f"holds a {name}, which mima does not support"
        raise ModelError(f"'{folder}' {what}; supported: {supported}")
    return FAMILIES[name]


def _token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
