"""On-disk cache of image features keyed by image content, so that re-evaluating encodes nothing twice."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from PIL import Image
from safetensors import SafetensorError

from mima.evaluate.encoders import ImageEncoder
from mima.utils.io import load_tensor_metadata, load_tensors, save_tensors

CACHE_DIR = ".feature_cache"
_LABELS = ".labels"


def image_key(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and decoded pixels: equal images share a key whatever their file encoding."""
    digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def cache_file(folder: str | os.PathLike[str], cache_id: str) -> Path:
    """Where [`FeatureCache`] keeps the features of the images under `folder` for the encoder `cache_id`."""
    return Path(folder) / CACHE_DIR / f"{cache_id}.safetensors"


class FeatureCache:
    """One encoder's features (and class labels, for classifier encoders) of the images under one folder.

    Stored as `<folder>/.feature_cache/<encoder.cache_id>.safetensors`, one float32 tensor (F,) per image named by
    [`image_key`], plus an int64 tensor (K,) named `<key>.labels` when the encoder classifies. A cache written with
    other weights ([`ImageEncoder.fingerprint`]) is ignored and replaced. Use it as a context manager: new entries are
    written when the block exits without an error. A cache that cannot be read or written (e.g. a read-only reference
    folder) only costs recomputation and a warning.

    Args:
        folder (`str` or `os.PathLike`):
            The folder the cache belongs to, e.g. an attack run or a reference image folder.
        encoder (`ImageEncoder`):
            The encoder whose outputs are cached.
    """

    def __init__(self, folder: str | os.PathLike[str], encoder: ImageEncoder) -> None:
        self.encoder = encoder
        self.path = cache_file(folder, encoder.cache_id)
        self._metadata = {"encoder": encoder.cache_id, "weights": encoder.fingerprint()}
        self._tensors = self._load()
        self._new = 0

    def _load(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            return {}
        try:
            if load_tensor_metadata(self.path) != self._metadata:
                return {}
            return load_tensors(self.path)
        except (OSError, SafetensorError) as e:
            warnings.warn(f"ignoring unreadable feature cache '{self.path}': {e}", stacklevel=3)
            return {}

    def encode(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (n, F) of `images` and, for classifier encoders, labels (n, K); only uncached images are encoded.

        Args:
            images (`Sequence[PIL.Image.Image]`):
                The images, in order.
        """
        keys = [image_key(image) for image in images]
        missing = {key: image for key, image in zip(keys, images, strict=True) if key not in self._tensors}
        if missing:
            todo = list(missing.values())
            # Rows are cloned: safetensors refuses tensors that share storage.
            self._tensors.update(zip(missing, (row.clone() for row in self.encoder.embed(todo)), strict=True))
            if self.encoder.classifies:
                labels = (row.clone() for row in self.encoder.classify(todo))
                self._tensors.update(zip((key + _LABELS for key in missing), labels, strict=True))
            self._new += len(missing)
        feats = torch.stack([self._tensors[key] for key in keys])  # (n, F)
        labels = torch.stack([self._tensors[key + _LABELS] for key in keys]) if self.encoder.classifies else None
        return feats, labels

    def save(self) -> None:
        """Write the cache if it gained entries; a failure is a warning, not an error."""
        if not self._new:
            return
        try:
            save_tensors(self.path, self._tensors, metadata=self._metadata)
            self._new = 0
        except OSError as e:
            warnings.warn(f"cannot write feature cache '{self.path}': {e}", stacklevel=2)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.save()
