"""The pieces of a benchmark: each one run (an immunization, an attack, the images drawn with the base model, the
evaluation samples of a bystander, the features of an attack's samples) that an executor runs and that knows whether
it is finished."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mima.config import Config
from mima.utils.provenance import provenance
from mima.utils.run_folder import ATTACK, BYSTANDER, IMMUNIZATION, RunLayout, finished_run

if TYPE_CHECKING:
    from mima.attacks import AttackConfig, AttackRun
    from mima.data.concepts import ConceptSpec
    from mima.immunize import ImmunizationRun


class _Piece:
    """One finished-or-not run of a benchmark: the run, its settings resolved when it was built, and its record."""

    runner: ImmunizationRun | AttackRun
    layout: ClassVar[RunLayout]

    @property
    def out(self) -> Path:
        return self.runner.out_dir

    @property
    def config(self) -> Config:
        """The settings the run uses (every default applied)."""
        return self.runner.config

    def finished(self) -> bool:
        """Whether the run exists; `ConfigError` if it was made with other settings than this piece's."""
        return finished_run(self.out, self.layout, self.runner.differences)

    def run(self) -> None:
        from mima.utils.checkpoint import has_checkpoint

        self.runner.run(resume=has_checkpoint(self.out / "checkpoint"))


@dataclass(frozen=True)
class ImmunizationPiece(_Piece):
    """One immunization of a benchmark; resumes its own checkpoint."""

    runner: ImmunizationRun
    layout: ClassVar[RunLayout] = IMMUNIZATION


@dataclass(frozen=True)
class AttackPiece(_Piece):
    """One attack run of a benchmark; resumes its own checkpoint."""

    runner: AttackRun
    layout: ClassVar[RunLayout] = ATTACK


@dataclass(frozen=True)
class BaseImagesPiece:
    """The images the immunizations draw with the base model before they change it: the class images of the targets
    that lack them and the bank prior's images, drawn once into the folders that every immunization of the benchmark
    reads (each would otherwise draw the same images for itself)."""

    model: str
    specs: tuple[ConceptSpec, ...]
    n_class_images: int
    bank_captions: tuple[str, ...]
    bank_dir: Path | None  # None: no immunization takes the bank prior
    n_bank_images: int
    mixed_precision: str
    device: str = "auto"

    def finished(self) -> bool:
        """Whether every spec's class-image folder exists (the test `ensure_class_images` makes), and the bank's."""
        bank_drawn = self.bank_dir is None or (self.bank_dir / "metadata.csv").is_file()
        return bank_drawn and all(spec.class_images.exists() for spec in self.specs)

    def run(self) -> None:
        from mima.models.components import Components
        from mima.sampling import ensure_bank_images, ensure_class_images
        from mima.utils.device import resolve_placement

        placement = resolve_placement(self.device, self.mixed_precision, loss_scaling=False)
        components = Components.from_pretrained(self.model).to(placement.device)
        with placement.autocast():
            for spec in self.specs:
                ensure_class_images(components, spec, spec.class_images.parent, self.n_class_images)
            if self.bank_dir is not None:
                ensure_bank_images(components, list(self.bank_captions), self.bank_dir, self.n_bank_images)


@dataclass(frozen=True)
class EvaluationPiece:
    """The features of one attack run's samples under every encoder, cached next to them (see `FeatureCache`), so
    that the report encodes nothing but the references."""

    run_dir: Path
    encoders: tuple[str, ...]
    device: str = "auto"

    def finished(self) -> bool:
        """Whether every encoder's feature cache of the run exists."""
        from mima.evaluate.cache import cache_file
        from mima.evaluate.encoders import spec_cache_id

        return all(cache_file(self.run_dir, spec_cache_id(spec)).is_file() for spec in self.encoders)

    def run(self) -> None:
        from mima.data.image_folder import read_image_folder
        from mima.evaluate.cache import FeatureCache
        from mima.evaluate.encoders import get_encoder
        from mima.evaluate.evaluate import read_attack_run
        from mima.utils.device import resolve_device

        run = read_attack_run(self.run_dir)
        for spec in self.encoders:
            with FeatureCache(run.path, get_encoder(spec, resolve_device(self.device))) as cache:
                for step in run.steps:
                    cache.encode(read_image_folder(run.samples(step))[0])


@dataclass(frozen=True)
class BystanderPiece:
    """One model's samples of a bystander, a concept the benchmark draws but never attacks: its prompts drawn as step 0
    of an attack run with `config` would draw them (the same prompts, seed and sampling settings), into
    `out/samples/`; `drawing.json` marks it finished. `method` names the model in the report."""

    method: str
    model: Path
    concept: ConceptSpec
    config: AttackConfig
    out: Path
    device: str = "auto"

    def settings(self) -> dict[str, Any]:
        """What decides the samples, as `drawing.json` records them."""
        from mima.attacks.trainer import eval_prompts

        config = self.config
        return {"model": str(self.model), "concept": self.concept.name, "seed": config.seed,
                "prompts": eval_prompts(self.concept, config), "sampling_steps": config.sampling_steps,
                "guidance_scale": config.guidance_scale,
                "sampling_precision": config.sampling_precision or config.mixed_precision}

    def differences(self, recorded: Mapping[str, Any]) -> dict[str, tuple]:
        return {name: (recorded.get(name), value) for name, value in self.settings().items()
                if recorded.get(name) != value}

    def finished(self) -> bool:
        """Whether the samples exist; `ConfigError` if they were drawn with other settings."""
        return finished_run(self.out, BYSTANDER, self.differences)

    def run(self) -> None:
        from mima.attacks.trainer import draw_samples, sampling_placement
        from mima.models.components import Components
        from mima.utils.io import atomic_write_text

        started = time.time()
        sampling = sampling_placement(self.config, self.device)
        components = Components.from_pretrained(str(self.model)).to(sampling.device)
        settings = self.settings()
        draw_samples(components, settings["prompts"], self.config, sampling, self.out / "samples")
        record = {**settings, "elapsed_s": time.time() - started, **sampling.record(), **provenance()}
        atomic_write_text(self.out / "drawing.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
