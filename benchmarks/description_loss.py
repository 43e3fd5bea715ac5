"""How much a model's conditioning tells it about each toy style's images: the diffusion loss of 32 images per style
(fixed noise and timesteps, 4 repeats) under the style's own prompts, its own descriptions, the other styles'
descriptions and the empty prompt; means over the targets (stripes, checker, dots) and over the other styles.

    python benchmarks/description_loss.py [MODEL]    (default: the embedded toy model)
"""

from __future__ import annotations

import sys

import torch

from mima.losses import diffusion_loss
from mima.models.components import Components, toy_model_dir
from mima.models.encoding import model_resolution, to_pixels
from mima.toy import world

TARGETS = ("stripes", "checker", "dots")
COLUMNS = ("own prompts", "own descriptions", "others' descriptions", "empty")


@torch.no_grad()
def _loss(components: Components, latents: torch.Tensor, texts: list[str]) -> float:
    hidden = components.encode_prompts([texts[i % len(texts)] for i in range(len(latents))])
    unet = components.unet
    call = lambda noisy, t, h: unet(noisy, t, encoder_hidden_states=h).sample  # noqa: E731
    losses = [diffusion_loss(call, components.scheduler, latents, hidden, generator=torch.Generator().manual_seed(r))
              for r in range(100, 104)]
    return sum(loss.item() for loss in losses) / len(losses)


def _print(label: str, values: list[float]) -> None:
    print(f"{label:8s} " + "  ".join(f"{c} {v:.4f}" for c, v in zip(COLUMNS, values, strict=True)), flush=True)


def main() -> None:
    components = Components.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else toy_model_dir())
    styles = [c for c in world.toy_concepts() if c.family == "style"]
    rows = {}
    for concept in styles:
        images, prompts = world.sample_concept_images(concept.name, 32, seed=1)
        with torch.no_grad():
            posterior = components.vae.encode(to_pixels(images, model_resolution(components))).latent_dist
        latents = posterior.mean * components.vae.config.scaling_factor
        others = [d for other in styles if other.name != concept.name for d in other.descriptions]
        rows[concept.name] = [_loss(components, latents, texts)
                              for texts in (prompts, list(concept.descriptions), others, [""])]
        _print(concept.name, rows[concept.name])
    for label, names in (("targets", TARGETS), ("others", [s.name for s in styles if s.name not in TARGETS])):
        means = [sum(rows[n][k] for n in names) / len(names) for k in range(len(COLUMNS))]
        _print(label, means)


if __name__ == "__main__":
    main()
