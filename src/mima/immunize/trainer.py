"""The immunization run: validate, prepare data, (erase,) run the chosen method with checkpoints, export.

Output folder: `model/` (a diffusers pipeline), `immunization.json`, `checkpoint/` (while running), `data/`
(materialized toy concepts, generated class images and the bank prior's images).
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

from mima.data.captions import load_caption_bank
from mima.data.concepts import ConceptSpec, materialize, validate_images
from mima.errors import ConfigError
from mima.functional import Params
from mima.immunize import immunizers
from mima.immunize.base import ConceptBatches, Immunizer
from mima.immunize.config import ImmunizeConfig
from mima.immunize.erase import erase_targets, preserved_captions
from mima.immunize.saliency import saliency_masks
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names, select_parameters
from mima.models.encoding import EncodedConcept, EncodedImages, encode_concept, encode_folder
from mima.sampling import ensure_bank_images, ensure_class_images
from mima.training import LoopSettings, TrainingLoop
from mima.utils.checkpoint import has_checkpoint, load_state, save_checkpoint
from mima.utils.device import Placement, resolve_placement, start_peak_memory
from mima.utils.distributed import join_process_group
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance
from mima.utils.run_folder import IMMUNIZATION, claim_run_folder


@dataclass
class ImmunizationRun:
    """One `mima immunize` run over `specs`, writing into `out_dir`."""

    model: str
    specs: list[ConceptSpec]
    config: ImmunizeConfig
    out_dir: Path
    device: str = "auto"
    bank_dir: Path | None = None  # where the bank prior's images are found or drawn; None: out_dir/data/bank-prior

    def __post_init__(self) -> None:
        self.config = self.config.for_model(self.model).for_targets(len(self.specs))

    def run(self, resume: bool = False, overwrite: bool = False) -> Path:
        started = time.time()
        config = self.config
        config.check_names()  # a misspelt method or caption bank: fail before any heavy work
        retained = config.retained_specs(self.specs)
        config.check_concepts([*self.specs, *retained])  # e.g. descriptions for a describing attacker
        placement = resolve_placement(self.device, config.mixed_precision, loss_scaling=False)
        start_peak_memory(placement.device)  # the record's peak is this run's, in a reused worker too
        shard = join_process_group(placement.device)  # one process: no group, every concept here
        _check_processes(shard.size, len(self.specs), config)
        if shard.is_main:  # the main process alone writes files; the others wait, then read them
            claim_run_folder(self.out_dir, IMMUNIZATION, self.run_settings(), resume=resume, overwrite=overwrite,
                             differences=self.differences)
            specs, retained = self._materialized(self.specs), self._materialized(retained, len(self.specs))
        shard.barrier()  # unreadable images failed above, before the model loads
        if not shard.is_main:
            specs, retained = self._materialized(self.specs), self._materialized(retained, len(self.specs))
        print(f"immunize: {placement.describe()}", file=sys.stderr)
        components = Components.from_pretrained(self.model).to(placement.device)
        skipped = _check_parameter_globs(components.unet, config)  # before class images and the erasure
        if shard.is_main:  # the main process draws the images; the others then find them on disk
            specs, bank = self._with_drawn_images(components, specs, placement)
        shard.barrier()
        if not shard.is_main:
            specs, bank = self._with_drawn_images(components, specs, placement)
        if config.setting == "relearn":
            erase_targets(components, specs, config)
        immunizer = immunizers.get(config.method)(config)
        immunizer.shard = shard
        immunizer.retained = [(s, encode_concept(components, s, with_prior=False)) for s in retained]
        if bank is not None:
            give_bank_prior(immunizer, components, encode_folder(components, bank, ""))
        encoded = [encode_concept(components, s, with_prior=config.uses_class_images) for s in specs]
        immunizer.prepare(components, specs, encoded)
        immunizer.original = distillation_teacher(components, immunizer)  # before a resumed run loads its weights
        if immunizer.fused > 1:
            print(f"immunize: up to {immunizer.fused} batches at one set of weights per UNet call (--fused-batches)",
                  file=sys.stderr)
        log: list[dict[str, float]] = []
        if immunizer.iterative:
            log = _Loop(immunizer, encoded, config, self.out_dir / "checkpoint", placement, skipped).run(resume)
        if not shard.is_main:
            shard.barrier()  # until the main process has written the model and the record
            return self.out_dir / "model"
        components.save_pretrained(self.out_dir / "model")
        shutil.rmtree(self.out_dir / "checkpoint", ignore_errors=True)
        record = {
            "config": config.to_dict(), "model": self.model, "concepts": [_spec_record(s) for s in specs],
            "retained": [_spec_record(s) for s in retained],
            "log": log, "elapsed_s": time.time() - started, "batches_per_call": immunizer.fused,
            **placement.record(), **provenance(),
        }
        atomic_write_text(self.out_dir / "immunization.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
        shard.barrier()
        return self.out_dir / "model"

    def run_settings(self) -> dict[str, object]:
        """What decides this run's result, shaped like its record (`immunization.json`)."""
        return {"config": self.config.to_dict(), "model": self.model,
                "concepts": [{"name": s.name} for s in self.specs]}

    def differences(self, recorded: Mapping[str, Any]) -> dict[str, tuple]:
        """The settings deciding the result that differ from `recorded` (a checkpoint's settings or a record)."""
        fields = immunizers.get(self.config.method).deciding_fields(self.config)
        changed = self.config.differences(recorded["config"], fields)
        concepts = [c["name"] for c in recorded.get("concepts", [])]
        for name, old, new in (("model", recorded.get("model"), self.model),
                               ("concepts", concepts, [s.name for s in self.specs])):
            if old != new:
                changed[name] = (old, new)
        return changed

    def _materialized(self, specs: list[ConceptSpec], first: int = 0) -> list[ConceptSpec]:
        """`specs` with their images on disk (toy concepts drawn into `data/`, the n-th of the run with seed
        `seed + first + n`), every image checked."""
        data_dir, config = self.out_dir / "data", self.config
        specs = [materialize(s, data_dir, config.n_images, seed=config.seed + first + i) for i, s in enumerate(specs)]
        for spec in specs:
            validate_images(spec)
        return specs

    def _with_drawn_images(
        self, components: Components, specs: list[ConceptSpec], placement: Placement
    ) -> tuple[list[ConceptSpec], Path | None]:
        """`specs` with their class images where the objective takes them, generated with the base model into
        `data/` where missing, as the bank prior's images (`_bank_images`), and the bank prior's folder (None: off)."""
        size = self.config.n_class_images
        if self.config.uses_class_images:
            with placement.autocast():
                specs = [ensure_class_images(components, s, self.out_dir / "data", size) for s in specs]
        bank = self._bank_images(components, specs, placement) if self.config.uses_bank_prior else None
        return specs, bank

    def _bank_images(self, components: Components, specs: list[ConceptSpec], placement: Placement) -> Path:
        """The bank prior's images (`bank_dir`), generated with the base model where missing, under
        `bank_prior_captions(specs, config)`."""
        folder = self.bank_dir or self.out_dir / "data" / "bank-prior"
        with placement.autocast():
            return ensure_bank_images(components, bank_prior_captions(specs, self.config), folder,
                                      self.config.n_bank_images)


def bank_prior_captions(specs: list[ConceptSpec], config: ImmunizeConfig) -> list[str]:
    """The bank prior's captions: those of `bank_prior_captions` (else the run's caption bank) that name no target."""
    return preserved_captions(specs, load_caption_bank(config.bank_prior_captions or config.caption_bank))


def distillation_teacher(components: Components, immunizer: Immunizer) -> Params:
    """S^u as the immunization finds it, where a term distils from it (`ImmunizeConfig.uses_teacher`)."""
    if not immunizer.config.uses_teacher:
        return {}
    upper = immunizer.upper_names
    return {name: p.detach().clone() for name, p in components.unet.named_parameters() if name in upper}


def _check_processes(processes: int, concepts: int, config: ImmunizeConfig) -> None:
    if concepts < processes:
        raise ConfigError(f"{processes} processes for {concepts} concepts; launch at most one per concept")
    if config.persistent_attacker and processes > 1:  # each process would carry only its own concepts' attacks
        raise ConfigError("persistent_attacker runs in one process; launch without torchrun/accelerate")


def _check_parameter_globs(unet: torch.nn.Module, config: ImmunizeConfig) -> list[frozenset[str]]:
    """A UNet without cross-attention, or S^l / S^u / upper_lr_scales / upper_skip globs that select nothing: a
    ConfigError. Returns what each simulated attacker's steps skip (`_skipped_per_attacker`)."""
    key_value_parameter_names(unet)
    names = [name for name, _ in unet.named_parameters()]
    select_parameters(names, config.lower_params, what="lower-level (S^l)")
    upper_names = select_parameters(names, config.upper_params, what="upper-level (S^u)")
    config.upper_rate_scales(upper_names)
    return _skipped_per_attacker(config, names, upper_names)


def _skipped_per_attacker(config: ImmunizeConfig, names: list[str], upper_names: list[str]) -> list[frozenset[str]]:
    """For each simulated attacker, the S^u weights that the outer steps drawing it leave alone
    (`AttackerSpec.upper_skip`). Its globs must name UNet weights (a misspelling is a ConfigError) but may miss S^u:
    the default's keys and values are then simply not there to skip; skipping all of S^u is a ConfigError."""
    skipped = []
    for spec in config.attacker_specs():
        what = f"upper_skip of simulated attacker '{spec.kind}'"
        held = set(select_parameters(names, spec.upper_skip, what=what)) if spec.upper_skip else set()
        if held >= set(upper_names):
            raise ConfigError(f"the {what} holds every S^u weight; its outer steps would move nothing")
        skipped.append(frozenset(held.intersection(upper_names)))
    return skipped


def _spec_record(spec: ConceptSpec) -> dict[str, object]:
    return {"name": spec.name, "prompts": list(spec.prompts), "images": str(spec.images),
            "class_prompt": spec.class_prompt, "class_images": str(spec.class_images),
            "descriptions": list(spec.descriptions), "erase_to": spec.erase_to}


def give_bank_prior(immunizer: Immunizer, components: Components, bank: EncodedImages) -> None:
    """Hand `immunizer` the bank prior's images, encoded, and the unconditional conditioning its empty-prompt share
    takes, where the images' conditioning lives (the text encoder may stay elsewhere, as in the step benchmark)."""
    immunizer.bank = bank
    with torch.no_grad():
        immunizer.unconditional = components.family.unconditional(components).float().to(bank.hidden.device)


class _Loop(TrainingLoop):
    """Outer optimisation of S^u with AdamW: each step's objective is the immunizer's on fresh concept batches."""

    def __init__(self, immunizer: Immunizer, encoded: list[EncodedConcept], config: ImmunizeConfig,
                 checkpoint_dir: Path, placement: Placement, skipped: list[frozenset[str]]) -> None:
        self.immunizer, self.encoded, self.config, self.skipped = immunizer, encoded, config, skipped
        params = immunizer.trainable_parameters()
        settings = LoopSettings(
            steps=config.steps, save_every=config.save_every, seed=config.seed, grad_clip=config.grad_clip,
            checkpoint_dir=checkpoint_dir, desc=f"immunize ({config.method})", loss_name="objective",
            step_name="outer step", show_progress=immunizer.shard.is_main,
        )
        self.masks: dict[str, torch.Tensor] = {}
        if config.upper_saliency:
            with placement.autocast():
                self.masks = saliency_masks(params, lambda batch, generator: immunizer.loss({}, batch, generator),
                                            encoded, config.upper_saliency, config.batch_size, config.seed,
                                            against_class=config.upper_saliency_against == "class")
        scales = config.upper_rate_scales(list(params))
        groups = [{"params": [params[name] for name in params if scales[name] == scale], "lr": config.outer_lr * scale}
                  for scale in dict.fromkeys(scales.values())]
        super().__init__(params, torch.optim.AdamW(groups, lr=config.outer_lr, weight_decay=0.0), settings, placement)

    def run(self, resume: bool) -> list[dict[str, float]]:
        if resume and has_checkpoint(self.settings.checkpoint_dir):  # what the immunizer carries across steps
            self.immunizer.load_state(load_state(self.settings.checkpoint_dir))
        return super().run(resume)

    def gradients(self, generator: torch.Generator) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        """The immunizer's objective and its gradient on S^u, taken concept by concept (`Immunizer.gradients`),
        with this step's simulated attacker (`Immunizer.begin_step`, logged), less the weights it skips and, with
        `upper_saliency`, the entries outside the saliency masks."""
        chosen = self.immunizer.begin_step(self.step)
        with self.placement.autocast():
            objective, grads, logs = self.immunizer.gradients(self._batches(generator), generator)
        self.check_finite(objective)
        self.immunizer.end_step(logs)
        skipped = self.skipped[int(chosen["attacker"])] if "attacker" in chosen else frozenset()
        kept = {name: g * self.masks[name] if name in self.masks else g for name, g in grads.items()}
        return objective, {name: g for name, g in kept.items() if name not in skipped}, {**chosen, **logs}

    def save_checkpoint(self) -> None:
        """The main process alone writes (S^u and the optimizer state are the same on every process)."""
        if self.immunizer.shard.is_main:
            save_checkpoint(self.settings.checkpoint_dir, self.params, self.optimizer, self.step, self.log,
                            self.scaler, self.immunizer.state())

    def _batches(self, generator: torch.Generator) -> ConceptBatches:
        size = self.config.batch_size
        return {c.name: (c.batch(size, generator), c.batch(size, generator)) for c in self.encoded}
