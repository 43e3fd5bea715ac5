"""Typed results of an evaluation, and their JSON form (the `results` of an evaluation's `metrics.json`).

One [`Evaluation`] holds what was compared ([`RunPair`] by concept, the reference folders, the non-targets) and, per
encoder, an [`EncoderResult`]: each concept's curves ([`ConceptResult`]) and every registered metric's value.
Undefined numbers are NaN here and `null` in JSON; `to_json` and `from_json` are the only places that know the keys.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mima.evaluate.metrics import Condition, Metric


@dataclass(frozen=True)
class ConceptResult:
    """One concept's curves for one encoder: similarity S(t), SGR(t) and, where the encoder knows the concept, the
    attack-success rate, at the attack steps both runs sampled (step 0 included).

    Args:
        attack (`str`): The attack method of both runs.
        target (`bool`): Whether the concept was immunized against (else a non-target, kept learnable).
        steps (`list[int]`): Attack steps t.
        s_without, s_with (`list[float]`): S(t) of the attacked model without and with immunization.
        sgr (`list[float]`): SGR(t); NaN where S_without(t) = 0.
        rsgr (`float`): The concept's term of MRSGR; NaN when the attack gained no similarity.
        asr_without, asr_with (`list[float]`, *optional*): Attack-success rate at each step; None when the encoder
            does not classify this concept.
    """

    attack: str
    target: bool
    steps: list[int]
    s_without: list[float]
    s_with: list[float]
    sgr: list[float]
    rsgr: float
    asr_without: list[float] | None = None
    asr_with: list[float] | None = None

    def similarity(self, side: Condition) -> list[float]:
        """S(t) of the attacked model without or with immunization."""
        return self.s_without if side == "without" else self.s_with

    def success_rate(self, side: Condition) -> list[float] | None:
        """The attack-success rate at each step without or with immunization; None when not known."""
        return self.asr_without if side == "without" else self.asr_with

    def to_json(self) -> dict[str, Any]:
        return _json_safe({
            "attack": self.attack, "target": self.target, "steps": self.steps, "s_without": self.s_without,
            "s_with": self.s_with, "sgr": self.sgr, "rsgr": self.rsgr, "asr_without": self.asr_without,
            "asr_with": self.asr_with,
        })

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConceptResult:
        return cls(
            data["attack"], data["target"], list(data["steps"]), _floats(data["s_without"]), _floats(data["s_with"]),
            _floats(data["sgr"]), _float(data["rsgr"]), _optional_floats(data["asr_without"]),
            _optional_floats(data["asr_with"]),
        )


@dataclass(frozen=True)
class EncoderResult:
    """Everything one encoder measured: each concept's curves and the value of every registered metric.

    Args:
        concepts (`dict[str, ConceptResult]`): By concept name.
        metrics (`dict[str, float]`): By metric name as registered in `mima.evaluate.metrics.metrics` (`mima ls
            metrics`); NaN when undefined.
    """

    concepts: dict[str, ConceptResult]
    metrics: dict[str, float]

    def value(self, metric: type[Metric]) -> float:
        """The value of `metric` (e.g. [`~mima.evaluate.metrics.MSGR`]); NaN when undefined."""
        return self.metrics[metric.name]

    def to_json(self) -> dict[str, Any]:
        concepts = {name: result.to_json() for name, result in self.concepts.items()}
        return {"concepts": concepts, **_json_safe(self.metrics)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncoderResult:
        concepts = {name: ConceptResult.from_json(block) for name, block in data["concepts"].items()}
        return cls(concepts, {name: _float(value) for name, value in data.items() if name != "concepts"})


@dataclass(frozen=True)
class RunPair:
    """The two attack runs compared for one concept and the steps both sampled."""

    without: str
    immunized: str
    steps: list[int]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: the inputs compared and each encoder's result (see [`~mima.evaluate.evaluate_runs`]).

    Args:
        pairs (`dict[str, RunPair]`): By concept.
        references (`dict[str, str]`): Reference image folder R_n by concept.
        non_targets (`list[str]`): Concepts not immunized against (sorted).
        encoders (`dict[str, EncoderResult]`): By encoder spec.
    """

    pairs: dict[str, RunPair]
    references: dict[str, str]
    non_targets: list[str]
    encoders: dict[str, EncoderResult]

    def to_json(self) -> dict[str, Any]:
        """`{"inputs": {"pairs": {concept: {"without", "with", "steps"}}, "references", "non_targets"},
        "encoders": {spec: {"concepts": {concept: {...}}, metric: value, ...}}}`, JSON-safe (NaN is None)."""
        pairs = {c: {"without": p.without, "with": p.immunized, "steps": p.steps} for c, p in self.pairs.items()}
        return {
            "inputs": {"pairs": pairs, "references": self.references, "non_targets": self.non_targets},
            "encoders": {spec: result.to_json() for spec, result in self.encoders.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evaluation:
        inputs = data["inputs"]
        pairs = {c: RunPair(p["without"], p["with"], list(p["steps"])) for c, p in inputs["pairs"].items()}
        encoders = {spec: EncoderResult.from_json(block) for spec, block in data["encoders"].items()}
        return cls(pairs, dict(inputs["references"]), list(inputs["non_targets"]), encoders)


def read_evaluation(path: str | os.PathLike[str]) -> Evaluation:
    """The [`Evaluation`] in a `metrics.json` of `mima evaluate` (or under a benchmark's `evaluations/`)."""
    return Evaluation.from_json(json.loads(Path(path).read_text(encoding="utf-8"))["results"])


def _json_safe(value: Any) -> Any:
    """Undefined floats (NaN, inf) become `None`; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _floats(values: list[float | None]) -> list[float]:
    return [_float(v) for v in values]


def _optional_floats(values: list[float | None] | None) -> list[float] | None:
    return None if values is None else _floats(values)
