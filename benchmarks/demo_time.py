"""Estimate `mima demo`'s time from its pieces, measured in one process (no 28-minute run needed).

The demo (src/mima/assets/presets/toy-demo.yaml) immunizes with imma, imma-joint and mima (40 outer steps each,
3 target concepts, class images: prior and retain terms on), then runs 16 LoRA attacks (4 models x 4 concepts),
each 150 steps with 32 evaluation images (25 DDIM steps, guidance) at step 0 and every 30 steps, then evaluates.

    python benchmarks/demo_time.py [--threads 2] [--repeats 2] [--json benchmarks/results/demo_time.json]

Pieces: one outer step per method (random latents of the toy's shape stand in for the encoded images), one LoRA
train step, one checkpoint's 32 evaluation images. The estimate multiplies them by the demo's counts; the
evaluation (encoders on 3,072 images) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

DEMO = {"immunize_steps": 40, "targets": ("stripes", "checker", "dots"), "attacks": 16, "attack_steps": 150,
        "checkpoints": 6, "eval_images": 32}


def _seconds(step, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def immunize_step_seconds(repeats: int) -> dict[str, float]:
    """Seconds per outer step of each demo method at the demo's settings."""
    import torch

    from mima.data.concepts import toy_concept_spec
    from mima.immunize import ImmunizeConfig, immunizers
    from mima.models.components import Components
    from mima.models.encoding import EncodedConcept, EncodedImages

    components = Components.from_pretrained("toy")
    size, g = components.unet.config.sample_size, torch.Generator().manual_seed(0)
    specs = [toy_concept_spec(name) for name in DEMO["targets"]]

    def images(prompt: str) -> EncodedImages:
        latents = torch.randn(32, 4, size, size, generator=g)
        return EncodedImages(latents, 0.1 * torch.ones_like(latents), components.encode_prompts([prompt] * 32))

    concepts = [EncodedConcept(s.name, images(s.prompt), images(s.class_prompt)) for s in specs]
    seconds = {}
    for method in ("imma", "imma-joint", "mima"):
        immunizer = immunizers.get(method)(ImmunizeConfig(method=method, caption_bank="toy"))
        immunizer.prepare(components, specs, concepts)
        seconds[method] = _seconds(_outer_step(immunizer, concepts, g), repeats)
    return seconds


def _outer_step(immunizer, concepts, g):
    return lambda: immunizer.gradients({c.name: (c.batch(4, g), c.batch(4, g)) for c in concepts}, g)


def attack_seconds(repeats: int) -> dict[str, float]:
    """Seconds of one LoRA train step and of one checkpoint's evaluation images."""
    import torch

    from mima.attacks import AttackConfig, attacks
    from mima.data.concepts import materialize, toy_concept_spec
    from mima.models.components import Components
    from mima.models.encoding import encode_folder
    from mima.sampling import sample_images

    components = Components.from_pretrained("toy")
    spec = materialize(toy_concept_spec("stripes"), Path(tempfile.mkdtemp()), 32, seed=0)
    lora = attacks.get("lora")
    attack = lora(lora.settings(AttackConfig(method="lora")))
    attack.prepare(components, spec)
    instance, g = encode_folder(components, spec.images, spec.prompt), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(attack.trainable_parameters(), lr=1e-4)

    def train() -> None:
        latents, _, prompts = instance.sample(4, g)
        attack.loss(latents, prompts, g, None).backward()
        optimizer.step()
        optimizer.zero_grad()

    prompts = [attack.prompt(spec.prompt)] * DEMO["eval_images"]
    return {"train_step": _seconds(train, 5 * repeats),
            "checkpoint_samples": _seconds(lambda: sample_images(components, prompts, seed=0), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="imma protects one concept")
    immunize, attack = immunize_step_seconds(args.repeats), attack_seconds(args.repeats)
    estimate = {
        "immunize_min": DEMO["immunize_steps"] * sum(immunize.values()) / 60,
        "attack_train_min": DEMO["attacks"] * DEMO["attack_steps"] * attack["train_step"] / 60,
        "attack_samples_min": DEMO["attacks"] * DEMO["checkpoints"] * attack["checkpoint_samples"] / 60,
    }
    for name, value in {**immunize, **attack}.items():
        print(f"{name:>20}: {value:7.3f} s")
    for name, value in estimate.items():
        print(f"{name:>20}: {value:7.1f} min")
    print(f"{'total (no eval)':>20}: {sum(estimate.values()):7.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"threads": args.threads, "pieces_s": {**immunize, **attack}, "estimate_min": estimate}
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
