"""Evaluate immunization from attack runs: similarity curves without and with immunization, SGR, MSGR, MRSGR.

For each concept n the inputs are two `mima attack` run folders (`attack.json`, `samples/step_<k>/`), one attacking
the model WITHOUT immunization and one attacking the immunized model WITH the same attack, and reference images R_n.
At every checkpoint k held by both runs the similarity S(samples at k, R_n) gives S_wo_n(k) and S_w_n(k) (see
[`mima.evaluate.metrics`]); a classifier encoder (the toy judge) also gives the attack-success rate on toy concepts.
Per-concept lists (`sgr` too) include step 0; the aggregate metrics use the steps >= 1.

Features are cached per image content in `<folder>/.feature_cache/<encoder>.safetensors` next to the images (see
[`FeatureCache`]): evaluating the same inputs again encodes nothing and returns the identical result.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mima.data.image_folder import read_image_folder, write_image_folder
from mima.errors import ConfigError, DataError
from mima.evaluate.cache import FeatureCache
from mima.evaluate.encoders import ImageEncoder, get_encoder
from mima.evaluate.metrics import CONDITIONS, CurveSet, SimilarityCurve, metrics, relative_gap, sgr, similarity
from mima.evaluate.report import plot_curves, save_comparison_grid, slug
from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation, RunPair
from mima.evaluate.summary import Drawing, mean
from mima.toy import world as toy_world
from mima.utils.device import resolve_device
from mima.utils.io import atomic_write_text
from mima.utils.provenance import provenance

DEFAULT_ENCODERS = ("efficientnet-lite0", "toy-judge")
TOY_REFERENCE_IMAGES = 64
TOY_REFERENCE_SEED = 999
_STEP_DIR = re.compile(r"step_(\d+)")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class AttackRunInfo:
    """What evaluation reads of a `mima attack` run folder: its concept, attack method and sampled steps."""

    path: Path
    concept: str
    method: str
    steps: tuple[int, ...]

    def samples(self, step: int) -> Path:
        """The image folder of the samples at attack step `step`."""
        return self.path / "samples" / f"step_{step}"


@dataclass(frozen=True)
class _Pair:
    without: AttackRunInfo
    immunized: AttackRunInfo
    steps: list[int]


def read_attack_run(path: PathLike) -> AttackRunInfo:
    """Read `attack.json` and list `samples/step_<k>/` of a run folder written by `mima attack`.

    Raises:
        [`~mima.errors.DataError`]: If `attack.json` is missing, unreadable or names no concept, or the run lacks
            `samples/step_0` or any later step.
    """
    path = Path(path)
    record_path = path / "attack.json"
    if not record_path.is_file():
        raise DataError(f"'{path}' is not an attack run: no attack.json (expected a folder written by `mima attack`)")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse '{record_path}': {e}") from e
    concept = record.get("concept") if isinstance(record, dict) else None
    if not isinstance(concept, str) or not concept:
        raise DataError(f"'{record_path}' names no concept (expected a string under the key 'concept')")
    method = str((record.get("config") or {}).get("method", "unknown"))
    found = [_STEP_DIR.fullmatch(p.name) for p in (path / "samples").glob("step_*") if p.is_dir()]
    steps = tuple(sorted(int(m.group(1)) for m in found if m))
    if 0 not in steps or len(steps) < 2:
        raise DataError(f"'{path / 'samples'}' must hold step_0 and a later step_<k>; found steps {list(steps)}")
    return AttackRunInfo(path, concept, method, steps)


def pair_runs(without: Sequence[PathLike], with_: Sequence[PathLike]) -> dict[str, tuple[Path, Path]]:
    """Pair attack runs without and with immunization by the concept named in their `attack.json`.

    Returns:
        `dict[str, tuple[Path, Path]]`: Concept name -> (run without, run with), sorted by name.

    Raises:
        [`~mima.errors.ConfigError`]: If one side has two runs of a concept, or a concept has a run on one side only.
    """
    runs_without, runs_with = _by_concept(without, "without"), _by_concept(with_, "with")
    if set(runs_without) != set(runs_with):
        alone = sorted(set(runs_without) ^ set(runs_with))
        raise ConfigError(f"concept(s) {', '.join(alone)} have a run without immunization or with it, not both")
    return {concept: (runs_without[concept], runs_with[concept]) for concept in sorted(runs_without)}


def _by_concept(paths: Sequence[PathLike], side: str) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for path in paths:
        info = read_attack_run(path)
        if info.concept in runs:
            raise ConfigError(f"runs '{runs[info.concept]}' and '{path}' ({side}) both attack '{info.concept}'")
        runs[info.concept] = info.path
    return runs


def default_encoders(concepts: Collection[str]) -> tuple[str, ...]:
    """`DEFAULT_ENCODERS` when every concept is a toy concept; else without the toy judge (it knows only those)."""
    if all(concept in toy_world.STYLES + toy_world.OBJECTS for concept in concepts):
        return DEFAULT_ENCODERS
    return tuple(encoder for encoder in DEFAULT_ENCODERS if encoder != "toy-judge")


def write_toy_references(
    concepts: Sequence[str], out_dir: PathLike, n: int = TOY_REFERENCE_IMAGES, seed: int = TOY_REFERENCE_SEED
) -> dict[str, Path]:
    """Reference images R_n of toy concepts from the toy-world generator, as image folders `out_dir/<concept>`.

    A folder that already holds a `metadata.csv` is kept as is (the generator is deterministic), so re-evaluating
    generates nothing.

    Raises:
        [`~mima.errors.ConfigError`]: If a concept is not a toy concept.
    """
    folders = {}
    for concept in concepts:
        try:
            toy_world.concept_family(concept)
        except KeyError:
            valid = ", ".join(toy_world.STYLES + toy_world.OBJECTS)
            raise ConfigError(f"'{concept}' is not a toy concept and has no toy references; valid: {valid}") from None
        folder = Path(out_dir) / concept
        if not (folder / "metadata.csv").is_file():
            write_image_folder(*toy_world.sample_concept_images(concept, n, seed=seed), folder)
        folders[concept] = folder
    return folders


def resolve_references(specs: Sequence[str], concepts: Sequence[str], out_dir: PathLike) -> dict[str, Path]:
    """Reference folders by concept from `["toy"]`, `[DIR]` (one subfolder per concept) and/or `CONCEPT=DIR` entries.

    Args:
        specs (`Sequence[str]`):
            `"toy"` alone: generate toy references into `out_dir` ([`write_toy_references`]); a folder holding one
            subfolder per concept; `concept=folder` entries, which take precedence.
        concepts (`Sequence[str]`):
            The concepts that need references.
        out_dir (`str` or `os.PathLike`):
            Where toy references are written.
    """
    if "toy" in specs:
        if len(specs) > 1:
            raise ConfigError(f"--references toy cannot be combined with other entries, got {list(specs)}")
        return write_toy_references(concepts, out_dir)
    explicit = dict(spec.split("=", 1) for spec in specs if "=" in spec)
    parents = [spec for spec in specs if "=" not in spec]
    if len(parents) > 1 or set(explicit) - set(concepts):
        raise ConfigError(f"--references: expected one parent folder and CONCEPT=DIR entries for {list(concepts)}")
    folders = {}
    for concept in concepts:
        if concept not in explicit and not parents:
            raise ConfigError(f"no reference images for '{concept}': give a parent folder or '{concept}=DIR'")
        folders[concept] = Path(explicit[concept]) if concept in explicit else Path(parents[0]) / concept
    return folders


def evaluate_runs(
    pairs: Mapping[str, tuple[PathLike, PathLike]],
    references: Mapping[str, PathLike],
    encoder_specs: Sequence[str | ImageEncoder] = DEFAULT_ENCODERS,
    *,
    non_targets: Collection[str] = (),
    device: str | None = "auto",
) -> Evaluation:
    """Similarity curves, SGR, MSGR, MRSGR (and every registered metric) for each encoder.

    Args:
        pairs (`Mapping[str, tuple[PathLike, PathLike]]`):
            Concept name -> (attack run WITHOUT immunization, attack run WITH immunization), e.g. from [`pair_runs`].
        references (`Mapping[str, PathLike]`):
            Concept name -> reference image folder R_n.
        encoder_specs (`Sequence[str | ImageEncoder]`, defaults to `DEFAULT_ENCODERS`):
            Encoder specs for [`get_encoder`] (`"name"` or `"name:model"`) or built encoders.
        non_targets (`Collection[str]`, *optional*):
            Concepts of `pairs` that were not immunized against; they feed `non_target_sgr`, not MSGR.
        device (`str`, defaults to `"auto"`):
            Where the encoders built from specs run (see [`~mima.utils.device.resolve_device`]).

    Returns:
        [`~mima.evaluate.results.Evaluation`]: The inputs and, by encoder, each concept's curves and every metric.

    Raises:
        [`~mima.errors.ConfigError`], [`~mima.errors.DataError`], [`~mima.errors.ModelError`]: On invalid inputs,
            checked (and every encoder loaded) before anything is encoded.
    """
    resolved = resolve_device(device)
    runs = _validate(pairs, references, non_targets)
    encoders: dict[str, ImageEncoder] = {}
    for spec in encoder_specs:
        key = spec if isinstance(spec, str) else spec.name
        if key in encoders:
            raise ConfigError(f"encoder '{key}' is given twice")
        encoders[key] = get_encoder(spec, resolved) if isinstance(spec, str) else spec
    if not encoders:
        raise ConfigError("no encoder given; e.g. 'efficientnet-lite0'")
    return Evaluation(
        pairs={c: RunPair(str(p.without.path), str(p.immunized.path), p.steps) for c, p in runs.items()},
        references={concept: str(references[concept]) for concept in runs},
        non_targets=sorted(non_targets),
        encoders={key: _evaluate_encoder(encoder, runs, references, frozenset(non_targets))
                  for key, encoder in encoders.items()},
    )


def _validate(
    pairs: Mapping[str, tuple[PathLike, PathLike]], references: Mapping[str, PathLike], non_targets: Collection[str]
) -> dict[str, _Pair]:
    if not pairs:
        raise ConfigError("nothing to evaluate: no (without, with) pair of attack runs")
    if unknown := sorted(set(non_targets) - set(pairs)):
        raise ConfigError(f"non-target concept(s) {', '.join(unknown)} have no attack runs; concepts: {sorted(pairs)}")
    runs = {}
    for concept, (without, with_) in pairs.items():
        pair = [read_attack_run(without), read_attack_run(with_)]
        if wrong := [str(info.path) for info in pair if info.concept != concept]:
            raise ConfigError(f"run(s) {', '.join(wrong)} do not attack concept '{concept}'")
        if pair[0].method != pair[1].method:
            raise ConfigError(f"'{concept}': compare the same attack, got {pair[0].method} and {pair[1].method}")
        steps = sorted(set(pair[0].steps) & set(pair[1].steps))
        if len(steps) < 2:
            raise DataError(f"'{concept}': the runs share no step after 0: {pair[0].steps}, {pair[1].steps}")
        if concept not in references:
            raise ConfigError(f"'{concept}' has no reference image folder")
        if not Path(references[concept]).is_dir():
            raise DataError(f"'{concept}': reference image folder '{references[concept]}' does not exist")
        runs[concept] = _Pair(pair[0], pair[1], steps)
    return runs


def _evaluate_encoder(
    encoder: ImageEncoder, runs: Mapping[str, _Pair], references: Mapping[str, PathLike], non_targets: frozenset[str]
) -> EncoderResult:
    concepts: dict[str, ConceptResult] = {}
    similarities, successes = {}, {}
    for concept, pair in runs.items():
        reference = _reference_features(encoder, references[concept])
        curves = {c: _run_curves(encoder, run, pair.steps, reference, concept)
                  for c, run in zip(CONDITIONS, (pair.without, pair.immunized), strict=True)}
        similarities[concept] = {c: s for c, (s, _) in curves.items()}
        rates = {c: r for c, (_, r) in curves.items() if r is not None}
        if len(rates) == len(CONDITIONS):
            successes[concept] = rates
        target = concept not in non_targets
        concepts[concept] = _concept_result(pair, similarities[concept], successes.get(concept), target)
    curve_set = CurveSet(similarities, successes, non_targets)
    return EncoderResult(concepts, {name: metrics.get(name)().compute(curve_set) for name in metrics.names()})


def run_similarity(run: PathLike, references: PathLike, encoder: ImageEncoder) -> SimilarityCurve:
    """S(samples of `run` at each of its checkpoints, the images of `references`) under `encoder`, features cached
    as [`evaluate_runs`] caches them: one attack run scored alone, without a run on an un-immunized model."""
    info = read_attack_run(run)
    if not Path(references).is_dir():
        raise DataError(f"reference image folder '{references}' does not exist")
    reference = _reference_features(encoder, references)
    return _run_curves(encoder, info, list(info.steps), reference, info.concept)[0]


def _reference_features(encoder: ImageEncoder, folder: PathLike) -> torch.Tensor:
    with FeatureCache(folder, encoder) as cache:
        return cache.encode(read_image_folder(folder)[0])[0]  # (|R|, F)


def _run_curves(
    encoder: ImageEncoder, run: AttackRunInfo, steps: list[int], reference: torch.Tensor, concept: str
) -> tuple[SimilarityCurve, SimilarityCurve | None]:
    """S(samples at each step, R) and, for a classifier that knows `concept`, the attack-success rate."""
    with FeatureCache(run.path, encoder) as cache:
        values, rates = zip(*(_score(cache, run.samples(step), reference, concept) for step in steps), strict=True)
    known = all(rate is not None for rate in rates)
    return SimilarityCurve(steps, list(values)), SimilarityCurve(steps, list(rates)) if known else None


def _score(cache: FeatureCache, folder: Path, reference: torch.Tensor, concept: str) -> tuple[float, float | None]:
    """S(the samples in `folder`, R) and, for a classifier that knows `concept`, the share it recognises."""
    feats, labels = cache.encode(read_image_folder(folder)[0])
    rate = cache.encoder.success_rate(labels, concept) if labels is not None else None
    return similarity(feats, reference), rate


def drawings(
    folders: Mapping[str, Sequence[PathLike]], references: PathLike, encoder: ImageEncoder, concept: str
) -> dict[str, Drawing]:
    """What each model's image folders of one concept's samples show (model -> one folder per seed; seed means):
    similarity to the images of `references` (encoded once) and, where `encoder` knows `concept`, the share it
    recognises. Features cached as [`evaluate_runs`] caches them."""
    reference = _reference_features(encoder, references)
    drawn = {}
    for model, by_seed in folders.items():
        scores = []
        for folder in by_seed:
            with FeatureCache(folder, encoder) as cache:
                scores.append(_score(cache, Path(folder), reference, concept))
        drawn[model] = Drawing(mean(s for s, _ in scores), mean(r for _, r in scores))
    return drawn


def _concept_result(
    pair: _Pair, curves: Mapping[str, SimilarityCurve], rates: Mapping[str, SimilarityCurve] | None, target: bool
) -> ConceptResult:
    without, immunized = curves["without"], curves["with"]
    return ConceptResult(
        attack=pair.without.method,
        target=target,
        steps=list(pair.steps),
        s_without=without.values,
        s_with=immunized.values,
        sgr=[sgr(wo, w) for wo, w in zip(without.values, immunized.values, strict=True)],
        rsgr=relative_gap(without, immunized),
        asr_without=rates["without"].values if rates else None,
        asr_with=rates["with"].values if rates else None,
    )


def write_evaluation(evaluation: Evaluation, out_dir: PathLike) -> Path:
    """Write `metrics.json`, similarity-vs-step plots and sample grids of an [`evaluate_runs`] result.

    - `metrics.json`: `{"results": evaluation.to_json(), "metrics": {name: direction, aggregation, definition},
      "provenance": ...}`, sorted keys; only `provenance` changes when the same inputs are evaluated again.
    - `plots/<encoder>/<concept>.png`: S(t) without and with immunization (and the attack-success rate when known).
    - `grids/<concept>.png`: last-step samples, top row without immunization, bottom row with.

    Returns:
        `Path`: The `metrics.json` file.
    """
    out_dir = Path(out_dir)
    record = {
        "results": evaluation.to_json(),
        "metrics": {name: metrics.get(name).info() for name in metrics.names()},
        "provenance": provenance(),
    }
    path = out_dir / "metrics.json"
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
    for key, result in evaluation.encoders.items():
        for concept, curves in result.concepts.items():
            title = f"{concept} ({curves.attack}), encoder {key}"
            plot_curves(curves, title, out_dir / "plots" / slug(key) / f"{slug(concept)}.png")
    for concept, pair in evaluation.pairs.items():
        last = f"step_{pair.steps[-1]}"
        without, immunized = Path(pair.without) / "samples" / last, Path(pair.immunized) / "samples" / last
        save_comparison_grid(without, immunized, out_dir / "grids" / f"{slug(concept)}.png")
    return path
