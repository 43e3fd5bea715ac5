"""The main job: immunize with every method, attack every concept, evaluate, report. Resumable.

Layout of the output folder:
    class-images/<class>/       class images the targets lack, drawn once with the base model for every method
    bank-prior/                 the bank prior's images, drawn once with the base model for every method
    models/<method>/            `mima immunize` output per method ("none": the base, erased in relearn)
    attacks/<method>/<attack>/<concept>/seed<k>/    `mima attack` output
    bystanders/<method>/<concept>/seed<k>/          samples/ of a concept drawn but never attacked, drawing.json
    report/                     metrics.json, report.md, report.html, plots, grids
A suite (a YAML listing several benchmarks under `suite:`) runs part P into OUT/P with that layout.
A finished piece (a model with immunization.json, an attack with attack.json, a bystander's samples with
drawing.json, the evaluation of an attack with its feature caches) is never redone. The pieces of a phase run on an
executor (`mima.executors`): here, in a local process pool or as Ray tasks on a cluster whose nodes share the output
folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mima.attacks.variants import AttackVariant, parse_variants
from mima.benchmark.pieces import AttackPiece, BaseImagesPiece, BystanderPiece, EvaluationPiece, ImmunizationPiece
from mima.config import Config
from mima.errors import ConfigError
from mima.executors import Executor, LocalExecutor

if TYPE_CHECKING:
    from mima.attacks import AttackConfig
    from mima.data.concepts import ConceptSpec
    from mima.evaluate.summary import Drawings, Evaluations

PRESETS = ("toy-demo", "toy-demo-quick", "toy-full")


@dataclass(frozen=True)
class BenchmarkConfig(Config):
    """One benchmark: a setting, a model, target and non-target concepts, methods, attacks and encoders."""

    model: str = field(default="toy", metadata={"help": "'toy', a diffusers folder or a hub id"})
    setting: str = field(default="relearn", metadata={"help": "relearn (erase first) or personalize"})
    targets: tuple[str | dict, ...] = field(default=("toy:stripes", "toy:checker", "toy:dots"), metadata={
        "help": "protect: concept entries (`toy:<name>`, a folder, or a mapping as in a concept file)"})
    non_targets: tuple[str | dict, ...] = field(default=("toy:waves",), metadata={"help": "must stay learnable"})
    bystanders: tuple[str | dict, ...] = field(default=(), metadata={
        "help": "must stay drawn: sampled from every model before any attack, never attacked"})
    methods: tuple[str, ...] = field(default=("imma", "imma-joint", "mima"), metadata={"help": "immunizers"})
    attacks: tuple[str | dict, ...] = field(default=("lora",), metadata={
        "help": "adaptation methods, or named variants ({name, method, lr_scale, steps_scale, AttackConfig fields})"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "attack seeds"})
    encoders: tuple[str, ...] = field(default=("efficientnet-lite0", "toy-judge"), metadata={"help": "features"})
    immunize: dict = field(default_factory=dict, metadata={"help": "ImmunizeConfig overrides for every method"})
    attack: dict = field(default_factory=dict, metadata={"help": "AttackConfig overrides for every attack"})
    references: str = field(default="toy", metadata={"help": "'toy' or a folder with one subfolder per concept"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.setting not in ("relearn", "personalize"):
            raise ConfigError(f"setting must be 'relearn' or 'personalize', got '{self.setting}'")
        if not self.targets:
            raise ConfigError("a benchmark needs at least one target concept")
        if "none" in self.methods:
            raise ConfigError("'none' is always run as the un-immunized reference; do not list it in methods")
        self.attack_variants()

    def attack_variants(self) -> tuple[AttackVariant, ...]:
        """The entries of `attacks` as named variants (see `mima.attacks.variants`)."""
        return parse_variants(self.attacks)

    def attack_names(self) -> list[str]:
        return [variant.name for variant in self.attack_variants()]


def load_benchmarks(path: str | Path) -> dict[str, BenchmarkConfig]:
    """The benchmarks of a YAML file: `{"": config}` for one benchmark, or a suite's parts by name.

    A suite names its parts in a top-level list `suite:`; each part is a top-level section holding one
    benchmark's fields (YAML merge keys, `<<: *anchor`, share fields between parts).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None  # from_yaml names the problem
    if not isinstance(data, dict) or "suite" not in data:
        return {"": BenchmarkConfig.from_yaml(path)}
    parts = data["suite"]
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise ConfigError(f"'suite' in {path} must be a non-empty list of section names")
    return {part: BenchmarkConfig.from_yaml(path, section=part) for part in parts}


def load_preset(name: str) -> dict[str, BenchmarkConfig]:
    """A shipped benchmark (`PRESETS`), as `load_benchmarks` returns it."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
    return load_benchmarks(str(resources.files("mima") / "assets" / "presets" / f"{name}.yaml"))


@dataclass(frozen=True)
class BenchmarkPlan:
    """Every piece of one benchmark, with its settings resolved and checked."""

    targets: list[ConceptSpec]
    non_targets: list[ConceptSpec]
    bystanders: list[ConceptSpec]
    immunizations: list[ImmunizationPiece]
    base_images: BaseImagesPiece | None = None


@dataclass
class Benchmark:
    """The grid of one benchmark config, run into `out_dir` phase by phase by `executor` (default: here, serially)."""

    config: BenchmarkConfig
    out_dir: Path
    executor: Executor = field(default_factory=LocalExecutor)
    device: str = "auto"
    timings: dict[str, float] = field(default_factory=dict)

    def plan(self) -> BenchmarkPlan:
        """Resolve the whole grid: concepts, every piece's settings and every name (methods, attacks, caption banks,
        encoders, references), so that a benchmark that cannot run fails before its first piece."""
        from mima.data.concepts import load_concepts
        from mima.evaluate.encoders import encoders

        config = self.config
        targets = load_concepts(list(config.targets))
        non_targets, bystanders = (load_concepts(list(listed)) if listed else []
                                   for listed in (config.non_targets, config.bystanders))
        names = [c.name for c in load_concepts(list(config.targets + config.non_targets + config.bystanders))]
        immunizations = self.immunization_pieces(targets)
        for piece in immunizations:
            piece.config.check_names()
            piece.config.check_concepts(targets)
        self._check_attacks(targets + non_targets)
        for spec in self.config.encoders:
            encoders.get(spec.partition(":")[0])
        if config.references != "toy" and not Path(config.references).is_dir():
            raise ConfigError(f"references '{config.references}' is neither 'toy' nor a folder")
        if missing := [n for n in names if config.references != "toy" and not Path(config.references, n).is_dir()]:
            raise ConfigError(f"references '{config.references}' has no folder for {', '.join(missing)}")
        return BenchmarkPlan(targets, non_targets, bystanders, immunizations, self.base_images_piece(immunizations))

    def run(self, plan: BenchmarkPlan | None = None) -> Path:
        """Run what is not finished yet, then evaluate and report; `plan` (default: [`~Benchmark.plan`]) is checked
        against the finished pieces before anything is written."""
        plan = plan or self.plan()
        immunizations = [piece for piece in plan.immunizations if not piece.finished()]
        self.config.save_json(self.out_dir / "benchmark_config.json")
        draws = any(p.config.uses_class_images or p.config.uses_bank_prior for p in immunizations)
        if plan.base_images and not plan.base_images.finished() and draws:
            self._timed("immunization", self.executor.run, [plan.base_images], "class and bank images")
        self._timed("immunization", self.executor.run, immunizations, "immunizations")
        models = {piece.config.method: piece.out / "model" for piece in plan.immunizations}
        attacks, runs = self._attack_pieces(models, plan.targets + plan.non_targets)
        self._timed("attacks", self.executor.run, [piece for piece in attacks if not piece.finished()], "attacks")
        bystanders = self._bystander_pieces(models, plan.bystanders)
        self._timed("evaluation", self.executor.run, [p for p in bystanders if not p.finished()], "bystanders")
        self._timed("evaluation", self._encode_all, runs)
        return self._timed("evaluation", self._report, runs, plan, bystanders)

    def recorded_seconds(self, runs: dict) -> dict[str, float]:
        """Compute time every finished piece recorded (`elapsed_s`), whichever process or earlier run made it."""
        models = [self.out_dir / "models" / m / "immunization.json" for m in runs]
        attacks = [path / "attack.json" for by_key in runs.values() for path in by_key.values()]
        bystanders = sorted(self.out_dir.glob("bystanders/*/*/seed*/drawing.json"))
        return {phase: sum(json.loads(p.read_text()).get("elapsed_s", 0.0) for p in records)
                for phase, records in (("immunization", models), ("attacks", attacks), ("bystanders", bystanders))}

    def _timed(self, phase: str, function, *args):
        started = time.time()
        result = function(*args)
        self.timings[phase] = self.timings.get(phase, 0.0) + time.time() - started
        return result

    def immunization_pieces(self, targets: list[ConceptSpec]) -> list[ImmunizationPiece]:
        """One piece per model: the `none` reference, then each method. A target without class images gets a
        folder under `class-images/`, and the bank prior's images a folder `bank-prior/`, that every piece shares
        ([`BaseImagesPiece`] draws them)."""
        from mima.data.concepts import class_folder_name
        from mima.immunize import ImmunizationRun, ImmunizeConfig

        shared = self.out_dir / "class-images"
        targets = [spec if spec.class_prompt is None or spec.class_images is not None
                   else replace(spec, class_images=shared / class_folder_name(spec.class_prompt)) for spec in targets]
        pieces = []
        for method in ("none", *self.config.methods):
            overrides = {**self.config.immunize, "method": method, "setting": self.config.setting}
            config = ImmunizeConfig.from_dict(overrides)
            run = ImmunizationRun(self.config.model, targets, config, self.out_dir / "models" / method, self.device,
                                  bank_dir=self.out_dir / "bank-prior")
            pieces.append(ImmunizationPiece(run))
        return pieces

    def base_images_piece(self, immunizations: list[ImmunizationPiece]) -> BaseImagesPiece | None:
        """The piece that draws the class images and the bank prior's images the immunizations share, if any of them
        uses either (the immunizations share their targets and settings but for the method)."""
        from mima.immunize.trainer import bank_prior_captions

        users = [p.runner for p in immunizations if p.config.uses_class_images or p.config.uses_bank_prior]
        if not users:
            return None
        run, config = users[0], users[0].config
        specs = tuple(s for s in run.specs if s.class_prompt is not None) if config.uses_class_images else ()
        bank = next((p.runner for p in immunizations if p.config.uses_bank_prior), None)
        captions = tuple(bank_prior_captions(bank.specs, bank.config)) if bank else ()
        return BaseImagesPiece(self.config.model, specs, config.n_class_images, captions, bank and bank.bank_dir,
                               bank.config.n_bank_images if bank else 0, config.mixed_precision, self.device)

    def _attack_pieces(
        self, models: dict[str, Path], concepts: list[ConceptSpec]
    ) -> tuple[list[AttackPiece], dict[str, dict[tuple, Path]]]:
        from mima.attacks import AttackRun

        runs: dict = {}
        pieces = []
        for method, model_dir in models.items():
            for variant in self.config.attack_variants():
                for concept in concepts:
                    for seed in self.config.seeds:
                        out = self.out_dir / "attacks" / method / variant.name / concept.name / f"seed{seed}"
                        runs.setdefault(method, {})[(variant.name, concept.name, seed)] = out
                        config = self._attack_config(variant, seed)
                        pieces.append(AttackPiece(AttackRun(str(model_dir), concept, config, out, self.device)))
        return pieces, runs

    def _bystander_pieces(self, models: dict[str, Path], bystanders: list[ConceptSpec]) -> list[BystanderPiece]:
        """Each model's samples of each bystander per seed, drawn as step 0 of the first attack that keeps the
        concept's prompts (else of the first attack) would draw them."""
        variants = self.config.attack_variants()
        variant = next((v for v in variants if not v.rewrites_prompts(self.config.attack)), variants[0])
        return [BystanderPiece(method, model_dir, concept, self._attack_config(variant, seed),
                               self.out_dir / "bystanders" / method / concept.name / f"seed{seed}", self.device)
                for method, model_dir in models.items() for concept in bystanders for seed in self.config.seeds]

    def _check_attacks(self, concepts: list[ConceptSpec]) -> None:
        """Every variant's name, prompt and token on every concept, read with the base model's tokenizers (the
        attack pieces themselves are built once their models exist)."""
        from mima.attacks import AttackRun

        for variant in self.config.attack_variants():
            for seed in self.config.seeds[:1]:  # a seed changes neither the method nor the token
                config = self._attack_config(variant, seed)
                config.check_names()
                for concept in concepts:
                    AttackRun(self.config.model, concept, config, self.out_dir, self.device).check()

    def _attack_config(self, variant: AttackVariant, seed: int) -> AttackConfig:
        return variant.config(self.config.attack, seed, toy=self._speaks_toy)

    @cached_property
    def _speaks_toy(self) -> bool:
        """Whether the model is of the toy world, whose attack defaults differ (read once: it loads a tokenizer)."""
        from mima.models.components import speaks_toy_vocabulary

        return speaks_toy_vocabulary(self.config.model)

    def _encode_all(self, runs: dict[str, dict[tuple, Path]]) -> None:
        pieces = [EvaluationPiece(path, self.config.encoders, self.device)
                  for by_key in runs.values() for path in by_key.values()]
        self.executor.run([piece for piece in pieces if not piece.finished()], "evaluations")

    def _report(self, runs: dict, plan: BenchmarkPlan, bystanders: list[BystanderPiece]) -> Path:
        from mima.evaluate.benchmark_report import write_benchmark_report
        from mima.evaluate.evaluate import write_toy_references

        targets, non_targets = [c.name for c in plan.targets], [c.name for c in plan.non_targets]
        concepts = targets + non_targets + [c.name for c in plan.bystanders]
        out = self.out_dir / "report"
        references = (write_toy_references(concepts, out / "references") if self.config.references == "toy"
                      else {c: Path(self.config.references) / c for c in concepts})
        evaluations = self._evaluate(runs, targets, non_targets, references)
        samples: dict[str, dict[str, list[Path]]] = {}
        for piece in bystanders:
            samples.setdefault(piece.concept.name, {}).setdefault(piece.method, []).append(piece.out / "samples")
        timings = {"this run": self.timings, "recorded by the pieces": self.recorded_seconds(runs)}
        return write_benchmark_report(
            evaluations, runs, targets=targets, non_targets=non_targets, config=self.config, timings=timings,
            out_dir=out, bystanders={c: {m: folders[0] for m, folders in by_model.items()}
                                     for c, by_model in samples.items()},
            drawn=self._drawn(samples, references),
        )

    def _drawn(self, samples: dict[str, dict[str, list[Path]]], references: dict[str, Path]) -> Drawings:
        """What each model's samples of each bystander show (seed means), model -> encoder -> concept."""
        from mima.evaluate.encoders import get_encoder
        from mima.evaluate.evaluate import drawings
        from mima.utils.device import resolve_device

        drawn: Drawings = {}
        for spec in self.config.encoders:
            encoder = get_encoder(spec, resolve_device(self.device))
            for concept, by_model in samples.items():
                for model, drawing in drawings(by_model, references[concept], encoder, concept).items():
                    drawn.setdefault(model, {}).setdefault(spec, {})[concept] = drawing
        return drawn

    def _evaluate(self, runs: dict, targets: list[str], non_targets: list[str],
                  references: dict[str, Path]) -> Evaluations:
        """Every (method, attack, seed) against the un-immunized runs, each also written to its own folder."""
        from mima.evaluate.evaluate import evaluate_runs, write_evaluation
        from mima.evaluate.summary import UNIMMUNIZED

        out, concepts = self.out_dir / "report", targets + non_targets
        evaluations: Evaluations = {}
        for method in self.config.methods:
            for attack in self.config.attack_names():
                for seed in self.config.seeds:
                    pairs = {c: (runs[UNIMMUNIZED][(attack, c, seed)], runs[method][(attack, c, seed)])
                             for c in concepts}
                    evaluation = evaluate_runs(pairs, references, self.config.encoders, non_targets=non_targets,
                                               device=self.device)
                    write_evaluation(evaluation, out / "evaluations" / method / attack / f"seed{seed}")
                    evaluations.setdefault(method, {}).setdefault(attack, {})[seed] = evaluation
        return evaluations
