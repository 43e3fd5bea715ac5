"""Closed-form concept erasure of cross-attention keys and values (UCE-style; Gandikota et al., WACV 2024)."""

from __future__ import annotations

import torch

from mima.data.captions import load_caption_bank
from mima.data.concepts import ConceptSpec
from mima.immunize.base import Immunizer, immunizers
from mima.immunize.config import ImmunizeConfig
from mima.models.components import Components
from mima.models.cross_attention import cross_attention_modules
from mima.models.encoding import EncodedConcept


def edit_projection(
    w_old: torch.Tensor, sources: torch.Tensor, destinations: torch.Tensor, preserve: torch.Tensor,
    preserve_weight: float = 1.0, ridge: float = 1e-2,
) -> torch.Tensor:
    """argmin_W sum_i ||W c_i - W_old c*_i||^2 + lambda sum_j ||W c_j - W_old c_j||^2 + ridge ||W - W_old||^2.

    UCE's closed form: W = (W_old (C*^T C + lambda P^T P + ridge I)) (C^T C + lambda P^T P + ridge I)^-1.
    Args: w_old (d_out, d); sources C (m, d); destinations C* (m, d), row-aligned; preserve P (p, d).
    """
    w64, c, c_star, p = (t.to(torch.float64) for t in (w_old, sources, destinations, preserve))
    eye = torch.eye(w64.shape[1], dtype=torch.float64)
    lhs = c.T @ c + preserve_weight * p.T @ p + ridge * eye  # (d, d)
    rhs = w64 @ (c_star.T @ c + preserve_weight * p.T @ p + ridge * eye)  # (d_out, d)
    return torch.linalg.solve(lhs, rhs, left=False).to(w_old.dtype)


@torch.no_grad()
def full_prompt_embeddings(components: Components, prompts: list[str]) -> torch.Tensor:
    """All token positions after the start token (padding included, as the UNet sees them): (B * (T-1), d)."""
    return components.encode_prompts(prompts)[:, 1:].reshape(-1, components.text_encoder.config.hidden_size).cpu()


@torch.no_grad()
def erase_concepts(
    components: Components, target_prompts: list[str], neutral_prompts: list[str], preserve_prompts: list[str],
    preserve_weight: float = 1.0,
) -> None:
    """Map each target prompt's tokens to its neutral prompt's in every cross-attention K/V, in place."""
    sources = full_prompt_embeddings(components, target_prompts)
    destinations = full_prompt_embeddings(components, neutral_prompts)
    preserve = full_prompt_embeddings(components, preserve_prompts)
    for attention in cross_attention_modules(components.unet).values():
        for projection in (attention.to_k, attention.to_v):
            # Solved on the CPU, where the embeddings are: float64 (which MPS lacks), d x d, once per projection.
            projection.weight.copy_(
                edit_projection(projection.weight.cpu(), sources, destinations, preserve, preserve_weight)
            )


def erase_targets(components: Components, specs: list[ConceptSpec], config: ImmunizeConfig) -> None:
    """Erase every spec's prompts toward its class prompt, preserving caption-bank prompts that name no target."""
    targets = [prompt for spec in specs for prompt in spec.prompts]
    neutrals = [spec.class_prompt or "" for spec in specs for _ in spec.prompts]
    bank = load_caption_bank(config.caption_bank)
    preserve = [c for c in bank if not any(spec.name in c for spec in specs)] or [""]
    erase_concepts(components, targets, neutrals, preserve, config.erase_preserve_weight)


# What decides an erased (or untouched) model: the targets' images and prompts, and the erasure's own weight.
CLOSED_FORM_SETTINGS = ("method", "setting", "seed", "n_images", "caption_bank", "erase_preserve_weight")


@immunizers.register("erase")
class Erase(Immunizer):
    """Erase every target concept: its prompts are mapped to its class prompt; caption-bank prompts are kept.

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
