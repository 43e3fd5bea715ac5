"""The toy judge: a small CNN that names the style and the object of a toy-world image.

It is trained on all 20 toy concepts (held-out ones included) and serves as the evaluation image encoder of the toy
world: [`ToyJudge.features`] is its penultimate embedding, [`ToyJudge.predict`] and [`ToyJudge.concept_rate`] its
classifier. The trunk uses GroupNorm, never BatchNorm or dropout, so `eval()` and `train()` compute the same thing.
A trained judge ships in `mima/assets/toy-judge` ([`load_default_judge`]).
"""

from __future__ import annotations

import importlib.resources
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mima.config import Config
from mima.errors import ConfigError, DataError, ModelError, TrainingError
from mima.toy import world as toy_world
from mima.toy.pretrain import images_to_tensor
from mima.utils.io import load_tensors, save_tensors

STYLE_LABELS: tuple[str, ...] = (*toy_world.STYLES, "none")
OBJECT_LABELS: tuple[str, ...] = (*toy_world.OBJECTS, "none")
_EVAL_TAG = 0x5EED  # third seed word: evaluation streams never coincide with the 2-word training streams

Images = np.ndarray | Sequence[np.ndarray] | torch.Tensor


@dataclass(frozen=True)
class ToyJudgeConfig(Config):
    seed: int = field(default=0, metadata={"help": "seed of initialisation and training batches"})
    steps: int = field(default=6000, metadata={"help": "training steps"})
    batch_size: int = field(default=64, metadata={"help": "images per training step"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine decay)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    composition_share: float = field(default=0.5, metadata={"help": "share of style+object images in batches"})
    widths: tuple[int, ...] = field(default=(16, 32, 64, 64), metadata={"help": "channels of the conv stages"})
    groups: int = field(default=8, metadata={"help": "GroupNorm groups; must divide every width"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.steps, self.batch_size, self.groups) <= 0 or self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("steps, batch_size, groups and lr must be positive and warmup_steps non-negative")
        if not 0 <= self.composition_share <= 0.6:
            raise ConfigError(f"composition_share must be in [0, 0.6], got {self.composition_share}")
        if not self.widths or any(w <= 0 or w % self.groups for w in self.widths):
            raise ConfigError(f"widths {self.widths} must be positive multiples of groups={self.groups}")


def _block(c_in: int, c_out: int, stride: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU()]


def to_pixels(images: Images) -> torch.Tensor:
    """Float (B, 3, 32, 32) pixels in [-1, 1] from uint8 (B, H, W, 3) / (H, W, 3) arrays, a list of them, or a tensor.

    A tensor is taken to be float NCHW in [-1, 1] already and is returned detached, as float32, on its device.

    Raises:
        [`~mima.errors.DataError`]: If arrays are not uint8 RGB images.
    """
    if isinstance(images, torch.Tensor):
        return images.detach().float()
    array = np.asarray(images) if isinstance(images, np.ndarray) else np.stack([np.asarray(i) for i in images])
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise DataError(f"expected uint8 images of shape (B, H, W, 3), got {array.dtype} {array.shape}")
    return images_to_tensor(np.ascontiguousarray(array))


class ToyJudge(nn.Module):
    """Conv trunk (one stage per width: a strided conv block and a conv block) + global average pool + two heads.

    Args:
        config (`ToyJudgeConfig`, *optional*):
            Architecture and training settings; defaults to `ToyJudgeConfig()`.
    """

    def __init__(self, config: ToyJudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config or ToyJudgeConfig()
        layers: list[nn.Module] = []
        channels = (3, *self.config.widths)
        for i, (c_in, width) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            layers += _block(c_in, width, 1 if i == 0 else 2, self.config.groups)
            layers += _block(width, width, 1, self.config.groups)
        self.trunk = nn.Sequential(*layers)
        self.style_head = nn.Linear(self.feature_dim, len(STYLE_LABELS))
        self.object_head = nn.Linear(self.feature_dim, len(OBJECT_LABELS))

    @property
    def feature_dim(self) -> int:
        """Size F of [`ToyJudge.features`]."""
        return self.config.widths[-1]

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The (B, F) embedding of float pixels (B, 3, 32, 32) in [-1, 1]; differentiable."""
        return self.trunk(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Style logits (B, 11) and object logits (B, 11) of float pixels (B, 3, 32, 32) in [-1, 1]."""
        feats = self.features(pixels)
        return self.style_head(feats), self.object_head(feats)

    @torch.no_grad()
    def predict(self, images: Images, batch_size: int = 256) -> tuple[list[str], list[str]]:
        """Predicted style names and object names (`"none"` when absent), one per image (see [`to_pixels`])."""
        pixels = to_pixels(images).to(self.style_head.weight.device)
        styles: list[str] = []
        objects: list[str] = []
        for start in range(0, len(pixels), batch_size):
            style_logits, object_logits = self(pixels[start : start + batch_size])
            styles += [STYLE_LABELS[i] for i in style_logits.argmax(dim=1).tolist()]
            objects += [OBJECT_LABELS[i] for i in object_logits.argmax(dim=1).tolist()]
        return styles, objects

    def concept_rate(self, images: Images, concept: str) -> float:
        """Share of `images` whose style head (style concept) or object head (object concept) predicts `concept`.

        Returns 0.0 for an empty batch; raises [`~mima.errors.ConfigError`] for a name that is not a toy concept.
        """
        try:
            family = toy_world.concept_family(concept)
        except KeyError:
            valid = ", ".join(toy_world.STYLES + toy_world.OBJECTS)
            raise ConfigError(f"unknown toy concept {concept!r}; valid concepts: {valid}") from None
        styles, objects = self.predict(images)
        predicted = styles if family == "style" else objects
        return sum(p == concept for p in predicted) / len(predicted) if predicted else 0.0

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write `directory/config.json` and `directory/model.safetensors` atomically; returns `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_json(directory / "config.json")
        save_tensors(directory / "model.safetensors", self.state_dict(), metadata={"format": "mima.toy_judge"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> ToyJudge:
        """Load a judge written by [`ToyJudge.save_pretrained`], in eval mode.

        Raises:
            [`~mima.errors.ModelError`]: If a file is missing or the weights do not match the config.
        """
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise ModelError(f"no toy judge at {directory}: missing {name}")
        judge = cls(ToyJudgeConfig.load_json(directory / "config.json"))
        try:
            judge.load_state_dict(load_tensors(directory / "model.safetensors"))
        except RuntimeError as e:
            detail = " ".join(str(e).split()[6:])  # drop "Error(s) in loading state_dict for ToyJudge:"
            raise ModelError(f"toy judge weights in {directory} do not match its config: {detail}") from None
        return judge.eval().requires_grad_(False)


def default_judge_dir() -> Path:
    """The folder of the shipped judge, `mima/assets/toy-judge`."""
    return Path(str(importlib.resources.files("mima") / "assets" / "toy-judge"))


def load_default_judge() -> ToyJudge:
    """The shipped judge (see [`default_judge_dir`])."""
    return ToyJudge.from_pretrained(default_judge_dir())


def _label_tensors(labels: Sequence[tuple[str | None, str | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    styles = [STYLE_LABELS.index(s or "none") for s, _ in labels]
    objects = [OBJECT_LABELS.index(o or "none") for _, o in labels]
    return torch.tensor(styles), torch.tensor(objects)


def train_judge(cfg: ToyJudgeConfig, out_dir: str | os.PathLike[str]) -> ToyJudge:
    """Train a judge on fresh toy-world batches of all 20 concepts and save it to `out_dir`.

    Batch `step` is drawn from `np.random.default_rng(np.random.SeedSequence([cfg.seed, step]))`; the loss is the sum
    of the cross-entropies of both heads.

    Raises:
        [`~mima.errors.TrainingError`]: On a non-finite loss.
    """
    torch.manual_seed(cfg.seed)
    judge = ToyJudge(cfg).train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started = time.time()
    with tqdm(range(cfg.steps), desc="train toy judge") as bar:
        for step in bar:
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, step]))
            images, _, labels = toy_world.sample_training_batch(
                cfg.batch_size, rng, include_held_out=True, composition_share=cfg.composition_share
            )
            logits, targets = judge(images_to_tensor(images)), _label_tensors(labels)
            loss = torch.stack([nn.functional.cross_entropy(x, y) for x, y in zip(logits, targets, strict=True)]).sum()
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite toy judge loss {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval().requires_grad_(False)
    judge.save_pretrained(out_dir)
    tqdm.write(f"trained toy judge in {time.time() - started:.0f} s -> {out_dir}")
    return judge


def evaluate_judge(judge: ToyJudge, n_per_concept: int = 200, seed: int = 12345) -> dict[str, float]:
    """Accuracy of `judge` on fresh generator samples, from seed streams that training never uses.

    An image counts as right when both heads are: a style painting must read `(style, "none")`, an object photo
    `("none", object)`. Compositions cycle through all 100 (style, object) pairs, `10 * n_per_concept` images.

    Returns:
        `dict[str, float]`: Accuracy per concept (styles, then objects) and under `"compositions"`.
    """
    groups: dict[str, list[tuple[str | None, str | None]]] = {s: [(s, None)] * n_per_concept for s in toy_world.STYLES}
    groups |= {o: [(None, o)] * n_per_concept for o in toy_world.OBJECTS}
    pairs = [(s, o) for o in toy_world.OBJECTS for s in toy_world.STYLES]
    groups["compositions"] = [pairs[i % len(pairs)] for i in range(10 * n_per_concept)]
    results: dict[str, float] = {}
    for index, (name, labels) in enumerate(groups.items()):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _EVAL_TAG, index]))
        images = np.stack([toy_world.render(s, o, rng) for s, o in labels])
        styles, objects = judge.predict(images)
        truth = [(s or "none", o or "none") for s, o in labels]
        results[name] = sum(p == t for p, t in zip(zip(styles, objects, strict=True), truth, strict=True)) / len(truth)
    return results
