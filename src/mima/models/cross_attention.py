"""Which UNet parameters are cross-attention keys and values, and selection of parameters by name pattern."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from fnmatch import fnmatchcase

import torch
from diffusers.models.attention_processor import Attention
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

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


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
"""The projections of every attention layer that LoRA adapts (the LoRA attack's peft target modules)."""


def attention_projection_names(unet: torch.nn.Module) -> list[str]:
    """Names of the projection weights of every attention layer, self- and cross-attention (what LoRA adapts)."""
    return [f"{path}.{proj}.weight" for path, module in unet.named_modules() if isinstance(module, Attention)
            for proj in ATTENTION_PROJECTIONS]


def select_parameters(names: Iterable[str], patterns: Iterable[str], *, what: str) -> list[str]:
    """The names matching any glob pattern (fnmatch, e.g. `*attn2.*`) and no pattern prefixed by '!' (e.g.
    `!*attn2.to_k.*` leaves the cross-attention keys out); an empty selection is a ConfigError."""
    patterns = list(patterns)
    excluded = [p[1:] for p in patterns if p.startswith("!")]
    included = [p for p in patterns if not p.startswith("!")]
    selected = [n for n in names if any(fnmatchcase(n, p) for p in included)
                and not any(fnmatchcase(n, p) for p in excluded)]
    if not selected:
        raise ConfigError(f"the {what} patterns {patterns} match no UNet parameter")
    return selected


class _MathKernel(AbstractContextManager[None]):
    """The plain-math attention kernel while inside; re-enterable, as a checkpoint may recompute more than once."""

    depth = 0  # how many are entered: a checkpoint's forward records it for its recomputation

    def __init__(self) -> None:
        self._kernels: list[AbstractContextManager[None]] = []

    def __enter__(self) -> None:
        self._kernels.append(sdpa_kernel(SDPBackend.MATH))
        self._kernels[-1].__enter__()
        _MathKernel.depth += 1

    def __exit__(self, *exc_info: object) -> None:
        _MathKernel.depth -= 1
        self._kernels.pop().__exit__(*exc_info)


def differentiable_attention() -> AbstractContextManager[None]:
    """Within it, attention runs the plain-math kernel, the only one with a double backward (fused CPU and GPU
    kernels have none). Only forwards whose gradient is differentiated again need it; the rest keep the fast ones.
    """
    return _MathKernel()


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """Keep only each UNet block's inputs and recompute its activations in the backward, also when that backward
    is differentiated again and when the UNet runs under `torch.func.functional_call`.

    diffusers' own checkpointing would recompute with the module's own weights (functional_call has restored
    them by then) and with whatever attention kernel is current; here the weights in use are inputs of the
    checkpoint and the recomputation runs under the kernel of the forward.
    """

    def checkpointed(module: torch.nn.Module, *args: object) -> object:
        params = dict(module.named_parameters())  # the tensors in use now, substituted ones included
        math_kernel = _MathKernel.depth > 0

        def run(*inputs: object) -> object:
            return functional_call(module, dict(zip(params, inputs[: len(params)], strict=True)), inputs[len(params):])

        def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
            return nullcontext(), differentiable_attention() if math_kernel else nullcontext()

        return checkpoint(run, *params.values(), *args, use_reentrant=False, context_fn=contexts)

    unet.enable_gradient_checkpointing(checkpointed)
