"""The Attack interface (an adaptation method a malicious fine-tuner would use), its config and registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from mima.attacks.config import AttackConfig
from mima.data.concepts import ConceptSpec
from mima.losses import diffusion_loss, unet_caller
from mima.models.components import Components
from mima.registry import Registry


class Attack(ABC):
    """An adaptation method: `prepare` injects adapters or tokens; the shared trainer optimises
    `trainable_parameters` on `loss`; `export` writes what plain diffusers loads.

    Each method declares its defaults here, as class attributes (its documented values, scaled to the toy world);
    [`Attack.settings`] is the one place that applies them.
    """

    default_lr: ClassVar[float]
    reference_lr: ClassVar[float]
    """The learning rate of the method's reference implementation for Stable Diffusion, the default on real models."""
    default_steps: ClassVar[int]
    uses_prior: ClassVar[bool] = False

    def __init__(self, config: AttackConfig) -> None:
        self.config = config

    @classmethod
    def settings(cls, config: AttackConfig, toy: bool = True) -> AttackConfig:
        """`config` as this method runs it: unset (None) steps and learning rate take the method's `default_steps`
        and `default_lr` (`reference_lr` on a real model, `toy=False`), an unset checkpoint period a quarter of the
        steps (at least 1)."""
        steps = cls.default_steps if config.steps is None else config.steps
        default_lr = cls.default_lr if toy else cls.reference_lr
        return config.with_overrides(
            steps=steps, lr=default_lr if config.lr is None else config.lr,
            save_every=max(1, steps // 4) if config.save_every is None else config.save_every,
        )

    @abstractmethod
    def prepare(self, components: Components, concept: ConceptSpec) -> None:
        """Bind to the model: freeze it and inject what this method trains."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimiser updates (and only that)."""

    @abstractmethod
    def export(self, out_dir: Path) -> Path:
        """Write the learnt artifact in the format plain diffusers loads; return its folder."""

    def prompt(self, prompt: str) -> str:
        """How this method refers to the concept in a prompt (token methods substitute their new token)."""
        return prompt

    @classmethod
    def rewrites_prompts(cls) -> bool:
        """Whether `prompt` changes prompts, so that the samples at step 0 are not the model's own drawing."""
        return cls.prompt is not Attack.prompt

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text conditioning of `prompts` (differentiable where the method trains the text side)."""
        with torch.set_grad_enabled(self.trains_text()):
            return self.components.encode_prompts([self.prompt(p) for p in prompts])

    def trains_text(self) -> bool:
        return False

    def loss(
        self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator,
        prior: tuple[torch.Tensor, list[str]] | None = None,
    ) -> torch.Tensor:
        """The shared diffusion loss of one batch (with prior preservation when the method uses it)."""
        prior_pair = (prior[0], self.encode(prior[1])) if prior is not None else None
        return diffusion_loss(
            unet_caller(self.components.unet), self.components.scheduler, latents, self.encode(prompts),
            generator=generator, prior=prior_pair, prior_weight=self.config.prior_weight,
        )


attacks: Registry[Attack] = Registry("attack", Attack)
