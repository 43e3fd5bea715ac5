"""`upper_saliency`: the outer steps move only the S^u weights the targets' loss is most sensitive to (SalUn, Fan et
al., ICLR 2024), so that the weights every concept relies on stay as they are."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mima.functional import Params, accumulate, batch_gradient
from mima.models.encoding import Batch, EncodedConcept

SALIENCY_BATCHES = 4  # batches per target whose gradients the masks sum


def saliency_masks(
    params: Params, loss: Callable[[Batch, torch.Generator], torch.Tensor], concepts: Sequence[EncodedConcept],
    share: float, batch_size: int, seed: int, against_class: bool = False,
) -> dict[str, torch.Tensor]:
    """For each tensor of `params`, a mask of its entries with the largest |gradient| of the targets' denoising loss
    (`loss` of a batch), summed over SALIENCY_BATCHES batches of each of `concepts`: the `share` of its entries, at
    least one. Per tensor, not one threshold over all of S^u, so that layers whose gradients are small by scale keep
    their share. With `against_class`, ranked by |g| / (|g_c| + mean |g_c|), g_c the same sum on the batches' class
    images under their class prompt (`Batch.prior`): an entry the class needs as much scores under 1, one it does not
    need scores |g| / mean |g_c|. Drawn from a generator of its own (`seed`): the same masks on every process and
    after a resume."""
    generator, names = torch.Generator().manual_seed(seed), list(params)

    def gradient(batch: Batch) -> Params:
        return batch_gradient(loss(batch, generator), params, names, create_graph=False)

    grads: Params = {}
    class_grads: Params = {}
    for concept in concepts:
        for _ in range(SALIENCY_BATCHES):
            batch = concept.batch(batch_size, generator)
            accumulate(grads, gradient(batch))
            if against_class:
                accumulate(class_grads, gradient(Batch(*batch.prior)))
    scores = {name: grad.abs() / _scale(class_grads[name]) if against_class else grad.abs()
              for name, grad in grads.items()}
    return {name: _largest(score, share) for name, score in scores.items()}


def _scale(grad: torch.Tensor) -> torch.Tensor:
    """|g_c| + mean |g_c|; 1 where the class's loss does not reach the tensor, which then ranks by |g| alone."""
    magnitude = grad.abs()
    typical = magnitude.mean()
    return magnitude + torch.where(typical > 0, typical, torch.ones_like(typical))


def _largest(magnitude: torch.Tensor, share: float) -> torch.Tensor:
    """A boolean mask of the `share` of `magnitude`'s entries with the largest values (at least one; ties broken by
    `topk`, so that exactly that many are kept)."""
    flat = magnitude.flatten()
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat.float(), max(1, round(share * flat.numel())), sorted=False).indices] = True
    return mask.view_as(magnitude)
