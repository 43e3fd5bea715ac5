"""imma-each: IMMA on each concept at once. One adapted copy per concept, as MIMA makes them, and each concept's
upper loss taken at its own copy (no Merge): the mean over concepts of IMMA's objective."""

from __future__ import annotations

import torch

from mima.functional import Params, add_grads, divided
from mima.immunize.base import ConceptBatches, immunizers
from mima.immunize.bilevel import BilevelImmunizer


@immunizers.register("imma-each")
class IMMAEach(BilevelImmunizer):
    """theta'_n = theta - alpha grad L(x^l_n, c_n; theta); the ascent on mean_n L(x^u_n, c_n; theta'_n).

    Where MIMA's Merge keeps each copy's keys and values on its own concept's prompts and averages the rest (so each
    copy's update outside the keys and values counts 1/N in the weights its upper loss is taken at), here each copy
    counts whole, as each real attack on one concept does."""

    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[tuple[list[Params], list[Params]]], dict[str, float]]:
        points, logs = self.own_copies(base, batches, generator)
        return [([self.attacker.weights({**base, **phi}) for phi in phis], phis) for phis in points], logs

    def upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[float], Params, dict[str, float]]:
        """Concept by concept: adapt each copy, keeping its trajectory's values (the attacker's phi: LoRA factors or
        a token are small; a `full` copy is S^l) and what replaying it needs; then, at each point and for each
        concept, the upper loss at its own copy, carried back through its attack (one graph alive at a time)."""
        lowers, uppers = [lower for lower, _ in batches.values()], [upper for _, upper in batches.values()]
        runs, trajectories, logs = [], [], {}
        for n, (name, lower) in enumerate(zip(batches, lowers, strict=True)):
            run = self.unroll(base, [lower], [n], generator, keep_last=False, keeps_gradients=False)
            trajectories.append(run.trajectory)
            runs.append(run.for_replay())
            logs[f"lower/{name}"] = run.first_loss
        count, points = len(lowers), len(self.attacker.spec.trajectory_steps)
        losses, grads = [0.0] * count, {}
        for p in range(points):
            for n, run in enumerate(runs):
                (loss,), point_grads = self.point_gradient(run, base, trajectories[n][p], [lowers[n]], [uppers[n]],
                                                           [n], generator, upper=True)
                grads = add_grads(grads, divided(point_grads, points * count))
                losses[n] += loss / points
        return losses, grads, logs
