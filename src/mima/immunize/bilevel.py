"""Shared machinery of the bi-level immunizers (MIMA, IMMA, imma-joint): S^l / S^u, inner step, objective."""

from __future__ import annotations

from abc import abstractmethod

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Params, sgd_step, unet_call_with
from mima.immunize.base import ConceptBatches, Immunizer
from mima.losses import diffusion_loss
from mima.models.components import Components
from mima.models.cross_attention import select_parameters, use_differentiable_attention
from mima.models.encoding import Batch, EncodedConcept


class BilevelImmunizer(Immunizer):
    """max over S^u of the upper loss of adapted copies (docs/method.md), minus a prior-preservation term.

    Subclasses define `adapted_parameters`: how the simulated attacker's copies are made and combined.
    """

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        self.unet, self.scheduler = components.unet, components.scheduler
        if self.config.order == "second-order":  # only double backward needs the plain-math attention kernel
            use_differentiable_attention(self.unet)
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
        for _ in range(self.config.inner_steps):
            loss = torch.stack([self.loss({**base, **lower}, b, generator) for b in batches]).mean()
            lower = sgd_step(lower, loss, self.config.inner_lr, self.config.order, self.config.inner_clip)
            losses.append(loss.item())
        return lower, losses[0]

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
