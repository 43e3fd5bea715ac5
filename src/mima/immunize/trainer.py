"""The immunization run: validate, prepare data, (erase,) run the chosen method with checkpoints, export.

Output folder: `model/` (a diffusers pipeline), `immunization.json`, `checkpoint/` (while running), `data/`
(materialized toy concepts and generated class images).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from mima.data.concepts import ConceptSpec, materialize, validate_images
from mima.errors import ConfigError, TrainingError
from mima.immunize import immunizers
from mima.immunize.base import ConceptBatches, Immunizer
from mima.immunize.config import ImmunizeConfig
from mima.immunize.erase import erase_targets
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names
from mima.models.encoding import encode_concept
from mima.sampling import ensure_class_images
from mima.utils.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from mima.utils.device import step_generator
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance


@dataclass
class ImmunizationRun:
    """One `mima immunize` run over `specs`, writing into `out_dir`."""

    model: str
    specs: list[ConceptSpec]
    config: ImmunizeConfig
    out_dir: Path

    def __post_init__(self) -> None:
        self.config = self.config.for_model(self.model)

    def run(self, resume: bool = False) -> Path:
        started = time.time()
        config = self.config
        immunizers.get(config.method)  # unknown method: fail before any heavy work
        components = Components.from_pretrained(self.model)
        key_value_parameter_names(components.unet)  # no cross-attention: fail early
        specs = self._prepare_specs(components, config)
        if config.setting == "relearn":
            erase_targets(components, specs, config)
        immunizer = immunizers.get(config.method)(config)
        encoded = [encode_concept(components, s, with_prior=config.uses_class_images) for s in specs]
        immunizer.prepare(components, specs, encoded)
        log: list[dict[str, float]] = []
        if immunizer.iterative:
            log = _Loop(immunizer, encoded, config, self.out_dir / "checkpoint").run(resume)
        components.save_pretrained(self.out_dir / "model")
        shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)
        record = {
            "config": config.to_dict(), "model": self.model, "concepts": [_spec_record(s) for s in specs],
            "log": log, "elapsed_s": time.time() - started, **provenance(),
        }
        atomic_write_text(self.out_dir / "immunization.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        return self.out_dir / "model"

    def _prepare_specs(self, components: Components, config: ImmunizeConfig) -> list[ConceptSpec]:
        data_dir = self.out_dir / "data"
        specs = [materialize(s, data_dir, config.n_images, seed=config.seed + i) for i, s in enumerate(self.specs)]
        for spec in specs:
            validate_images(spec)
        if config.uses_class_images:
            specs = [ensure_class_images(components, s, data_dir, config.n_class_images) for s in specs]
        return specs


def _spec_record(spec: ConceptSpec) -> dict[str, object]:
    return {"name": spec.name, "prompts": list(spec.prompts), "images": str(spec.images),
            "class_prompt": spec.class_prompt, "class_images": str(spec.class_images)}


class _Loop:
    """Outer optimisation with AdamW on S^u, a NaN guard and atomic checkpoints (S^u weights, optimizer, log)."""

    def __init__(self, immunizer: Immunizer, encoded: list, config: ImmunizeConfig, checkpoint_dir: Path) -> None:
        self.immunizer, self.encoded, self.config, self.checkpoint_dir = immunizer, encoded, config, checkpoint_dir
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        self.params = immunizer.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.outer_lr, weight_decay=0.0)
        self.step, self.log = 0, []

    def run(self, resume: bool) -> list[dict[str, float]]:
        if resume:
            self.step, self.log = load_checkpoint(self.checkpoint_dir, self.params, self.optimizer)
        elif has_checkpoint(self.checkpoint_dir):
            raise ConfigError(f"'{self.checkpoint_dir}' holds an unfinished run; pass --resume or use another --out")
        with tqdm(total=self.config.steps, initial=self.step, desc=f"immunize ({self.config.method})") as bar:
            while self.step < self.config.steps:
                logs = self._outer_step()
                self.step += 1
                self.log.append({"step": self.step, **logs})
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k != "objective"})
                if self.step % self.config.save_every == 0 and self.step < self.config.steps:
                    save_checkpoint(self.checkpoint_dir, self.params, self.optimizer, self.step, self.log)
        return self.log

    def _batches(self, generator: torch.Generator) -> ConceptBatches:
        size = self.config.batch_size
        return {c.name: (c.batch(size, generator), c.batch(size, generator)) for c in self.encoded}

    def _outer_step(self) -> dict[str, float]:
        generator = step_generator(self.config.seed, self.step)
        with self.accelerator.autocast():
            objective, grads, logs = self.immunizer.gradients(self._batches(generator), generator)
        if not math.isfinite(objective):
            raise TrainingError(
                f"non-finite objective {objective} at outer step {self.step + 1}; "
                f"the last checkpoint in '{self.checkpoint_dir}' is intact (lower the learning rates)"
            )
        for name, param in self.params.items():
            param.grad = grads[name].to(param.dtype)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"objective": objective, **logs}
