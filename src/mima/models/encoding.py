"""Concept images and prompts encoded once (frozen VAE and text encoder), then batched for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mima.data.concepts import ConceptSpec
from mima.data.image_folder import read_image_folder
from mima.models.components import Components


@dataclass
class Batch:
    """Latents (B, C, h, w), their text conditioning (B, T, d), optional prior-preservation pair, the prompts the
    conditioning encodes and the index of each image in its concept (both empty where unknown): a simulated attacker
    that rewrites the prompts re-encodes them, one that describes the concept picks each image's description."""

    latents: torch.Tensor
    hidden: torch.Tensor
    prior: tuple[torch.Tensor, torch.Tensor] | None = None
    prompts: list[str] = field(default_factory=list)
    images: list[int] = field(default_factory=list)


@dataclass
class EncodedImages:
    """VAE posterior (mean, std) and prompt hidden states of a set of images."""

    mean: torch.Tensor  # (n, C, h, w), already scaled
    std: torch.Tensor  # (n, C, h, w)
    hidden: torch.Tensor  # (n, T, d)
    prompts: list[str] = field(default_factory=list)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """A random batch on the device of the encodings: latents drawn from the posterior, their hidden states
        and prompts. The draws use `generator` where it lives (the CPU, see `step_generator`) and then move."""
        return self.sample_indexed(batch_size, generator)[:3]

    def sample_indexed(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
        """`sample`, with the index of each image drawn."""
        index = torch.randint(0, self.mean.shape[0], (batch_size,), generator=generator)
        noise = torch.randn(self.mean[index].shape, generator=generator).to(self.mean.device)
        prompts = [self.prompts[i] for i in index] if self.prompts else []
        images, index = index.tolist(), index.to(self.mean.device)
        return self.mean[index] + self.std[index] * noise, self.hidden[index], prompts, images


@dataclass
class EncodedConcept:
    name: str
    instance: EncodedImages
    prior: EncodedImages | None

    def batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        latents, hidden, prompts, images = self.instance.sample_indexed(batch_size, generator)
        prior = self.prior.sample(batch_size, generator)[:2] if self.prior is not None else None
        return Batch(latents, hidden, prior, prompts, images)


# Pixels per VAE or sampling call: 8 images at 512 px (SD 1.x on a GPU), 32 toy images of 32 px, 2 at SDXL's size.
PIXELS_PER_CALL = 8 * 512 * 512
MAX_IMAGES_PER_CALL = 32


def model_resolution(components: Components) -> int:
    return components.unet.config.sample_size * 2 ** (len(components.vae.config.block_out_channels) - 1)


def images_per_call(resolution: int) -> int:
    """How many images of `resolution` pixels a side one VAE or sampling call takes (1 to 32)."""
    return max(1, min(MAX_IMAGES_PER_CALL, PIXELS_PER_CALL // (resolution * resolution)))


def to_pixels(images: list[Image.Image | np.ndarray], resolution: int) -> torch.Tensor:
    """Center-crop to square, resize, and scale to [-1, 1]: (n, 3, resolution, resolution)."""
    arrays = []
    for image in images:
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        arrays.append(np.asarray(image))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode_folder(components: Components, folder: Path, default_prompt: str) -> EncodedImages:
    """Encode every image of `folder` with its metadata prompt (or `default_prompt`); the encodings stay on the
    model's device, where training batches are drawn from them."""
    images, prompts = read_image_folder(folder)
    resolution = model_resolution(components)
    means, stds = [], []
    for start in range(0, len(images), images_per_call(resolution)):
        pixels = to_pixels(images[start : start + images_per_call(resolution)], resolution)
        posterior = components.vae.encode(pixels.to(components.vae.device, components.vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    scale = components.vae.config.scaling_factor
    prompts = [p or default_prompt for p in prompts]
    hidden = components.encode_prompts(prompts)
    return EncodedImages(torch.cat(means) * scale, torch.cat(stds) * scale, hidden.float(), prompts)


def encode_concept(components: Components, spec: ConceptSpec, *, with_prior: bool) -> EncodedConcept:
    """Encode a materialized concept (and its class images when `with_prior`)."""
    instance = encode_folder(components, spec.images, spec.prompt)
    prior = None
    if with_prior and spec.class_images is not None:
        prior = encode_folder(components, spec.class_images, spec.class_prompt or "")
    return EncodedConcept(spec.name, instance, prior)
