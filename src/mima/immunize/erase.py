"""Closed-form concept erasure of cross-attention keys and values (UCE-style; Gandikota et al., WACV 2024)."""

from __future__ import annotations

import torch

from mima.data.captions import frequent_words, load_caption_bank, words
from mima.data.concepts import ConceptSpec, naming_words
from mima.immunize.base import Immunizer, immunizers
from mima.immunize.config import ImmunizeConfig
from mima.models.components import Components
from mima.models.cross_attention import cross_attention_modules
from mima.models.encoding import EncodedConcept
from mima.utils.device import solve_device


def erasure_map(
    sources: torch.Tensor, destinations: torch.Tensor, preserve: torch.Tensor, preserve_weight: float = 1.0,
    ridge: float = 1e-2,
) -> torch.Tensor:
    """The (d, d) float64 matrix B with W = W_old B the UCE edit of every projection W_old reading these rows:

    argmin_W sum_i ||W c_i - W_old c*_i||^2 + lambda sum_j ||W c_j - W_old c_j||^2 + ridge ||W - W_old||^2, whose
    closed form W = W_old (C*^T C + lambda P^T P + ridge I) (C^T C + lambda P^T P + ridge I)^-1 depends on W_old only
    through the left factor: computed once, it edits every cross-attention key and value with one product.
    Args: sources C (m, d); destinations C* (m, d), row-aligned; preserve P (p, d).
    """
    c, c_star, p = (t.to(torch.float64) for t in (sources, destinations, preserve))
    regulariser = preserve_weight * p.T @ p + ridge * torch.eye(c.shape[1], dtype=torch.float64)  # (d, d)
    return torch.linalg.solve(c.T @ c + regulariser, c_star.T @ c + regulariser, left=False)


def edit_projection(w_old: torch.Tensor, erasure: torch.Tensor) -> torch.Tensor:
    """W_old B in float64 (where `solve_device` says: on the CPU for MPS, which has none), back in W_old's device
    and dtype: (d_out, d)."""
    device = solve_device(w_old.device)
    return (w_old.to(device, torch.float64) @ erasure.to(device)).to(w_old.device, w_old.dtype)


@torch.no_grad()
def full_prompt_embeddings(components: Components, prompts: list[str]) -> torch.Tensor:
    """All token positions after the start token (padding included, as the UNet sees them): (B * (T-1), d)."""
    features = components.token_features(prompts)[1][:, 1:]  # (B, T-1, d)
    return features.reshape(-1, features.shape[-1]).cpu()


@torch.no_grad()
def erase_concepts(
    components: Components, target_prompts: list[str], neutral_prompts: list[str], preserve_prompts: list[str],
    preserve_weight: float = 1.0,
) -> None:
    """Map each target prompt's tokens to its neutral prompt's in every cross-attention K/V, in place."""
    erasure = erasure_map(
        full_prompt_embeddings(components, target_prompts), full_prompt_embeddings(components, neutral_prompts),
        full_prompt_embeddings(components, preserve_prompts), preserve_weight,
    )
    for attention in cross_attention_modules(components.unet).values():
        for projection in (attention.to_k, attention.to_v):
            projection.weight.copy_(edit_projection(projection.weight, erasure))


def preserved_captions(specs: list[ConceptSpec], bank: list[str]) -> list[str]:
    """The captions of `bank` that name no target, in its name or in any word naming it (`naming_words`)."""
    frequent = frequent_words(bank)
    naming = [(spec.name, naming_words(spec, frequent)) for spec in specs]
    return [
        caption for caption in bank
        if not any(name in caption or names & set(words(caption)) for name, names in naming)
    ] or [""]


def erase_targets(components: Components, specs: list[ConceptSpec], config: ImmunizeConfig) -> None:
    """Erase every spec's prompts toward its erasure prompt (by default its class prompt), preserving caption-bank
    prompts that name no target."""
    targets = [prompt for spec in specs for prompt in spec.prompts]
    neutrals = [spec.erasure_prompt for spec in specs for _ in spec.prompts]
    preserve = preserved_captions(specs, load_caption_bank(config.caption_bank))
    erase_concepts(components, targets, neutrals, preserve, config.erase_preserve_weight)


# What decides an erased (or untouched) model: the targets' images and prompts, and the erasure's own weight.
CLOSED_FORM_SETTINGS = ("method", "setting", "seed", "n_images", "caption_bank", "erase_preserve_weight")


@immunizers.register("erase")
class Erase(Immunizer):
    """Erase every target concept: its prompts are mapped to its erasure prompt; caption-bank prompts are kept.

    In the relearn setting the run has already erased the targets before any method runs, so this is `none` there.
    """

    iterative = False
    depends_on = CLOSED_FORM_SETTINGS

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        if self.config.setting != "relearn":  # relearn erased them already: erasing again moves K/V further
            erase_targets(components, specs, self.config)


@immunizers.register("none")
class NoImmunization(Immunizer):
    """The model as it is (in the re-learning setting: the erased model)."""

    iterative = False
    depends_on = CLOSED_FORM_SETTINGS

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        return None
