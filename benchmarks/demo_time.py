"""Project `mima demo`'s time phase by phase from its pieces, measured in one process (no 20-minute run needed).

The counts come from the demo's preset (src/mima/assets/presets/toy-demo.yaml): immunization (one outer step per
method, and the class images), the LoRA attacks (train steps and each checkpoint's evaluation samples, at the
preset's DDIM steps and precision) and the evaluation (both encoders on every sample and reference). Each piece is
also measured at the protocol the demo used before (25 fp32 DDIM steps every 30 attack steps, class images drawn
by every model, EfficientNet unfused, 32 images a batch), in the same process, so that on a busy machine the ratio
new / before still holds. The projection scales the last quiet-machine measurement of the whole demo (`--quiet`,
seconds per phase of `time mima demo` on 2 cores) by those ratios. The projection is for the demo in one process;
`mima demo` now runs one local worker per CPU thread on the CPU, which measured 10 min 15 s and 11 min 3 s from a
fresh clone, install included (docs/efficacy.md, "The demo's protocol"):

    python benchmarks/demo_time.py [--threads 1] [--repeats 2] [--json benchmarks/results/demo_time.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

import yaml

# The demo measured on a quiet 2-core machine with the protocol before (2026-12-01, main f765e23): phases of
# `mima demo` (benchmark timings) and the rest (start, model loads, report) up to `time`'s 22 min 17 s.
QUIET_BEFORE_S = {"immunization": 280.0, "attacks": 940.0, "evaluation": 92.0, "other": 25.0}
BEFORE = {"save_every": 30, "sampling_steps": 25, "sampling_precision": "no", "class_image_draws": "per model",
          "eval_batch": 32}
REFERENCES_PER_CONCEPT = 64
# The share of the evaluation phase spent encoding (cProfile of that demo's evaluation re-run: 231 of 280 s); the
# rest (reading images, metrics, plots, the report) is taken as fixed.
ENCODING_SHARE = 0.82


def demo_counts() -> dict:
    """What the demo runs, read from its preset with every default applied."""
    from mima.attacks import AttackConfig, attacks
    from mima.immunize import ImmunizeConfig

    preset = yaml.safe_load((resources.files("mima") / "assets" / "presets" / "toy-demo.yaml").read_text())
    method = attacks.get(preset["attacks"][0])
    attack = method.settings(AttackConfig.from_dict({**preset["attack"], "method": preset["attacks"][0]}))
    immunize = ImmunizeConfig.from_dict({**preset["immunize"], "method": "mima"})
    concepts = len(preset["targets"]) + len(preset["non_targets"])
    return {"methods": preset["methods"], "targets": [t.removeprefix("toy:") for t in preset["targets"]],
            "models": len(preset["methods"]) + 1, "concepts": concepts, "immunize": immunize, "attack": attack,
            "attacks": (len(preset["methods"]) + 1) * concepts * len(preset["attacks"]) * len(preset["seeds"])}


def _seconds(step, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def immunize_step_seconds(counts: dict, repeats: int) -> dict[str, float]:
    """Seconds per outer step of each demo method at the demo's settings (random latents of the toy's shape)."""
    import torch

    from mima.data.concepts import toy_concept_spec
    from mima.immunize import immunizers
    from mima.models.components import Components
    from mima.models.encoding import EncodedConcept, EncodedImages

    components = Components.from_pretrained("toy")
    size, g = components.unet.config.sample_size, torch.Generator().manual_seed(0)
    specs = [toy_concept_spec(name) for name in counts["targets"]]

    def images(prompt: str) -> EncodedImages:
        latents = torch.randn(32, 4, size, size, generator=g)
        return EncodedImages(latents, 0.1 * torch.ones_like(latents), components.encode_prompts([prompt] * 32))

    concepts = [EncodedConcept(s.name, images(s.prompt), images(s.class_prompt)) for s in specs]
    seconds = {}
    for method in counts["methods"]:
        config = counts["immunize"].with_overrides(method=method, caption_bank="toy")
        immunizer = immunizers.get(method)(config)
        immunizer.prepare(components, specs, concepts)
        seconds[method] = _seconds(_outer_step(immunizer, concepts, g), repeats)
    return seconds


def _outer_step(immunizer, concepts, g):
    return lambda: immunizer.gradients({c.name: (c.batch(4, g), c.batch(4, g)) for c in concepts}, g)


def attack_seconds(counts: dict, repeats: int) -> dict[str, float]:
    """Seconds of one LoRA train step and of one checkpoint's evaluation images, now and before."""
    import torch

    from mima.attacks import attacks
    from mima.data.concepts import materialize, toy_concept_spec
    from mima.models.components import Components
    from mima.models.encoding import encode_folder
    from mima.sampling import sample_images
    from mima.utils.device import Placement

    config, components = counts["attack"], Components.from_pretrained("toy")
    spec = materialize(toy_concept_spec("stripes"), Path(tempfile.mkdtemp()), 32, seed=0)
    attack = attacks.get(config.method)(config)
    attack.prepare(components, spec)
    instance, g = encode_folder(components, spec.images, spec.prompt), torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(attack.trainable_parameters(), lr=config.lr)

    def train() -> None:
        latents, _, prompts = instance.sample(config.batch_size, g)
        attack.loss(latents, prompts, g, None).backward()
        optimizer.step()
        optimizer.zero_grad()

    def samples(steps: int, precision: str, n: int) -> float:
        with Placement(torch.device("cpu"), precision).autocast():
            return _seconds(lambda: sample_images(components, [attack.prompt(spec.prompt)] * n, seed=0,
                                                  steps=steps, guidance_scale=config.guidance_scale), 1)

    precision = config.sampling_precision or config.mixed_precision
    return {"train_step": _seconds(train, 5 * repeats),
            "checkpoint_samples": samples(config.sampling_steps, precision, config.eval_images),
            "checkpoint_samples_before": samples(BEFORE["sampling_steps"], BEFORE["sampling_precision"],
                                                 config.eval_images),
            "class_images": samples(25, counts["immunize"].mixed_precision, counts["immunize"].n_class_images)}


def evaluation_seconds_per_image(repeats: int) -> dict[str, float]:
    """Seconds per image of both encoders (32 toy images), now and before (EfficientNet unfused, 32 a batch)."""
    import numpy as np
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    from mima.evaluate.encoders import get_encoder
    from mima.toy import world

    rng = np.random.default_rng(0)
    images = [Image.fromarray(world.render("stripes", None, rng)) for _ in range(32)]
    efficientnet, judge = get_encoder("efficientnet-lite0"), get_encoder("toy-judge")
    seconds = {name: _seconds(lambda e=encoder: e.embed(images), repeats) / len(images)
               for name, encoder in (("efficientnet", efficientnet), ("toy_judge", judge))}
    unfused = EfficientNet.from_name("efficientnet-lite0")
    unfused.load_state_dict(torch.load(efficientnet.weights, map_location="cpu", weights_only=True))
    efficientnet.network, efficientnet.batch_size = unfused.eval(), BEFORE["eval_batch"]
    seconds["efficientnet_before"] = _seconds(lambda: efficientnet.embed(images), repeats) / len(images)
    return seconds


def project(counts: dict, immunize: dict, attack: dict, evaluation: dict) -> dict[str, dict[str, float]]:
    """Seconds of each phase here, now and before, and the quiet machine's projected by the ratio now / before."""
    config, n_attacks = counts["attack"], counts["attacks"]
    checkpoints = 1 + config.steps // config.save_every + (config.steps % config.save_every > 0)
    checkpoints_before = 1 + config.steps // BEFORE["save_every"] + (config.steps % BEFORE["save_every"] > 0)
    outer = counts["immunize"].steps * sum(immunize.values())
    images = n_attacks * config.eval_images
    references = counts["concepts"] * REFERENCES_PER_CONCEPT
    train = config.steps * attack["train_step"]
    here = {
        "immunization": outer + attack["class_images"],
        "attacks": n_attacks * (train + checkpoints * attack["checkpoint_samples"]),
        "evaluation": (images * checkpoints + references) * (evaluation["efficientnet"] + evaluation["toy_judge"]),
    }
    before = {
        "immunization": outer + counts["models"] * attack["class_images"],
        "attacks": n_attacks * (train + checkpoints_before * attack["checkpoint_samples_before"]),
        "evaluation": (images * checkpoints_before + references)
        * (evaluation["efficientnet_before"] + evaluation["toy_judge"]),
    }
    quiet = {phase: QUIET_BEFORE_S[phase] * here[phase] / before[phase] for phase in here}
    ratio = here["evaluation"] / before["evaluation"]
    quiet["evaluation"] = QUIET_BEFORE_S["evaluation"] * (1 - ENCODING_SHARE + ENCODING_SHARE * ratio)
    quiet["other"] = QUIET_BEFORE_S["other"]
    return {"here_now_s": here, "here_before_s": before, "quiet_projected_s": quiet,
            "unet_rows_sampling": {"now": n_attacks * checkpoints * config.sampling_steps * 2 * config.eval_images,
                                   "before": n_attacks * checkpoints_before * BEFORE["sampling_steps"] * 2
                                   * config.eval_images}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="imma protects one concept")
    counts = demo_counts()
    immunize, attack = immunize_step_seconds(counts, args.repeats), attack_seconds(counts, args.repeats)
    evaluation = evaluation_seconds_per_image(args.repeats)
    estimate = project(counts, immunize, attack, evaluation)
    for name, value in {**immunize, **attack, **evaluation}.items():
        print(f"{name:>26}: {value:8.4f} s")
    print(f"{'phase':>26}  {'here now':>9}  {'here before':>11}  {'ratio':>5}  {'quiet, projected':>16}")
    for phase, quiet in estimate["quiet_projected_s"].items():
        now, before = estimate["here_now_s"].get(phase), estimate["here_before_s"].get(phase)
        cells = f"{now:9.0f}  {before:11.0f}  {now / before:5.2f}" if now else f"{'':9}  {'':11}  {'':5}"
        print(f"{phase:>26}  {cells}  {quiet:14.0f} s")
    total = sum(estimate["quiet_projected_s"].values())
    print(f"{'total (quiet, projected)':>26}: {total:.0f} s = {total / 60:.1f} min (before: "
          f"{sum(QUIET_BEFORE_S.values()) / 60:.1f} min); UNet rows sampled {estimate['unet_rows_sampling']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"threads": args.threads, "pieces_s": {**immunize, **attack, **evaluation}, **estimate,
                  "quiet_total_projected_s": total, "quiet_before_s": QUIET_BEFORE_S}
        args.json.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
