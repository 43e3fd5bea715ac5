"""The Attack interface (an adaptation method a malicious fine-tuner would use), its config and registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mima.config import Config
from mima.data.concepts import ConceptSpec
from mima.errors import ConfigError
from mima.losses import diffusion_loss, unet_caller
from mima.models.components import Components
from mima.registry import Registry


@dataclass(frozen=True)
class AttackConfig(Config):
    """Settings of one attack run. None means "the method's own default" (see `mima ls attacks`)."""

    method: str = field(default="lora", metadata={"help": "adaptation method (see `mima ls attacks`)"})
    steps: int | None = field(default=None, metadata={"help": "training steps (default: the method's budget)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the method's)"})
    batch_size: int = field(default=4, metadata={"help": "images per step"})
    save_every: int | None = field(default=None, metadata={"help": "checkpoint + evaluation-sample period"})
    seed: int = field(default=0, metadata={"help": "seed of data, noise, timesteps and evaluation samples"})
    eval_prompts: tuple[str, ...] = field(default=(), metadata={"help": "evaluation prompts (default: concept's)"})
    eval_images: int = field(default=32, metadata={"help": "evaluation images per checkpoint"})
    sampling_steps: int = field(default=25, metadata={"help": "DDIM steps of evaluation samples"})
    guidance_scale: float = field(default=4.0, metadata={"help": "guidance of evaluation samples"})
    rank: int = field(default=4, metadata={"help": "lora: adapter rank"})
    prior_weight: float = field(default=1.0, metadata={"help": "dreambooth: prior-preservation weight (0: off)"})
    train_text_encoder: bool = field(default=False, metadata={"help": "dreambooth: also tune the text encoder"})
    token: str | None = field(default=None, metadata={"help": "new token (textual-inversion, custom-diffusion)"})
    n_images: int = field(default=32, metadata={"help": "images generated per toy concept"})
    n_class_images: int = field(default=32, metadata={"help": "class images for prior preservation"})

    def __post_init__(self) -> None:
        for name in ("steps", "save_every", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("batch_size", "eval_images", "sampling_steps", "rank", "n_images", "n_class_images"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


class Attack(ABC):
    """An adaptation method: `prepare` injects adapters or tokens; the shared trainer optimises
    `trainable_parameters` on `loss`; `export` writes what plain diffusers loads.

    Class attributes give the method's documented defaults, scaled to the toy world.
    """

    default_lr: ClassVar[float]
    default_steps: ClassVar[int]
    uses_prior: ClassVar[bool] = False

    def __init__(self, config: AttackConfig) -> None:
        self.config = config

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
