"""`upper_saliency`: the outer steps move only the S^u weights the targets' loss is most sensitive to (SalUn, Fan et
al., ICLR 2024), so that the weights every concept relies on stay as they are."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mima.functional import Params, accumulate
from mima.models.encoding import Batch, EncodedConcept

SALIENCY_BATCHES = 4  # batches per target whose gradients the masks sum


def saliency_masks(
    params: Params, loss: Callable[[Batch, torch.Generator], torch.Tensor], concepts: Sequence[EncodedConcept],
    share: float, batch_size: int, seed: int,
) -> dict[str, torch.Tensor]:
    """For each tensor of `params`, a mask of its entries with the largest |gradient| of the targets' denoising loss
    (`loss` of a batch), summed over SALIENCY_BATCHES batches of each of `concepts`: the `share` of its entries, at
    least one. Per tensor, not one threshold over all of S^u, so that layers whose gradients are small by scale keep
    their share. Drawn from a generator of its own (`seed`): the same masks on every process and after a resume."""
    generator = torch.Generator().manual_seed(seed)
    grads: Params = {}
    for concept in concepts:
        for _ in range(SALIENCY_BATCHES):
            value = loss(concept.batch(batch_size, generator), generator)
            accumulate(grads, dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True)))
    return {name: _largest(grad.abs(), share) for name, grad in grads.items()}


def _largest(magnitude: torch.Tensor, share: float) -> torch.Tensor:
    """A boolean mask of the `share` of `magnitude`'s entries with the largest values (at least one; ties broken by
    `topk`, so that exactly that many are kept)."""
    flat = magnitude.flatten()
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.float(), max(1, round(share * flat.numel())), sorted=False).indices] = True
    return mask.view_as(magnitude)
