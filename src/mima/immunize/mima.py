"""MIMA (Zheng & Yeh, AAAI 2025): one adapted copy per concept, merged in closed form, ascended through.

One outer step k, whole (docs/method.md, "One outer step"); each line names the function that does it:

    x^l_n, x^u_n   two batches of each target's images              immunize.trainer._Loop._batches
    attacker       this step's simulated attacker, sampled          AttackerDistribution.sample
    theta          theta^{k-1} on S^l and S^u                       BilevelImmunizer.base_parameters
    theta'_n       the simulated attacker's steps on concept n      BilevelImmunizer.unroll -> functional.unroll
    theta'         Merge(theta'_1 .. theta'_N), K/V in closed form  MergeInputs.merge -> closed_form_merge
    upper, g'      mean_n L(x^u_n, c_n; theta') and its gradient    BilevelImmunizer.mean_loss_gradient
    g'_n           g' pulled back through the Merge to copy n       MergeInputs.pull_back
    g              g'_n pulled back through copy n's inner step     BilevelImmunizer.unrolled_vjp (one at a time)
    terms          prior, anchor and retain terms and gradients     BilevelImmunizer.preservation_gradients
    objective      -upper + terms, and its gradient on S^u          BilevelImmunizer.gradients
    S^u            AdamW step on clip(gradient) with rate beta      training.TrainingLoop.train_step

`MIMA.upper_gradient` runs lines 4-8 (lines 5-8 at each point of a first-order trajectory, in
`merged_upper_gradient`, averaged). `BilevelImmunizer.objective` is the same objective as one differentiable
expression (`adapted_parameters` then autograd), kept as the reference the tests compare the gradient with.
"""

from __future__ import annotations

import torch

from mima.data.captions import load_caption_bank
from mima.data.concepts import ConceptSpec
from mima.functional import Params, Unrolled, add_grads, divided, tensor_bytes
from mima.immunize.attackers import SimulatedAttacker
from mima.immunize.base import ConceptBatches, immunizers
from mima.immunize.bilevel import BilevelImmunizer
from mima.losses import draw_noise
from mima.merge.plan import MergeInputs, MergePlan, regularizer
from mima.models.components import Components
from mima.models.encoding import Batch, EncodedConcept


@immunizers.register("mima")
class MIMA(BilevelImmunizer):
    """theta' = Merge(theta'_1 .. theta'_N), theta'_n = theta - alpha grad L(x^l_n, c_n; theta)."""

    splits_concepts = True

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        super().prepare(components, specs, concepts)
        self.components = components  # the regulariser, the same for every plan, computed once
        self.regularizer = regularizer(components, load_caption_bank(self.config.caption_bank), self.config.ridge)
        self.plans: dict[tuple[tuple[str, ...], ...], MergePlan] = {}  # by the prompts the Merge keeps
        for attacker in self.distribution.attackers:  # before any step; another drawn token's when first drawn
            self.plan_for(attacker)

    @property
    def plan(self) -> MergePlan:
        """The Merge of the current outer step's attacker."""
        return self.plan_for(self.attacker)

    def plan_for(self, attacker: SimulatedAttacker) -> MergePlan:
        """The Merge whose rows are the prompts as `attacker` captions them now (with its current fresh token), one
        per distinct set of prompts."""
        prompts = tuple(tuple(attacker.merge_prompts(n)) for n in range(attacker.targets))
        if prompts not in self.plans:
            self.plans[prompts] = MergePlan.build(self.components, [list(p) for p in prompts], self.regularizer)
        return self.plans[prompts]

    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[tuple[list[Params], list[Params]]], dict[str, float]]:
        points, logs = self.own_copies(base, batches, generator)
        merged = [self.plan.merge(base, [self.attacker.weights({**base, **phi}) for phi in phis]) for phis in points]
        return [([theta] * len(phis), phis) for theta, phis in zip(merged, points, strict=True)], logs

    def upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[float], Params, dict[str, float]]:
        """Concept by concept: adapt each copy, keeping only what the Merge needs at each trajectory point (and the
        last copy's gradients, the others' while `spare_gradient_bytes` lasts, and with `hvp: exact` the last
        copy's graph); at each point, merge, take the upper gradient at the
        merged parameters, pull it back through the Merge, and carry each copy's share back through its inner steps
        (`unrolled_vjp`: one copy's graph alive at a time); average over the points."""
        lowers, shard, attacker = [lower for lower, _ in batches.values()], self.shard, self.attacker
        owned = [shard.owns(n) for n in range(len(lowers))]
        last = max(n for n in range(len(lowers)) if owned[n]) if any(owned) else -1
        points = len(attacker.spec.trajectory_steps)
        inputs, runs, kept, logs = [self.plan.inputs() for _ in range(points)], {}, {}, {}
        spare = self.spare_gradient_bytes()
        upper_bytes = tensor_bytes(base[name] for name in self.upper_names)
        for n, (name, lower) in enumerate(zip(batches, lowers, strict=True)):
            if not owned[n]:  # another process adapts this copy
                self.skip_attack(base, lower, n, generator)
                continue
            run = self.unroll(base, [lower], [n], generator, keep_last=n == last,
                              keeps_gradients=n == last or upper_bytes <= spare)  # else S^u's would be dropped
            for point, phi in zip(inputs, run.trajectory, strict=True):
                point.add(attacker.weights({**base, **phi}), n)
            size = run.gradient_bytes()
            keeps_gradients = n != last and size <= spare  # the last keeps its whole run
            spare -= size if keeps_gradients else 0
            runs[n] = run if n == last else run.for_replay(keep_gradients=keeps_gradients)
            kept[n] = [attacker.kept(phi) for phi in run.trajectory]
            logs[f"lower/{name}"] = run.first_loss
        losses, grads = [0.0] * len(lowers), {}
        for p, point in enumerate(inputs):
            point_losses, point_grads = self.merged_upper_gradient(
                base, batches, generator, point, runs, {n: phis[p] for n, phis in kept.items()}, owned)
            grads = add_grads(grads, divided(point_grads, points))
            losses = [total + loss / points for total, loss in zip(losses, point_losses, strict=True)]
        return losses, grads, logs

    def skip_attack(self, base: Params, batch: Batch, concept: int, generator: torch.Generator) -> None:
        """Draw from `generator` what an attack on `batch` would, without the UNet: so a process skipping another's
        concept draws the same noise and timesteps as one process doing every concept."""
        self.distribution.start(base, [concept], generator)
        for _ in range(self.attacker.spec.steps):
            draw_noise(self.scheduler, batch.latents, generator)

    def merged_upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator, inputs: MergeInputs,
        runs: dict[int, Unrolled], kept: dict[int, Params], owned: list[bool],
    ) -> tuple[list[float], Params]:
        """At one trajectory point: each concept's counted upper loss at the merge of the copies there (`inputs`),
        and this process's share of its gradient on S^u, through the Merge and each owned copy's attack."""
        shard, lowers = self.shard, [lower for lower, _ in batches.values()]
        inputs.combine(shard.sum)  # every process merges every copy
        merged = {**base, **inputs.merge(base)}
        uppers = [upper for _, upper in batches.values()]
        wrt = list(dict.fromkeys([*inputs.names(), *self.upper_names]))
        losses, upper_grads, phi_grads = self.mean_loss_gradient(
            merged, uppers, generator, wrt, owned, phis=[kept.get(n, {}) for n in range(len(uppers))],
            concepts=range(len(uppers)), upper=True)
        upper_grads = shard.sum(upper_grads)
        copy_grad, grads = inputs.pull_back(base, upper_grads, self.upper_names)
        unmerged = {n: upper_grads[n] for n in self.upper_names if n not in inputs.names()}
        grads = add_grads(grads, unmerged)
        if not shard.is_main:  # the gradient through W_0 and outside the Merge: counted once, on the main process
            grads = {}
        for n in sorted(runs, reverse=True):  # the kept graph first, so that one graph is alive at a time
            grads = add_grads(grads, self.attack_gradient(runs[n], base, kept[n], [lowers[n]], [n], generator,
                                                          copy_grad(n), phi_grads[n]))
        return losses, grads
