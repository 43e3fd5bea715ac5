"""The preservation terms of the bi-level objective (prior, anchor, retain, bank prior): their losses as one expression
(`objective`) and their gradients (concept by concept), and how the ascent's gradient meets theirs."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager

import torch

from mima.functional import Params, accumulate, add_grads, unet_call_with, without_conflict
from mima.immunize.base import ConceptBatches, Immunizer
from mima.immunize.class_batches import class_batches, retain_batches
from mima.losses import UNetCall, distillation_loss, draw_noise, teacher_prediction
from mima.models.encoding import Batch


class PreservationTerms(Immunizer):
    """What keeps the immunized model useful while the ascent protects: the released model still denoises class
    images (prior), erased targets stay erased (anchor), other concepts stay learnable after a simulated attack
    (retain), what no term names stays drawn (bank prior). Uses the bi-level machinery of `BilevelImmunizer`, its
    one subclass."""

    def combined(self, ascent: Params, terms: list[Params]) -> Params:
        """The step's gradient: the ascent's plus each weighted preservation term's, in that order; with
        `project_ascent` the ascent less its conflict with the terms' sum, with `project_preservation` that sum less
        its conflict with the ascent (each against the other's gradient as computed)."""
        if not (self.projects and terms):
            return functools.reduce(add_grads, terms, ascent)
        preservation = functools.reduce(add_grads, terms)
        kept_ascent = without_conflict(ascent, preservation) if self.config.project_ascent else ascent
        kept_terms = without_conflict(preservation, ascent) if self.config.project_preservation else preservation
        return add_grads(kept_ascent, kept_terms)

    @property
    def projects(self) -> bool:
        """Whether a step projects the ascent and the preservation terms apart (needs their gradients apart)."""
        return self.config.project_ascent or self.config.project_preservation

    def preservation_gradients(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> Iterator[tuple[str, tuple[list[float], Params]]]:
        """The prior, anchor, retain and bank prior terms that are on (weight > 0): name, (losses, gradient of their
        mean)."""
        classes, wrt = class_batches(batches, self.class_of).values(), self.upper_names
        if self.config.prior_weight > 0:
            yield "prior", self._mean_or_zero(base, [upper for _, upper in classes], generator, wrt)
        if self.config.anchor_weight > 0:
            uppers = [up for _, up in batches.values() if up.prior is not None]
            yield "anchor", self._mean_or_zero(base, [Batch(up.prior[0], up.hidden) for up in uppers], generator, wrt)
        if self.config.retain_weight > 0:
            with self.retain_attack():
                pairs = retain_batches(batches, self.class_of, self.attacker, self.config.retain_prompt,
                                       self.retained, generator)
                lowers, uppers, concepts = (list(part) for part in zip(*pairs, strict=True)) if pairs else ([], [], [])
                teacher = self.config.retain_target == "original"
                term = (self.adapted_loss_gradient(base, lowers, uppers, concepts, generator, teacher=teacher)[:2]
                        if pairs else ([], {}))
            yield "retain", term
        if self.config.bank_prior_weight > 0 and self.config.bank_prior_target == "original":
            yield "bank_prior", self._distillation_gradient(base, self.bank_batches(batches, generator), generator)
        elif self.config.bank_prior_weight > 0:
            yield "bank_prior", self._mean_or_zero(base, self.bank_batches(batches, generator), generator, wrt)

    def retain_attack(self) -> AbstractContextManager[None]:
        """Where the retain term's simulated attack runs: afresh, by its own attacker where `retain_attackers` lists
        some, in first order with `retain_order: first-order`, at `retain_lr_scale` times the attacker's rate."""
        order = "first-order" if self.config.retain_order == "first-order" else None
        return self.distribution.afresh(order, self.config.retain_lr_scale)

    def teacher_prediction(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The original model's prediction (`original`: S^u as the immunization found it) on `batch` noised as drawn,
        under the batch's own conditioning (a class image's class prompt, whatever an attacker captions it with):
        what the retain term's attacked model is pulled toward with `retain_target: original`."""
        return teacher_prediction(self.teacher(), self.scheduler, batch.latents, noise, timesteps, batch.hidden)

    def teacher(self) -> UNetCall:
        """The UNet as the immunization found it (`original`), which the distilled terms are pulled toward."""
        if not self.original:  # else the current weights would teach themselves, silently
            raise ValueError("a distilled term needs the original weights (`Immunizer.original`)")
        return unet_call_with(self.unet, self.original)

    def _mean_or_zero(
        self, params: Params, batches: list[Batch], generator: torch.Generator, wrt: list[str]
    ) -> tuple[list[float], Params]:
        """`mean_loss_gradient`, batch n on process n mod size, summed over the processes."""
        if not batches:
            return [], {}
        owned = [self.shard.owns(index) for index in range(len(batches))]
        losses, grads, _ = self.mean_loss_gradient(params, batches, generator, wrt, owned)
        return self.shard.sum_floats(losses), self.shard.sum(grads)

    def prior_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Utility preservation: the released (un-adapted) model keeps denoising class images (`class_batches`)."""
        return self._mean_loss(base, [upper for _, upper in class_batches(batches, self.class_of).values()], generator)

    def anchor_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Erased targets stay erased: the released model denoises each target's class images under its prompts.

        Erasure maps a target's prompt to its class; without this term the ascent may undo that mapping (at N = 5
        the erased stripes prompt drew stripes again before any attack).
        """
        uppers = [up for _, up in batches.values() if up.prior is not None]
        return self._mean_loss(base, [Batch(up.prior[0], up.hidden) for up in uppers], generator)

    def bank_prior_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """What the user did not name stays drawn: the released model keeps denoising the images the original model
        drew for caption-bank prompts that name no target (`data/bank-prior/`).

        The prior term keeps only the class prompt; without this one the ascent was measured to break a concept
        no term names (docs/efficacy.md, "The non-target broken before any attack"). With `bank_prior_target:
        original` the target is the original model's prediction (`distillation_loss`).
        """
        if self.config.bank_prior_target == "original":
            return torch.stack([self._distillation_loss(base, batch, generator)
                                for batch in self.bank_batches(batches, generator)]).mean()
        return self._mean_loss(base, self.bank_batches(batches, generator), generator)

    def _distillation_loss(self, base: Params, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return distillation_loss(unet_call_with(self.unet, base), self.teacher(), self.scheduler, batch.latents,
                                 batch.hidden, generator)

    def _distillation_gradient(
        self, base: Params, batches: list[Batch], generator: torch.Generator
    ) -> tuple[list[float], Params]:
        """The distillation losses of `batches` and the gradient of their mean on S^u, batch n on process n mod size
        (every batch's noise drawn on every process), summed over the processes."""
        leaves = {name: base[name].detach().requires_grad_() for name in self.upper_names}
        losses, grads = [], {}
        for index, batch in enumerate(batches):
            if not self.shard.owns(index):
                draw_noise(self.scheduler, batch.latents, generator)  # the draws every process makes
                losses.append(0.0)
                continue
            loss = self._distillation_loss({**base, **leaves}, batch, generator)
            losses.append(loss.item())
            step = torch.autograd.grad(loss / len(batches), list(leaves.values()), allow_unused=True)
            accumulate(grads, {n: g for n, g in zip(leaves, step, strict=True) if g is not None})
        grads = {name: grads.get(name, torch.zeros_like(p)) for name, p in leaves.items()}
        return self.shard.sum_floats(losses), self.shard.sum(grads)

    def bank_batches(self, batches: ConceptBatches, generator: torch.Generator) -> list[Batch]:
        """One batch of the bank prior's images, as large as a concept's, a `bank_prior_unconditional` share of
        them under the empty prompt."""
        if self.bank is None:
            raise ValueError("bank_prior_weight > 0 needs the bank prior's images (`Immunizer.bank`)")
        size = next(iter(batches.values()))[0].latents.shape[0]
        latents, hidden = self.bank.sample(size, generator)[:2]
        if share := self.config.bank_prior_unconditional:  # no draw without it: earlier runs repeat exactly
            empty = (torch.rand(size, generator=generator) < share).to(hidden.device)
            hidden = torch.where(empty[:, None, None], self.unconditional, hidden)
        return [Batch(latents, hidden)]

    def _mean_loss(self, base: Params, batches: list[Batch], generator: torch.Generator) -> torch.Tensor:
        """The released model's mean loss on `batches`."""
        losses = [self.loss(base, batch, generator) for batch in batches]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def retain_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Learnability of other concepts: after a simulated attack on class images (or on retain_concepts) they
        still denoise (`retain_target: original`: as the original model does under their own prompts). Without it
        the ascent may make the model fragile to ANY fine-tuning, not concept-specific."""
        with self.retain_attack():
            pairs = retain_batches(batches, self.class_of, self.attacker, self.config.retain_prompt, self.retained,
                                   generator)
            if not pairs:
                return torch.zeros(())
            lowers, _, concepts = zip(*pairs, strict=True)
            trajectory, _ = self.adapt_trajectory(base, list(lowers), list(concepts), generator)

            def retained(phi: Params, upper: Batch, concept: int | None) -> torch.Tensor:
                params = {**base, **phi}
                weights = {**base, **self.attacker.weights(params)}
                if self.config.retain_target == "noise":
                    return self.loss(weights, Batch(upper.latents, self.attacker.hidden(params, upper, concept)),
                                     generator)
                return distillation_loss(unet_call_with(self.unet, weights), self.teacher(), self.scheduler,
                                         upper.latents, self.attacker.hidden(params, upper, concept), generator,
                                         teacher_hidden_states=upper.hidden)

            return torch.stack([  # the mean over the trajectory's points, as the upper loss
                torch.stack([retained(phi, upper, concept) for _, upper, concept in pairs]).mean()
                for phi in trajectory]).mean()
