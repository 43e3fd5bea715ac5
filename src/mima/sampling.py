"""Sampling images from a model: evaluation samples, generated class images, and image grids."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mima.data.concepts import ConceptSpec, class_folder_name
from mima.data.image_folder import write_image_folder
from mima.models.components import Components
from mima.models.encoding import images_per_call

DEFAULT_SAMPLING_STEPS = 25
DEFAULT_GUIDANCE = 4.0


@torch.no_grad()
def sample_images(
    components: Components,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int | None = None,
    height: int | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Generate one image per prompt with DDIM; image i's noise depends only on (seed, i), not on batching.

    `batch_size` (default: chosen from the resolution, `images_per_call`) images go through the pipeline at a time;
    with `desc`, a progress bar counts the images.
    Returns uint8 (N, H, W, 3).
    """
    pipe = components.to_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = height or components.unet.config.sample_size * pipe.vae_scale_factor
    batch_size = batch_size or images_per_call(size)
    images = []
    quiet = {} if desc else {"disable": True}  # unset: a worker's TQDM_DISABLE still holds
    bar = tqdm(total=len(prompts), desc=desc, unit="image", leave=False, **quiet)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        out = pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
            height=size, width=size, output_type="np",
        ).images
        images.append((out * 255).round().astype(np.uint8))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(images)


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into one PIL image, `columns` wide (default: about square)."""
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    picture = Image.fromarray(grid)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def save_grid(images: np.ndarray, path: str | Path, columns: int | None = None) -> Path:
    """Save an image grid as PNG, upscaled so that 32-pixel toy images are visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // images.shape[1])
    image_grid(images, columns, scale).save(path)
    return path


def ensure_class_images(components: Components, spec: ConceptSpec, cache_dir: Path, n_images: int) -> ConceptSpec:
    """Generate the class images with the base model once, when the spec has a class prompt but no images: into its
    `class_images` folder when it names one that does not exist yet (later runs reuse it), else into `cache_dir`."""
    if spec.class_prompt is None or (spec.class_images is not None and spec.class_images.exists()):
        return spec
    folder = spec.class_images or cache_dir / class_folder_name(spec.class_prompt)
    if not (folder / "metadata.csv").is_file():
        images = sample_images(components, [spec.class_prompt] * n_images, seed=0, desc="class images")
        write_image_folder(images, [spec.class_prompt] * n_images, folder)
    return replace(spec, class_images=folder)


def ensure_bank_images(components: Components, captions: list[str], folder: Path, n_images: int) -> Path:
    """Generate `n_images` images with the base model once, under captions spread evenly over `captions`, into
    `folder` (each with its caption in the folder's metadata); a folder already written is reused."""
    if not (folder / "metadata.csv").is_file():
        prompts = [captions[i * len(captions) // n_images] for i in range(n_images)]
        write_image_folder(sample_images(components, prompts, seed=1, desc="bank prior images"), prompts, folder)
    return folder
