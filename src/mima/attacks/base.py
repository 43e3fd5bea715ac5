"""The Attack interface (an adaptation method a malicious fine-tuner would use), its config and registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch

from mima.attacks.config import CONCEPT_PROMPT, FRESH_TOKEN_PROMPT, AttackConfig
from mima.attacks.prompts import RARE_TOKEN, caption, check_new_token, check_rare_token
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
    default_prompt: ClassVar[str] = CONCEPT_PROMPT
    """The prompt mode when `config.prompt` is unset (see `mima.attacks.prompts`)."""
    learns_token: ClassVar[bool] = False
    """Whether the method trains a new token's embedding; then every prompt it trains or samples holds the token."""

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

    @classmethod
    def prompt_mode(cls, config: AttackConfig) -> str:
        """`concept`, `fresh-token` or the fixed text that `config` trains under."""
        return config.prompt or cls.default_prompt

    @classmethod
    def token_for(cls, config: AttackConfig, concept: ConceptSpec) -> str | None:
        """The token this run writes into prompts: for a method that learns none, the rare untrained identifier
        of `fresh-token` (`config.token`, default "sks"), else None. Token methods override it."""
        return (config.token or RARE_TOKEN) if cls.prompt_mode(config) == FRESH_TOKEN_PROMPT else None

    @classmethod
    def check_prompt(cls, config: AttackConfig, concept: ConceptSpec, tokenizers: list, caption_bank: str) -> None:
        """Refuse (`ConfigError`) a token the run cannot use, before any model loads: a learned token the
        `tokenizers` already know, or a fresh identifier that is a common word (of `caption_bank`) or unreadable."""
        token = cls.token_for(config, concept)
        if cls.learns_token:
            check_new_token(token, tokenizers)
        elif token is not None:
            check_rare_token(token, concept, tokenizers, caption_bank)

    def prompt(self, prompt: str) -> str:
        """How this run captions (and samples) an image whose own prompt is `prompt`, under its prompt mode."""
        token = self.token_for(self.config, self.concept)
        return caption(prompt, self.prompt_mode(self.config), self.concept, token, learns_token=self.learns_token)

    @classmethod
    def rewrites_prompts(cls, prompt: str | None = None) -> bool:
        """Whether a run with prompt mode `prompt` (default the method's) changes the concept's prompts, so that
        its samples at step 0 are not the model's own drawing of them."""
        return cls.learns_token or (prompt or cls.default_prompt) != CONCEPT_PROMPT

    def encode(self, prompts: list[str], *, rewrite: bool = True) -> torch.Tensor:
        """Text conditioning of `prompts`, captioned by [`Attack.prompt`] unless `rewrite` is False (class images
        keep their class prompt); differentiable where the method trains the text side."""
        with torch.set_grad_enabled(self.trains_text()):
            return self.components.encode_prompts([self.prompt(p) for p in prompts] if rewrite else prompts)

    def trains_text(self) -> bool:
        return False

    def loss(
        self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator,
        prior: tuple[torch.Tensor, list[str]] | None = None,
    ) -> torch.Tensor:
        """The shared diffusion loss of one batch (with prior preservation when the method uses it)."""
        prior_pair = (prior[0], self.encode(prior[1], rewrite=False)) if prior is not None else None
        return diffusion_loss(
            unet_caller(self.components.unet), self.components.scheduler, latents, self.encode(prompts),
            generator=generator, prior=prior_pair, prior_weight=self.config.prior_weight,
        )


attacks: Registry[Attack] = Registry("attack", Attack)
