"""AttackConfig: the settings of one attack run (light to import: the CLI builds its flags from it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mima.config import Config
from mima.errors import ConfigError

CONCEPT_PROMPT = "concept"
FRESH_TOKEN_PROMPT = "fresh-token"


@dataclass(frozen=True)
class AttackConfig(Config):
    """Settings of one attack run. None means "not given": the method's default, which the method declares and
    [`~mima.attacks.base.Attack.settings`] applies when the run is built (`attack.json` records the values used)."""

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
    prompt: str | None = field(default=None, metadata={
        "help": "what the training images are captioned with: 'concept' (the concept's own prompts; a learned token "
        "is added beside its words), 'fresh-token' (the words naming the concept replaced by a token: the learned "
        "one, or for lora/dreambooth --token untrained, default 'sks') or any other TEXT, the caption of every "
        "image; evaluation samples use the same (default: the method's, fresh-token for textual-inversion, "
        "concept for the others)"})
    token: str | None = field(default=None, metadata={
        "help": "new token (textual-inversion, custom-diffusion), or the rare untrained one of --prompt fresh-token"})
    n_images: int = field(default=32, metadata={"help": "images generated per toy concept"})
    n_class_images: int = field(default=32, metadata={"help": "class images for prior preservation"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast precision, float32 weights (fp16: GPU only, loss-scaled)"}
    )
    sampling_precision: Literal["no", "fp16", "bf16", "auto"] | None = field(
        default=None, metadata={"help": "autocast precision of the evaluation samples (default: mixed_precision; "
                                        "auto: bf16 where the device computes it natively, else no)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "save_every", "lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name in ("batch_size", "eval_images", "sampling_steps", "rank", "n_images", "n_class_images"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("prompt must be 'concept', 'fresh-token' or a non-empty text, got an empty one")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError(f"token must be one word without spaces, got {self.token!r}")

    def check_names(self) -> None:
        """Resolve the method's name, so that a misspelling fails before any model loads; every run and
        `mima validate` call it."""
        from mima.attacks import attacks

        attacks.get(self.method)
