"""Shared machinery of the bi-level immunizers (MIMA, IMMA, imma-joint): S^l / S^u, inner step, objective."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import BatchLoss, Params, Unrolled, sgd_step, unet_call_with, unroll, unrolled_vjp
from mima.immunize.base import ConceptBatches, Immunizer
from mima.losses import diffusion_loss
from mima.models.components import Components
from mima.models.cross_attention import differentiable_attention, enable_gradient_checkpointing, select_parameters
from mima.models.encoding import Batch, EncodedConcept


class BilevelImmunizer(Immunizer):
    """max over S^u of the upper loss of adapted copies (docs/method.md), minus a prior-preservation term.

    Subclasses define `adapted_parameters`: how the simulated attacker's copies are made and combined.
    With `splits_concepts`, `upper_gradient` does only this process's concepts (`self.shard`) and returns its share
    of the gradient, which `gradients` sums over processes; otherwise every process computes all of it.
    """

    splits_concepts: ClassVar[bool] = False

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        self.unet, self.scheduler = components.unet, components.scheduler
        if self.config.gradient_checkpointing:
            enable_gradient_checkpointing(self.unet)
        names = [name for name, _ in self.unet.named_parameters()]
        self.lower_names = select_parameters(names, self.config.lower_params, what="lower-level (S^l)")
        self.upper_names = select_parameters(names, self.config.upper_params, what="upper-level (S^u)")
        self.unet.requires_grad_(False)
        for name, param in self.unet.named_parameters():
            param.requires_grad_(name in self.upper_names)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.unet.named_parameters())
        return {name: params[name] for name in self.upper_names}

    def base_parameters(self) -> Params:
        """theta^{k-1} restricted to S^l and S^u: upper parameters as they are, other lower ones as fresh leaves."""
        module_params = dict(self.unet.named_parameters())
        base = {name: module_params[name] for name in self.upper_names}
        for name in self.lower_names:
            base.setdefault(name, module_params[name].detach().requires_grad_())
        return base

    def loss(self, params: Params, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """The diffusion loss of the UNet with `params` substituted."""
        call = unet_call_with(self.unet, params)
        return diffusion_loss(call, self.scheduler, batch.latents, batch.hidden, generator=generator)

    def adapt(self, base: Params, batches: list[Batch], generator: torch.Generator) -> tuple[Params, float]:
        """The simulated attacker: `inner_steps` SGD steps on S^l from theta^{k-1}, on the mean loss of `batches`.

        Returns the adapted S^l parameters and the first lower-level loss.
        """
        lower = {name: base[name] for name in self.lower_names}
        losses = []
        with self.double_backward_attention():
            for _ in range(self.config.inner_steps):
                loss = torch.stack([self.loss({**base, **lower}, b, generator) for b in batches]).mean()
                lower = sgd_step(lower, loss, self.config.inner_lr, self.config.order, self.config.inner_clip)
                losses.append(loss.item())
        return lower, losses[0]

    def skip_draws(self, batch: Batch, generator: torch.Generator, times: int = 1) -> None:
        """Draw from `generator` what `times` losses of `batch` would, without the UNet: so a process skipping
        another's concept draws the same noise and timesteps as one process doing every concept."""
        for _ in range(times):
            diffusion_loss(lambda noisy, t, hidden: noisy, self.scheduler, batch.latents, batch.hidden,
                           generator=generator)

    def batch_loss(self, batch: Batch) -> BatchLoss:
        """The loss of `batch` as a function of the parameters and the generator."""
        return lambda params, generator: self.loss(params, batch, generator)

    def unroll(
        self, base: Params, batches: list[Batch], generator: torch.Generator, *, keep_last: bool = True
    ) -> Unrolled:
        """`adapt`'s values (same numbers, same draws from `generator`), keeping at most the last batch's graph
        (second order, `keep_last`), which `unrolled_vjp` then uses instead of replaying that batch."""
        lower = {name: base[name] for name in self.lower_names}
        config, keep = self.config, keep_last and self.config.order == "second-order"
        losses = [self.batch_loss(b) for b in batches]
        with self.double_backward_attention() if keep else nullcontext():
            return unroll(lower, base, losses, generator, steps=config.inner_steps, lr=config.inner_lr,
                          max_norm=config.inner_clip, keep=self.upper_names if keep else None)

    def unrolled_vjp(
        self, run: Unrolled, base: Params, batches: list[Batch], generator: torch.Generator, cotangent: Params
    ) -> Params:
        """The gradient on S^u of <cotangent, adapted S^l>, replaying `run` batch by batch (`unrolled_vjp`)."""
        losses = [self.batch_loss(b) for b in batches]
        with self.double_backward_attention():
            return unrolled_vjp(run, base, losses, generator, cotangent, self.upper_names, lr=self.config.inner_lr,
                                max_norm=self.config.inner_clip, order=self.config.order)

    def double_backward_attention(self) -> AbstractContextManager[None]:
        """The plain-math attention kernel where the inner step is differentiated twice (second order only)."""
        return differentiable_attention() if self.config.order == "second-order" else nullcontext()

    def mean_loss_gradient(
        self, params: Params, batches: list[Batch], generator: torch.Generator, wrt: list[str],
        owned: Sequence[bool] | None = None,
    ) -> tuple[list[float], Params]:
        """Each batch's loss at `params`, and the gradient of their mean on the names `wrt`, one graph at a time.

        With `owned`, only the owned batches count (the others' draws are skipped, their losses are 0.0).
        """
        leaves = {name: params[name].detach().requires_grad_() for name in wrt}
        losses, grads = [], {name: torch.zeros_like(p) for name, p in leaves.items()}
        for index, batch in enumerate(batches):
            if owned is not None and not owned[index]:
                self.skip_draws(batch, generator)
                losses.append(0.0)
                continue
            loss = self.loss({**params, **leaves}, batch, generator)
            for name, grad in zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True):
                grads[name] += grad / len(batches)
            losses.append(loss.item())
        return losses, grads

    def adapted_loss_gradient(
        self, base: Params, lowers: list[Batch], uppers: list[Batch], generator: torch.Generator
    ) -> tuple[list[float], Params, float]:
        """The losses of `uppers` after one simulated attack on all of `lowers` (imma-joint, the retain term),
        the gradient of their mean on S^u, and the first lower-level loss."""
        run = self.unroll(base, lowers, generator)
        wrt = list(dict.fromkeys([*self.lower_names, *self.upper_names]))
        losses, grads = self.mean_loss_gradient({**base, **run.params}, uppers, generator, wrt)
        pulled = self.unrolled_vjp(run, base, lowers, generator, {n: grads[n] for n in self.lower_names})
        direct = {n: grads[n] for n in self.upper_names if n not in run.params}  # S^u outside S^l
        return losses, add_grads(pulled, direct), run.first_loss

    @abstractmethod
    def upper_gradient(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[list[float], Params, dict[str, float]]:
        """Each concept's upper loss, the gradient of their mean on S^u and the lower-level losses to log,
        concept by concept."""

    def gradients(
        self, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[float, Params, dict[str, float]]:
        """The value of `objective` and its gradient on S^u, computed so that at most one concept's double-backward
        graph is alive at a time (same numbers and draws as differentiating `objective`), or, without
        `concept_by_concept`, by differentiating `objective` with every concept's graph at once (faster)."""
        if not self.config.concept_by_concept:
            objective, logs = self.objective(batches, generator)
            params = self.trainable_parameters()
            grads = torch.autograd.grad(objective, list(params.values()))
            return objective.item(), dict(zip(params, grads, strict=True)), logs
        batches = self.protected(batches)
        base = {name: p.detach() for name, p in self.base_parameters().items()}
        uppers, grads, logs = self.upper_gradient(base, batches, generator)
        if self.splits_concepts:  # each process's share, summed (a name missing from a share counts as zero)
            grads = {name: grads[name] if name in grads else torch.zeros_like(base[name]) for name in self.upper_names}
            uppers, grads, logs = self.shard.sum_floats(uppers), self.shard.sum(grads), self.shard.gather_logs(logs)
        objective, grads = -sum(uppers) / len(uppers), {name: -g for name, g in grads.items()}
        logs.update({f"upper/{name}": loss for name, loss in zip(batches, uppers, strict=True)})
        for name, (losses, term_grads) in self.preservation_gradients(base, batches, generator):
            weight, value = getattr(self.config, f"{name}_weight"), sum(losses) / max(len(losses), 1)
            objective += weight * value
            grads = add_grads(grads, {n: weight * g for n, g in term_grads.items()})
            logs[name] = value
        return objective, grads, logs

    def preservation_gradients(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> Iterator[tuple[str, tuple[list[float], Params]]]:
        """The prior, anchor and retain terms that are on (weight > 0): name, (losses, gradient of their mean)."""
        pairs = [(lower.prior, upper) for lower, upper in batches.values() if upper.prior is not None]
        uppers, wrt = [up for _, up in pairs], self.upper_names
        if self.config.prior_weight > 0:
            yield "prior", self._mean_or_zero(base, [Batch(*up.prior) for up in uppers], generator, wrt)
        if self.config.anchor_weight > 0:
            yield "anchor", self._mean_or_zero(base, [Batch(up.prior[0], up.hidden) for up in uppers], generator, wrt)
        if self.config.retain_weight > 0:
            lowers = [Batch(*lo) for lo, _ in pairs if lo is not None]
            classes = [Batch(*up.prior) for lo, up in pairs if lo is not None]
            yield "retain", self.adapted_loss_gradient(base, lowers, classes, generator)[:2] if lowers else ([], {})

    def _mean_or_zero(
        self, params: Params, batches: list[Batch], generator: torch.Generator, wrt: list[str]
    ) -> tuple[list[float], Params]:
        """`mean_loss_gradient`, batch n on process n mod size, summed over the processes."""
        if not batches:
            return [], {}
        owned = [self.shard.owns(index) for index in range(len(batches))]
        losses, grads = self.mean_loss_gradient(params, batches, generator, wrt, owned)
        return self.shard.sum_floats(losses), self.shard.sum(grads)

    @abstractmethod
    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[Params, dict[str, float]]:
        """theta' over S^l (the adapted and, for MIMA, merged parameters) and the lower-level losses to log."""

    def protected(self, batches: ConceptBatches) -> ConceptBatches:
        """The concepts whose upper loss is maximised (all of them, except for single-concept IMMA)."""
        return batches

    def objective(self, batches: ConceptBatches, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        batches = self.protected(batches)
        base = self.base_parameters()
        adapted, lower_logs = self.adapted_parameters(base, batches, generator)
        adapted = {**base, **adapted}
        upper = {name: self.loss(adapted, up, generator) for name, (_, up) in batches.items()}
        objective = -torch.stack(list(upper.values())).mean()
        logs = {**lower_logs, **{f"upper/{name}": loss.item() for name, loss in upper.items()}}
        if self.config.prior_weight > 0:
            prior = self.prior_loss(base, batches, generator)
            objective = objective + self.config.prior_weight * prior
            logs["prior"] = prior.item()
        if self.config.anchor_weight > 0:
            anchor = self.anchor_loss(base, batches, generator)
            objective = objective + self.config.anchor_weight * anchor
            logs["anchor"] = anchor.item()
        if self.config.retain_weight > 0:
            retain = self.retain_loss(base, batches, generator)
            objective = objective + self.config.retain_weight * retain
            logs["retain"] = retain.item()
        return objective, logs

    def prior_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Utility preservation: the released (un-adapted) model keeps denoising class images."""
        return self._class_images_loss(base, batches, generator, under_target_prompts=False)

    def anchor_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Erased targets stay erased: the released model denoises class images under the targets' prompts.

        Erasure maps a target's prompt to its class; without this term the ascent may undo that mapping (at N = 5
        the erased stripes prompt drew stripes again before any attack).
        """
        return self._class_images_loss(base, batches, generator, under_target_prompts=True)

    def _class_images_loss(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator, *, under_target_prompts: bool
    ) -> torch.Tensor:
        """The released model's mean loss on each concept's class images, under its class or its target prompts."""
        uppers = [up for _, up in batches.values() if up.prior is not None]
        losses = [
            self.loss(base, Batch(up.prior[0], up.hidden if under_target_prompts else up.prior[1]), generator)
            for up in uppers
        ]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def retain_loss(self, base: Params, batches: ConceptBatches, generator: torch.Generator) -> torch.Tensor:
        """Learnability of other concepts: after the simulated attacker adapts on class images, they still denoise.

        Without it the ascent may make the model fragile to ANY fine-tuning, which is not concept-specific.
        """
        pairs = [(lower.prior, upper.prior) for lower, upper in batches.values() if lower.prior is not None]
        if not pairs:
            return torch.zeros(())
        adapted, _ = self.adapt(base, [Batch(*lower) for lower, _ in pairs], generator)
        adapted = {**base, **adapted}
        return torch.stack([self.loss(adapted, Batch(*upper), generator) for _, upper in pairs]).mean()


def add_grads(grads: Params, more: Params) -> Params:
    """The sum of two gradient dicts (a name missing from one counts as zero)."""
    return {**more, **grads, **{name: grads[name] + g for name, g in more.items() if name in grads}}
