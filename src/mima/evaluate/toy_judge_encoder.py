"""The toy judge as an image encoder: penultimate features for S(G, R), and its heads for the attack-success rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mima.evaluate.encoders import ImageEncoder
from mima.toy import world as toy_world
from mima.toy.judge import (
    OBJECT_LABELS,
    STYLE_LABELS,
    ToyJudge,
    default_judge_dir,
    load_default_judge,
    to_pixels,
)
from mima.utils.io import hash_file


class ToyJudgeEncoder(ImageEncoder):
    """The toy judge's penultimate (pooled conv) features; as a classifier it names each image's style and object.

    Images that are not 32x32 are resized with Pillow bicubic. [`~ImageEncoder.classify`] returns (n, 2) indices into
    `STYLE_LABELS` and `OBJECT_LABELS`; the attack-success rate of a toy concept is the share of images whose style
    head (style concept) or object head (object concept) predicts it, as [`ToyJudge.concept_rate`] does.

    Args:
        model (`str`, *optional*):
            A folder written by `ToyJudge.save_pretrained`; defaults to the shipped judge.
    """

    name = "toy-judge"
    classifies = True
    batch_size = 256

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.judge = ToyJudge.from_pretrained(model) if model else load_default_judge()
        self._folder = Path(model) if model else default_judge_dir()

    def fingerprint(self) -> str:
        return hash_file(self._folder / "model.safetensors")

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        size = (toy_world.RESOLUTION, toy_world.RESOLUTION)
        rgb = [image.convert("RGB") for image in images]
        resized = [image if image.size == size else image.resize(size, Image.BICUBIC) for image in rgb]
        pixels = to_pixels(np.stack([np.asarray(image) for image in resized]))  # (n, 3, 32, 32) in [-1, 1]
        return pixels.to(self.device)

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        return self.judge.features(self._pixels(images))

    def predict_labels(self, images: list[Image.Image]) -> torch.Tensor:
        style_logits, object_logits = self.judge(self._pixels(images))
        return torch.stack([style_logits.argmax(dim=1), object_logits.argmax(dim=1)], dim=1)  # (n, 2)

    def success_rate(self, labels: torch.Tensor, concept: str) -> float | None:
        try:
            family = toy_world.concept_family(concept)
        except KeyError:
            return None
        column, index = (0, STYLE_LABELS.index(concept)) if family == "style" else (1, OBJECT_LABELS.index(concept))
        return (labels[:, column] == index).float().mean().item() if len(labels) else 0.0
