"""CLIP and DINO image encoders through transformers, from a local folder or a hub id (the paper's encoders).

Preprocessing uses the model's own image processor with the PIL backend (no torchvision needed).
"""

from __future__ import annotations

import hashlib
import os
from abc import abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from mima.errors import ConfigError, ModelError
from mima.evaluate.encoders import ImageEncoder

_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError)


class _TransformersEncoder(ImageEncoder):
    model_class: ClassVar[str]

    def __init__(self, model: str | None = None) -> None:
        if not model:
            raise ConfigError(f"encoder '{self.name}' needs a model: '{self.name}:<local folder or hub id>'")
        model = os.path.expanduser(model)
        super().__init__(model)
        if model.startswith(("/", "./", "../")) and not Path(model).exists():
            raise ModelError(f"cannot load {self.name} encoder: model folder '{model}' does not exist")
        import transformers

        try:
            self.processor = transformers.AutoImageProcessor.from_pretrained(model, backend="pil")
            self.network = getattr(transformers, self.model_class).from_pretrained(model)
        except _LOAD_ERRORS as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"cannot load {self.name} encoder from '{model}': {detail}") from e
        self.network.eval().requires_grad_(False)

    def fingerprint(self) -> str:
        """The model id, plus for a local folder its config and the names and sizes of its files."""
        folder = Path(self.model or "")
        if not folder.is_dir():
            return self.model or ""
        files = sorted(f"{p.name}:{p.stat().st_size}" for p in folder.iterdir() if p.is_file())
        config = (folder / "config.json").read_text(encoding="utf-8") if (folder / "config.json").is_file() else ""
        return hashlib.sha256("\n".join([str(folder.resolve()), config, *files]).encode()).hexdigest()

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        return self.forward(pixels.to(self.device, self.network.dtype))

    @abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features (n, F) of preprocessed pixels (n, 3, H, W)."""


class ClipEncoder(_TransformersEncoder):
    """CLIP image embeddings (`CLIPVisionModelWithProjection.image_embeds`), as in IMMA and MIMA.

    Args:
        model (`str`):
            A local folder or hub id holding a CLIP model (full or vision-only) and its image processor.
    """

    name = "clip"
    model_class = "CLIPVisionModelWithProjection"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=pixels).image_embeds  # (n, projection_dim)


class DinoEncoder(_TransformersEncoder):
    """DINO / DINOv2 ViT features: the final CLS token (`last_hidden_state[:, 0]`), as in IMMA and MIMA.

    Args:
        model (`str`):
            A local folder or hub id holding a ViT or DINOv2 model loadable by `AutoModel`, and its image processor.
    """

    name = "dino"
    model_class = "AutoModel"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network(pixel_values=pixels).last_hidden_state[:, 0]  # (n, hidden_size)
