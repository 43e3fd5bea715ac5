"""The one fine-tuning loop every attack shares: data, AdamW, progress bar, checkpoints, evaluation samples.

Output folder: `export/` (the artifact), `samples/step_<k>/` (evaluation images at step 0 and every
checkpoint), `attack.json`, `checkpoint/` (while running), `data/` (materialized images).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mima.attacks import attacks
from mima.attacks.base import Attack
from mima.attacks.config import AttackConfig
from mima.data.concepts import ConceptSpec, materialize, validate_images
from mima.data.image_folder import write_image_folder
from mima.models.components import Components, load_tokenizers, speaks_toy_vocabulary
from mima.models.encoding import encode_folder
from mima.sampling import ensure_class_images, sample_images
from mima.training import LoopSettings, TrainingLoop
from mima.utils.device import (
    Placement,
    native_precision,
    resolve_device,
    resolve_placement,
    seed_everything,
    start_peak_memory,
)
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance
from mima.utils.run_folder import ATTACK, claim_run_folder


@dataclass
class AttackRun:
    """One `mima attack` run of `config.method` on `concept`, writing into `out_dir`."""

    model: str
    concept: ConceptSpec
    config: AttackConfig
    out_dir: Path
    device: str = "auto"

    def __post_init__(self) -> None:
        method = attacks.get(self.config.method)  # unset fields: the method's defaults for this model's family
        self.config = method.settings(self.config, toy=speaks_toy_vocabulary(self.model))

    def check(self) -> None:
        """Refuse (`ConfigError`) a token this run cannot use, reading only the model's tokenizers: every run calls
        it before anything loads, a sweep or benchmark for each of its runs before the first starts."""
        method = attacks.get(self.config.method)
        if method.learns_token or method.token_for(self.config, self.concept) is not None:
            bank = "toy" if speaks_toy_vocabulary(self.model) else "generic"
            method.check_prompt(self.config, self.concept, load_tokenizers(self.model), bank)

    def run(self, resume: bool = False, overwrite: bool = False) -> Path:
        started = time.time()
        method = attacks.get(self.config.method)
        config = self.config
        placement = resolve_placement(self.device, config.mixed_precision)
        start_peak_memory(placement.device)  # the record's peak is this run's, in a reused worker too
        sampling = sampling_placement(config, self.device)
        self.check()
        claim_run_folder(self.out_dir, ATTACK, self.run_settings(), resume=resume, overwrite=overwrite,
                         differences=self.differences)
        concept = materialize(self.concept, self.out_dir / "data", config.n_images, seed=config.seed)
        validate_images(concept)
        print(f"attack: {placement.describe()}", file=sys.stderr)
        components = Components.from_pretrained(self.model).to(placement.device)
        # Adapters (e.g. LoRA) draw their initial weights from the global CPU RNG, whatever the device.
        seed_everything(config.seed)
        attack = method(config)
        if method.uses_prior and config.prior_weight > 0:
            with placement.autocast():
                concept = ensure_class_images(components, concept, self.out_dir / "data", config.n_class_images)
        attack.prepare(components, concept)
        loop = _Loop(attack, components, concept, config, self.out_dir, placement, sampling)
        log = loop.run(resume)
        export_dir = attack.export(self.out_dir / "export")
        record = {
            "config": config.to_dict(), "model": self.model, "concept": concept.name, "prompts": list(concept.prompts),
            "eval_prompts": _eval_prompts(concept, config), "prompt_mode": method.prompt_mode(config),
            "token": method.token_for(config, concept), "train_prompts": sorted(set(map(attack.prompt, loop.prompts))),
            "sample_prompts": list(dict.fromkeys(loop.sample_prompts())), "log": log,
            "elapsed_s": time.time() - started, "sampling_precision": sampling.mixed_precision,
            **placement.record(), **provenance(),
        }
        atomic_write_text(self.out_dir / "attack.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)
        return export_dir

    def run_settings(self) -> dict[str, object]:
        """What decides this run's result, shaped like its record (`attack.json`)."""
        return {"config": self.config.to_dict(), "model": self.model, "concept": self.concept.name}

    def differences(self, recorded: Mapping[str, Any]) -> dict[str, tuple]:
        """The settings that differ from `recorded` (a checkpoint's settings or a finished run's record)."""
        changed = self.config.differences(recorded["config"])
        for name, old, new in (("model", recorded.get("model"), self.model),
                               ("concept", recorded.get("concept"), self.concept.name)):
            if old != new:
                changed[name] = (old, new)
        return changed


def _eval_prompts(concept: ConceptSpec, config: AttackConfig) -> list[str]:
    return list(config.eval_prompts or concept.prompts[:1])


def sampling_placement(config: AttackConfig, device: str) -> Placement:
    """Where and in which precision the evaluation samples of a run with `config` are drawn."""
    precision = config.sampling_precision or config.mixed_precision
    if precision == "auto":
        precision = native_precision(resolve_device(device))
    return resolve_placement(device, precision,
                             flag="--sampling-precision" if config.sampling_precision else "--mixed-precision")


def eval_prompts(concept: ConceptSpec, config: AttackConfig) -> list[str]:
    """One prompt per evaluation image of `concept`, before any prompt rewriting of the attack's."""
    prompts = _eval_prompts(concept, config)
    return [prompts[i % len(prompts)] for i in range(config.eval_images)]


def draw_samples(components: Components, prompts: list[str], config: AttackConfig, sampling: Placement,
                 folder: Path) -> None:
    """Draw an evaluation image per prompt, as at each checkpoint of an attack run, into the image folder `folder`."""
    with sampling.autocast():
        images = sample_images(components, prompts, seed=config.seed, steps=config.sampling_steps,
                               guidance_scale=config.guidance_scale)
    write_image_folder(images, prompts, folder)


class _Loop(TrainingLoop):
    """Fine-tuning with AdamW on the attack's trainable parameters; evaluation samples at every checkpoint, drawn
    under the `sampling` placement's precision."""

    def __init__(self, attack: Attack, components: Components, concept: ConceptSpec, config: AttackConfig,
                 out_dir: Path, placement: Placement, sampling: Placement) -> None:
        self.attack, self.components, self.concept = attack, components, concept
        self.config, self.out_dir, self.sampling = config, out_dir, sampling
        params = {str(i): p for i, p in enumerate(attack.trainable_parameters())}
        settings = LoopSettings(
            steps=config.steps, save_every=config.save_every, seed=config.seed, grad_clip=1.0,
            checkpoint_dir=out_dir / "checkpoint", desc=f"attack ({config.method})", step_name="attack step",
        )
        super().__init__(params, torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=1e-2), settings,
                         placement)
        self.instance = encode_folder(components, concept.images, concept.prompt)
        self.prompts = self.instance.prompts
        self.prior = None
        if attack.uses_prior and config.prior_weight > 0 and concept.class_images is not None:
            self.prior = encode_folder(components, concept.class_images, concept.class_prompt or "")

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        latents, _, prompts = self.instance.sample(self.config.batch_size, generator)
        prior = None
        if self.prior is not None:
            prior_latents, _, prior_prompts = self.prior.sample(self.config.batch_size, generator)
            prior = (prior_latents, prior_prompts)
        return self.attack.loss(latents, prompts, generator, prior), {}

    def sample_prompts(self) -> list[str]:
        """The prompts of the evaluation samples: the evaluation prompts captioned as the training images are."""
        return [self.attack.prompt(prompt) for prompt in eval_prompts(self.concept, self.config)]

    def at_checkpoint(self) -> None:
        draw_samples(self.components, self.sample_prompts(), self.config, self.sampling,
                     self.out_dir / "samples" / f"step_{self.step}")
