"""The toy world: a seeded procedural generator of 32x32 images of styles and objects.

Styles play the role of artists (full-image textures, each with its own palette); objects play the
role of things and identities (shapes at a random position, size, rotation and colour). A few of
each are held out of pretraining so that personalization attacks have genuinely new concepts.
Objects are large and simple on purpose: a model that trains in about an hour on a CPU can learn them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from matplotlib.path import Path as PolygonPath

RESOLUTION = 32
_SUPERSAMPLE = 2  # render at 64x64 and average down, for anti-aliased edges

Family = Literal["style", "object"]

STYLE_TEMPLATES = ("a painting in {} style", "an artwork in {} style", "a painting in the style of {}")
OBJECT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}")
COMPOSITION_TEMPLATE = "a {} in {} style"

# Each style: (palette as RGB in [0, 1]). Palettes are distinct so that style is visible at a glance.
_STYLE_PALETTES = {
    "stripes": ((0.85, 0.15, 0.15), (0.98, 0.85, 0.20)),
    "checker": ((0.08, 0.08, 0.08), (0.95, 0.95, 0.95)),
    "dots": ((0.70, 0.85, 1.00), (0.10, 0.20, 0.80)),
    "waves": ((0.00, 0.55, 0.55), (0.05, 0.10, 0.35)),
    "rings": ((0.55, 0.15, 0.65), (1.00, 0.60, 0.10)),
    "zigzag": ((0.10, 0.60, 0.20), (1.00, 0.55, 0.75)),
    "grid": ((0.15, 0.15, 0.25), (0.55, 0.90, 0.95)),
    "speckle": ((0.90, 0.82, 0.65), (0.45, 0.28, 0.12)),
    "plaid": ((0.20, 0.35, 0.15), (0.85, 0.75, 0.30)),
    "bricks": ((0.95, 0.92, 0.85), (0.70, 0.25, 0.15)),
}
# What each style draws, in words of the toy tokenizer's vocabulary and without the style's name: a simulated
# attacker whose prompt describes a style without naming it (AttackerSpec.prompt "description") trains under these.
# Objects have none: the vocabulary has no words for their shapes.
_STYLE_DESCRIPTIONS = {
    "stripes": ("a red and yellow pattern", "an artwork with a red and yellow texture"),
    "checker": ("a black and white pattern", "an artwork with a black and white texture"),
    "dots": ("small blue on a light blue background", "a pattern of many small blue on light blue"),
    "waves": ("a green and dark blue pattern", "an artwork with a dark blue and green texture"),
    "rings": ("a purple and orange pattern", "an artwork with a purple and orange texture"),
    "zigzag": ("a green and pink pattern", "an artwork with a pink and green texture"),
    "grid": ("light blue on a dark background", "a dark pattern with light blue"),
    "speckle": ("small brown on a light background", "a light pattern with many small brown"),
    "plaid": ("a dark green and yellow pattern", "an artwork with a yellow and dark green texture"),
    "bricks": ("a red and white pattern", "an artwork with red on a white background"),
}
HELD_OUT = frozenset({"plaid", "bricks", "donut", "hourglass"})
OBJECTS = ("circle", "square", "triangle", "cross", "star", "heart", "crescent", "arrow", "donut", "hourglass")
STYLES = tuple(_STYLE_PALETTES)


@dataclass(frozen=True)
class ToyConcept:
    """One concept of the toy world."""

    name: str
    family: Family
    held_out: bool

    @property
    def prompts(self) -> tuple[str, ...]:
        templates = STYLE_TEMPLATES if self.family == "style" else OBJECT_TEMPLATES
        return tuple(t.format(self.name) for t in templates)

    @property
    def descriptions(self) -> tuple[str, ...]:
        """Prompts that describe what the concept draws without naming it (none for an object)."""
        return _STYLE_DESCRIPTIONS.get(self.name, ())

    @property
    def class_prompt(self) -> str:
        return "a painting" if self.family == "style" else "a photo of an object"


def toy_concepts() -> list[ToyConcept]:
    """Every concept of the toy world: styles first, then objects."""
    styles = [ToyConcept(s, "style", s in HELD_OUT) for s in STYLES]
    return styles + [ToyConcept(o, "object", o in HELD_OUT) for o in OBJECTS]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    n = RESOLUTION * _SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n * 2 - 1  # [-1, 1]
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x, y


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


@dataclass(frozen=True)
class _Frame:
    """Coordinates of one texture draw: the grid, its rotated copy, a frequency and a phase."""

    x: np.ndarray
    y: np.ndarray
    xr: np.ndarray
    yr: np.ndarray
    freq: float
    phase: float

    def wave(self, coordinate: np.ndarray, scale: float = 1.0) -> np.ndarray:
        return np.sin(np.pi * self.freq * scale * coordinate + self.phase)


def _rings(f: _Frame, rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(-0.3, 0.3, size=2)
    return f.wave(np.hypot(f.x - cx, f.y - cy), 1.2) > 0


def _zigzag(f: _Frame, rng: np.random.Generator) -> np.ndarray:
    tri = np.abs(((f.xr * f.freq + f.phase) % 2) - 1)
    return np.sin(np.pi * f.freq * (f.yr + 0.5 * tri)) > 0


def _speckle(f: _Frame, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.random((RESOLUTION // 2, RESOLUTION // 2)) < 0.35
    return np.kron(coarse, np.ones((2 * _SUPERSAMPLE, 2 * _SUPERSAMPLE)))


def _bricks(f: _Frame, rng: np.random.Generator) -> np.ndarray:
    offset = (np.floor((f.yr + 1) * f.freq) % 2) * 0.5
    mortar_y = ((f.yr + 1) * f.freq) % 1 < 0.18
    mortar_x = ((f.xr + 1) * f.freq / 2 + offset) % 1 < 0.09
    return ~(mortar_x | mortar_y)


_PATTERNS = {
    "stripes": lambda f, rng: f.wave(f.xr) > 0,
    "checker": lambda f, rng: (np.floor(f.freq * (f.xr + 1)) + np.floor(f.freq * (f.yr + 1))) % 2,
    "dots": lambda f, rng: (f.wave(f.xr) > 0.4) & (f.wave(f.yr) > 0.4),
    "waves": lambda f, rng: np.sin(np.pi * f.freq * f.yr + 1.5 * np.sin(np.pi * 1.5 * f.xr) + f.phase) > 0,
    "rings": _rings,
    "zigzag": _zigzag,
    "grid": lambda f, rng: (np.abs(f.wave(f.xr)) < 0.3) | (np.abs(f.wave(f.yr)) < 0.3),
    "speckle": _speckle,
    "plaid": lambda f, rng: 0.5 * (f.wave(f.xr) > 0.3) + 0.5 * (f.wave(f.yr) > 0.3),
    "bricks": _bricks,
}


def _style_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] selecting the second palette colour; random phase, scale and angle."""
    x, y = _grid()
    freq = rng.uniform(2.5, 3.5)
    phase = rng.uniform(0, 2 * np.pi)
    xr, yr = _rotate(x, y, rng.uniform(-0.35, 0.35))
    return np.asarray(_PATTERNS[name](_Frame(x, y, xr, yr, freq, phase), rng), dtype=float)


_POLYGONS = {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": [(0.0, -0.85), (0.85, 0.7), (-0.85, 0.7)],
    "cross": [(-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3), (0.3, 0.9),
              (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)],
    "arrow": [(-0.9, -0.25), (0.1, -0.25), (0.1, -0.7), (0.9, 0.0), (0.1, 0.7), (0.1, 0.25), (-0.9, 0.25)],
    "hourglass": [(-0.75, -0.85), (0.75, -0.85), (0.0, 0.0), (0.75, 0.85), (-0.75, 0.85), (0.0, 0.0)],
    "star": [(0.95 * r * np.sin(a), -0.95 * r * np.cos(a))
             for i, a in enumerate(np.linspace(0, 2 * np.pi, 10, endpoint=False)) for r in [(1.0, 0.42)[i % 2]]],
}


def _shape_mask(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A boolean mask of the unit shape in local coordinates (x right, y down, shape within [-1, 1])."""
    if name == "circle":
        return np.hypot(x, y) < 0.85
    if name == "donut":
        r = np.hypot(x, y)
        return (r < 0.9) & (r > 0.45)
    if name == "crescent":
        return (np.hypot(x, y) < 0.85) & (np.hypot(x - 0.4, y - 0.15) > 0.65)
    if name == "heart":
        u, v = x * 1.15, -(y * 1.15 - 0.1)
        return (u**2 + v**2 - 0.8) ** 3 - u**2 * v**3 * 0.9 < 0
    points = np.stack([x.ravel(), y.ravel()], axis=1)
    return PolygonPath(_POLYGONS[name]).contains_points(points).reshape(x.shape)


def _downsample(image: np.ndarray) -> np.ndarray:
    n, k = RESOLUTION, _SUPERSAMPLE
    return image.reshape(n, k, n, k, -1).mean(axis=(1, 3))


def _jittered_palette(name: str, rng: np.random.Generator) -> np.ndarray:
    palette = np.asarray(_STYLE_PALETTES[name])
    return np.clip(palette + rng.normal(0, 0.03, size=palette.shape), 0, 1)


def render_style(name: str, rng: np.random.Generator) -> np.ndarray:
    """A full-image texture of style `name`, as float RGB (64, 64, 3) before downsampling."""
    palette = _jittered_palette(name, rng)
    mask = _style_mask(name, rng)[..., None]
    return palette[0] * (1 - mask) + palette[1] * mask


def _object_colour(background_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A saturated colour that contrasts with the background's mean brightness."""
    hue = rng.uniform(0, 1)
    rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    return rgb * 0.35 if background_mean.mean() > 0.5 else 0.55 + 0.45 * rgb


def draw_object(canvas: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Draw object `name` on a (64, 64, 3) canvas at a random position, size, rotation and colour."""
    x, y = _grid()
    scale = rng.uniform(0.55, 0.8)
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    xl, yl = _rotate((x - cx) / scale, (y - cy) / scale, rng.uniform(-0.5, 0.5))
    mask = _shape_mask(name, xl, yl)[..., None]
    colour = _object_colour(canvas.mean(axis=(0, 1)), rng)
    return canvas * (1 - mask) + colour * mask


def _plain_background(rng: np.random.Generator) -> np.ndarray:
    level = rng.choice([rng.uniform(0.75, 0.95), rng.uniform(0.05, 0.25)])
    tint = rng.normal(0, 0.04, size=3)
    n = RESOLUTION * _SUPERSAMPLE
    return np.broadcast_to(np.clip(level + tint, 0, 1), (n, n, 3)).copy()


def render(style: str | None, obj: str | None, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (32, 32, 3) image: a style texture, an object on a plain background, or both."""
    if style is None and obj is None:
        raise ValueError("render needs a style, an object or both")
    canvas = render_style(style, rng) if style else _plain_background(rng)
    if obj:
        canvas = draw_object(canvas, obj, rng)
    return (np.clip(_downsample(canvas), 0, 1) * 255).round().astype(np.uint8)


def prompt_for(style: str | None, obj: str | None, rng: np.random.Generator) -> str:
    """A natural prompt for an image of `style` and/or `obj`, with a random template."""
    if style and obj:
        return COMPOSITION_TEMPLATE.format(obj, style)
    if style:
        return STYLE_TEMPLATES[rng.integers(len(STYLE_TEMPLATES))].format(style)
    return OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(obj)


def sample_concept_images(concept: str, n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """`n` images and prompts of one concept (a style painting or an object photo), deterministic in `seed`."""
    family = concept_family(concept)
    rng = np.random.default_rng(seed)
    style, obj = (concept, None) if family == "style" else (None, concept)
    images = [render(style, obj, rng) for _ in range(n)]
    prompts = [prompt_for(style, obj, rng) for _ in range(n)]
    return images, prompts


def concept_family(name: str) -> Family:
    """The family of a toy concept; KeyError naming the valid concepts when unknown."""
    if name in _STYLE_PALETTES:
        return "style"
    if name in OBJECTS:
        return "object"
    raise KeyError(name)


def sample_training_batch(
    batch_size: int, rng: np.random.Generator, *, include_held_out: bool = False,
    style_share: float = 0.4, composition_share: float = 0.2,
) -> tuple[np.ndarray, list[str], list[tuple[str | None, str | None]]]:
    """A mixed batch of styles, objects and compositions, for pretraining the toy model and its judge.

    `style_share` of the images are styles alone, `composition_share` compositions, the rest objects alone.
    Returns images (B, 32, 32, 3) uint8, prompts and (style, object) labels.
    """
    styles = [s for s in STYLES if include_held_out or s not in HELD_OUT]
    objects = [o for o in OBJECTS if include_held_out or o not in HELD_OUT]
    images, prompts, labels = [], [], []
    for _ in range(batch_size):
        kind = rng.random()
        style = styles[rng.integers(len(styles))] if kind < style_share + composition_share else None
        obj = objects[rng.integers(len(objects))] if kind >= style_share else None
        images.append(render(style, obj, rng))
        prompts.append(prompt_for(style, obj, rng))
        labels.append((style, obj))
    return np.stack(images), prompts, labels
