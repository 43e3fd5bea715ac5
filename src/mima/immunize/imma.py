"""The imma-joint ablation (all concepts, one shared copy, no Merge) and IMMA (Zheng & Yeh, ECCV 2024)."""

from __future__ import annotations

import warnings

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.base import ConceptBatches, immunizers
from mima.immunize.bilevel import BilevelImmunizer
from mima.models.components import Components
from mima.models.encoding import EncodedConcept


@immunizers.register("imma-joint")
class IMMAJoint(BilevelImmunizer):
    """One shared adapted copy trained on the mean of all concepts' losses; no per-concept copies, no Merge.

    The mean (not the sum) keeps the simulated attacker's step size equal to MIMA's, so the two differ only in Merge.
    """

    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[tuple[list[Params], list[Params]]], dict[str, float]]:
        lowers = [lower for lower, _ in batches.values()]
        trajectory, loss = self.adapt_trajectory(base, lowers, range(len(batches)), generator)
        count = len(batches)
        points = [([self.attacker.weights({**base, **phi})] * count, [phi] * count) for phi in trajectory]
        return points, {"lower/joint": loss}

    def upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[float], Params, dict[str, float]]:
        lowers, uppers = [lower for lower, _ in batches.values()], [upper for _, upper in batches.values()]
        losses, grads, first_loss = self.adapted_loss_gradient(base, lowers, uppers, range(len(lowers)), generator,
                                                               upper=True)
        return losses, grads, {"lower/joint": first_loss}


@immunizers.register("imma")
class IMMA(IMMAJoint):
    """Single-concept IMMA: protects only the FIRST concept (N = 1, Merge = identity)."""

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        if len(concepts) > 1:
            warnings.warn(f"imma protects one concept: immunizing '{concepts[0].name}' only", stacklevel=2)
        super().prepare(components, specs, concepts)

    def protected(self, batches: ConceptBatches) -> ConceptBatches:
        first = next(iter(batches))
        return {first: batches[first]}
