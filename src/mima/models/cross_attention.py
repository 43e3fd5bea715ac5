"""Which UNet parameters are cross-attention keys and values, and selection of parameters by name pattern."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from mima.errors import ConfigError, ModelError


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """Module path -> diffusers `Attention` for every cross-attention layer (the ones that read text)."""
    found = {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    if not found:
        raise ModelError(
            f"the model's {type(unet).__name__} has no cross-attention layers; mima needs a text-conditioned UNet"
        )
    return found


def key_value_parameter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the cross-attention key and value weights, the parameters the Merge solves in closed form."""
    return [f"{path}.{proj}.weight" for path in cross_attention_modules(unet) for proj in ("to_k", "to_v")]


def select_parameters(names: Iterable[str], patterns: Iterable[str], *, what: str) -> list[str]:
    """The names matching any glob pattern (fnmatch, e.g. `*attn2.*`); an empty selection is a ConfigError."""
    patterns = list(patterns)
    selected = [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
    if not selected:
        raise ConfigError(f"the {what} patterns {patterns} match no UNet parameter")
    return selected


def use_differentiable_attention(unet: torch.nn.Module) -> None:
    """Install the plain-math attention processor everywhere: fused CPU kernels have no double backward."""
    unet.set_attn_processor(AttnProcessor())
