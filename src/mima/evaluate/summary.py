"""The numbers of a benchmark's report: seed means of its evaluations, per method, attack and encoder.

`summarize` gives the main table ([`SummaryRow`]); `worst_cases` the attack each model resists least ([`WorstCase`]);
`before_attack` what each model draws of each concept before any attack step ([`BeforeAttack`]). All are typed, with
`to_json` for the report's `metrics.json`.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mima.evaluate.metrics import MRSGR, MSGR, AttackSuccessRate, Condition, sgr
from mima.evaluate.results import ConceptResult, Evaluation

UNIMMUNIZED = "none"
# A non-target drawn before any attack with less than this share of the un-immunized model's similarity is flagged:
# on the toy demo's non-target the shipped defaults keep 0.83-0.85 of it on seeds 0 and 1 and 0.35 on seed 2.
DRAWN_SHARE = 0.8

Evaluations = dict[str, dict[str, dict[int, Evaluation]]]
"""A benchmark's evaluations: method -> attack -> seed -> [`Evaluation`] against the un-immunized model."""


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values; None when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def stdev(values: Iterable[float | None]) -> float | None:
    """The sample standard deviation of the finite values; None when there are fewer than two."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else None


def evaluations_to_json(evaluations: Evaluations) -> dict[str, Any]:
    return {method: {attack: {str(seed): e.to_json() for seed, e in by_seed.items()}
                     for attack, by_seed in by_attack.items()} for method, by_attack in evaluations.items()}


@dataclass(frozen=True)
class SummaryRow:
    """One (method, attack, encoder), averaged over seeds: MSGR and MRSGR (percent), each concept's mean SGR over
    t >= 1 (percent), and the attack-success rate on the immunized model at the last step (fraction); with several
    seeds, the standard deviations over them of MSGR and of each SGR (one attack run moves an SGR by several points:
    docs/efficacy.md), and each non-target's `between_runs`: its mean |SGR| (percent) between two attack runs of the
    un-immunized model, what a model that learns exactly as that one does would score."""

    msgr: float | None
    mrsgr: float | None
    sgr: dict[str, float | None]
    non_target_sgr: dict[str, float | None]
    attack_success_rate_with: float | None
    msgr_sd: float | None = None
    sgr_sd: dict[str, float | None] = field(default_factory=dict)
    non_target_sgr_sd: dict[str, float | None] = field(default_factory=dict)
    between_runs: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"msgr": self.msgr, "mrsgr": self.mrsgr, "sgr": self.sgr, "non_target_sgr": self.non_target_sgr,
                "attack_success_rate_with": self.attack_success_rate_with, "msgr_sd": self.msgr_sd,
                "sgr_sd": self.sgr_sd, "non_target_sgr_sd": self.non_target_sgr_sd,
                "between_runs": self.between_runs}


Summary = dict[str, dict[str, dict[str, SummaryRow]]]
"""method -> attack -> encoder -> [`SummaryRow`]."""


def summarize(evaluations: Evaluations, targets: list[str], non_targets: list[str]) -> Summary:
    """The report's main table: every (method, attack, encoder), seed means."""
    summary: Summary = {}
    for method, by_attack in evaluations.items():
        for attack, by_seed in by_attack.items():
            for encoder in next(iter(by_seed.values())).encoders:
                results = [e.encoders[encoder] for e in by_seed.values()]

                sgrs = {name: [_as_percent(mean(r.concepts[name].sgr[1:])) for r in results]  # t >= 1
                        for name in [*targets, *non_targets]}
                msgrs = [r.value(MSGR) for r in results]
                summary.setdefault(method, {}).setdefault(attack, {})[encoder] = SummaryRow(
                    msgr=mean(msgrs),
                    mrsgr=mean(r.value(MRSGR) for r in results),
                    sgr={name: mean(sgrs[name]) for name in targets},
                    non_target_sgr={name: mean(sgrs[name]) for name in non_targets},
                    attack_success_rate_with=mean(r.value(AttackSuccessRate) for r in results),
                    msgr_sd=stdev(msgrs),
                    sgr_sd={name: stdev(sgrs[name]) for name in targets},
                    non_target_sgr_sd={name: stdev(sgrs[name]) for name in non_targets},
                    between_runs={name: _between_runs([r.concepts[name] for r in results]) for name in non_targets},
                )
    return summary


def _between_runs(runs: list[ConceptResult]) -> float | None:
    """The mean |SGR| (percent, t >= 1) over ordered pairs of distinct attack runs (seeds) of the un-immunized model,
    one run in the role of the immunized one: the resolution of a non-target's SGR; None with one run."""
    gaps = [mean(sgr(b, a) for a, b in zip(first.s_without[1:], second.s_without[1:], strict=True))
            for first, second in itertools.permutations(runs, 2)]
    return _as_percent(mean(abs(gap) for gap in gaps if gap is not None))


def _as_percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


@dataclass(frozen=True)
class WorstCase:
    """One (method, encoder): the attack with the lowest MSGR (seed means), the one the immunization slows least,
    that MSGR (percent), and every attack's MSGR."""

    attack: str | None
    msgr: float | None
    per_attack: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "msgr": self.msgr, "per_attack": self.per_attack}


def worst_cases(summary: Summary) -> dict[str, dict[str, WorstCase]]:
    """method -> encoder -> [`WorstCase`] over the attacks of `summary` (attacks without an MSGR are not ranked)."""
    cases: dict[str, dict[str, WorstCase]] = {}
    for method, by_attack in summary.items():
        encoders = dict.fromkeys(encoder for by_encoder in by_attack.values() for encoder in by_encoder)
        for encoder in encoders:
            per_attack = {attack: by_encoder[encoder].msgr for attack, by_encoder in by_attack.items()
                          if encoder in by_encoder}
            known = {attack: msgr for attack, msgr in per_attack.items() if msgr is not None}
            worst = min(known, key=known.__getitem__) if known else None
            cases.setdefault(method, {})[encoder] = WorstCase(worst, known.get(worst), per_attack)
    return cases


@dataclass(frozen=True)
class Drawing:
    """What a model draws of a concept's prompt before any attack step, seed means: similarity to the references
    and, where the encoder knows the concept, the share it recognises."""

    similarity: float | None
    success_rate: float | None


Drawings = dict[str, dict[str, dict[str, Drawing]]]
"""What each model draws before any attack: model -> encoder -> concept -> [`Drawing`]."""


@dataclass(frozen=True)
class BeforeAttack:
    """Each model's own samples of each concept, model -> encoder -> concept: the attacked concepts' read from step 0
    of `attack` (None when no attack keeps the prompts), the bystanders' drawn without an attack."""

    attack: str | None
    models: Drawings

    def damaged(self, non_targets: list[str], bystanders: list[str] | None = None) -> list[str]:
        """One line per (model, encoder) naming each non-target and bystander whose similarity falls under
        `DRAWN_SHARE` of the un-immunized model's: concepts a model no longer draws that it should keep. A
        classifier's rate can miss it, since it names the closest concept it knows (noise in a concept's colours
        included)."""
        reference = self.models[UNIMMUNIZED]
        labels = {concept: " (non-target)" for concept in non_targets} | dict.fromkeys(bystanders or (), "")
        lines = []
        for model, by_encoder in self.models.items():
            if model == UNIMMUNIZED:
                continue
            for encoder, by_concept in by_encoder.items():
                damaged = [f"{concept}{label} {own:.2f} against {base:.2f}" for concept, label in labels.items()
                           if concept in by_concept and (own := by_concept[concept].similarity) is not None
                           and (base := reference[encoder][concept].similarity) and own < DRAWN_SHARE * base]
                if damaged:
                    lines.append(f"{model} draws {len(damaged)} concept(s) it should keep under {DRAWN_SHARE:g} of "
                                 f"{UNIMMUNIZED}'s similarity before any attack ({encoder}): {', '.join(damaged)}")
        return lines

    def to_json(self) -> dict[str, Any]:
        models = {model: {encoder: {concept: {"similarity": d.similarity, "success_rate": d.success_rate}
                                    for concept, d in by_concept.items()}
                          for encoder, by_concept in by_encoder.items()}
                  for model, by_encoder in self.models.items()}
        return {"attack": self.attack, "models": models}


def before_attack(evaluations: Evaluations, plain: list[str], concepts: list[str],
                  bystanders: Drawings | None = None) -> BeforeAttack | None:
    """Each model's own samples of each concept's prompt before any attack step (seed means).

    The attacked `concepts` are read from step 0 of the first of the `plain` attacks, those that keep the concept's
    prompts as they are (a token method's step 0 draws its new token, a fresh-token or fixed-text run its own
    prompt); the `bystanders` come drawn (model -> encoder -> concept). None when there is neither.
    """
    models: Drawings = {}
    attacked = evaluations.items() if plain else ()
    for method, by_attack in attacked:
        runs = list(by_attack[plain[0]].values())
        for encoder in runs[0].encoders:
            for concept in concepts:
                results = [e.encoders[encoder].concepts[concept] for e in runs]
                for model, side in ((UNIMMUNIZED, "without"), (method, "with")):
                    models.setdefault(model, {}).setdefault(encoder, {})[concept] = _drawing(results, side)
    for model, by_encoder in (bystanders or {}).items():
        for encoder, by_concept in by_encoder.items():
            models.setdefault(model, {}).setdefault(encoder, {}).update(by_concept)
    return BeforeAttack(plain[0] if plain else None, models) if models else None


def _drawing(results: list[ConceptResult], side: Condition) -> Drawing:
    rates = [r.success_rate(side) for r in results]
    return Drawing(mean(r.similarity(side)[0] for r in results), mean(r[0] if r else None for r in rates))
