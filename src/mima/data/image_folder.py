"""Image folders on disk: image files plus an optional `metadata.csv` of prompts.

The layout is the Hugging Face `imagefolder` one, so a folder written here loads with
`datasets.load_dataset("imagefolder", data_dir=...)` and attack scripts that expect it:

```
out_dir/
  00000.png
  00001.png
  metadata.csv      # file_name,prompt
```
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mima.errors import DataError
from mima.utils.io import atomic_write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.csv"
_COLUMNS = ("file_name", "prompt")


def write_image_folder(
    images: Sequence[np.ndarray | Image.Image], prompts: Sequence[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Write images as `00000.png`, `00001.png`, ... and their prompts as `metadata.csv` (`file_name,prompt`).

    Existing files of the same names are replaced; `metadata.csv` is written last, atomically.

    Args:
        images (`Sequence[np.ndarray | PIL.Image.Image]`):
            uint8 arrays (H, W, 3) or PIL images.
        prompts (`Sequence[str]`):
            One prompt per image.
        out_dir (`str` or `os.PathLike`):
            Destination folder, created with its parents if needed.

    Returns:
        `Path`: `out_dir`.

    Raises:
        [`~mima.errors.DataError`]: If the counts differ or an array is not uint8 (H, W, 3).
    """
    if len(images) != len(prompts):
        raise DataError(f"got {len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = f"{i:05d}.png"
        _to_pil(image, i).save(out_dir / name)
        writer.writerow((name, prompt))
    atomic_write_text(out_dir / METADATA_FILE, buffer.getvalue())
    return out_dir


def read_image_folder(folder: str | os.PathLike[str]) -> tuple[list[Image.Image], list[str | None]]:
    """Read every image of a folder, verified and decoded to RGB ([`to_rgb`]), with its prompt.

    With a `metadata.csv`, its rows give the files and prompts, in order. Without one, every image file at the top
    level (png, jpg, jpeg, webp, bmp) is read in name order, with prompt `None`.

    Args:
        folder (`str` or `os.PathLike`):
            The image folder.

    Returns:
        `tuple[list[PIL.Image.Image], list[str | None]]`: RGB images and their prompts.

    Raises:
        [`~mima.errors.DataError`]: If the folder is missing or holds no image, `metadata.csv` is malformed or names a
            missing file, or an image does not decode; the message names the folder or file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"image folder '{folder}' {problem}")
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        files, prompts = _read_metadata(metadata)
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        prompts = [None] * len(files)
    if not files:
        raise DataError(f"image folder '{folder}' holds no images (expected {', '.join(IMAGE_EXTENSIONS)} files)")
    return [_load_image(path) for path in files], prompts


def _to_pil(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(f"image {index} is {array.dtype} {array.shape}; expected a uint8 array (H, W, 3)")
    return Image.fromarray(array)


def _read_metadata(metadata: Path) -> tuple[list[Path], list[str | None]]:
    try:
        with metadata.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                expected = ",".join(_COLUMNS)
                raise DataError(f"'{metadata}' lacks column(s) {', '.join(missing)}; expected header '{expected}'")
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse '{metadata}': {e}") from e
    files, prompts = [], []
    for line, row in rows:
        name = row["file_name"] or ""
        path = metadata.parent / name
        if not name or not path.is_file():
            raise DataError(f"'{metadata}' line {line}: image file '{name}' not found in '{metadata.parent}'")
        files.append(path)
        prompts.append(row["prompt"] or "")
    return files, prompts


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode Pillow opens as 8-bit RGB, as an image viewer shows it.

    - 16-bit integer grey (`I;16*`, and `I`, which older Pillows give 16-bit PNGs): 0..65535 scaled to 0..255;
    - 32-bit float grey (`F`): 0..1 scaled to 0..255;
    - transparency (an alpha band, or a palette's or grey image's transparent colour): composited on white;
    - every other mode (`1`, `L`, `P`, `CMYK`, `YCbCr`, `LAB`, `HSV`, ...): Pillow's own conversion.

    The EXIF orientation, if any, is applied.

    Args:
        image (`PIL.Image.Image`):
            An opened image.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257)
    if image.mode == "F":
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) * 255)
    if {"A", "a"} & set(image.getbands()) or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def _load_image(path: Path) -> Image.Image:
    try:
        # verify() checks the file's structure (e.g. PNG checksums) but leaves the image unusable: reopen to decode.
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot decode image '{path}': {reason}") from e
