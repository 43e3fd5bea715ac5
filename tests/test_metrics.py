import math

import pytest
import torch

from mima.errors import DataError
from mima.evaluate.metrics import (
    CurveSet,
    SimilarityCurve,
    metrics,
    mrsgr,
    msgr,
    relative_gap,
    sgr,
    similarity,
)
from mima.registry import UnknownNameError


def _pair(without: list[float], immunized: list[float], steps: tuple[int, ...] = (0, 1, 2)) -> dict:
    return {"without": SimilarityCurve(list(steps), without), "with": SimilarityCurve(list(steps), immunized)}


# Hand-computed example. SGR at t = 1, 2: a -> 0.5, 0.5; b -> 0.0, 0.5 (step 0 would add 1.0 and 0.5).
A = _pair([0.2, 0.6, 0.8], [0.0, 0.3, 0.4])
B = _pair([0.1, 0.5, 0.5], [0.05, 0.5, 0.25])
# The attack never raises the similarity: MRSGR's denominator is (0.5 - 0.5) + (0.4 - 0.5) < 0.
C = _pair([0.5, 0.5, 0.4], [0.5, 0.2, 0.1])


def test_similarity_is_mean_of_pairwise_dot_products():
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert similarity(gen, torch.tensor([[1.0, 0.0]])) == pytest.approx(0.5)
    assert similarity(gen, torch.tensor([[0.6, 0.8], [1.0, 0.0]])) == pytest.approx((0.6 + 0.8 + 1.0 + 0.0) / 4)
    with pytest.raises(DataError, match="expected features"):
        similarity(gen, torch.ones(1, 3))
    with pytest.raises(DataError, match="at least one"):
        similarity(gen, torch.ones(0, 2))


def test_sgr():
    assert sgr(0.8, 0.2) == pytest.approx(0.75)
    assert sgr(0.5, 0.6) == pytest.approx(-0.2)
    assert math.isnan(sgr(0.0, 0.3))


def test_msgr_pools_concepts_and_checkpoints_after_step_zero():
    assert msgr({"a": A}) == pytest.approx(50.0)
    assert msgr({"a": A, "b": B}) == pytest.approx(100 * (0.5 + 0.5 + 0.0 + 0.5) / 4)
    assert math.isnan(msgr({}))


def test_mrsgr_hand_computed():
    # a: ((0.6 - 0.3) + (0.8 - 0.4)) / ((0.6 - 0.2) + (0.8 - 0.2)) = 0.7
    # b: ((0.5 - 0.5) + (0.5 - 0.25)) / ((0.5 - 0.1) + (0.5 - 0.1)) = 0.3125
    assert relative_gap(A["without"], A["with"]) == pytest.approx(0.7)
    assert relative_gap(B["without"], B["with"]) == pytest.approx(0.3125)
    assert mrsgr({"a": A, "b": B}) == pytest.approx(100 * (0.7 + 0.3125) / 2)


def test_mrsgr_excludes_concepts_without_similarity_gain():
    assert math.isnan(relative_gap(C["without"], C["with"]))
    flat = _pair([0.5, 0.5, 0.5], [0.5, 0.1, 0.1])  # denominator exactly 0
    assert math.isnan(relative_gap(flat["without"], flat["with"]))
    assert mrsgr({"a": A, "c": C, "flat": flat}) == pytest.approx(70.0)
    assert math.isnan(mrsgr({"c": C}))


def test_curves_must_share_steps_and_be_well_formed():
    mismatched = {"without": SimilarityCurve([0, 1], [0.1, 0.2]), "with": SimilarityCurve([0, 2], [0.1, 0.2])}
    with pytest.raises(DataError, match="differ in steps"):
        msgr({"x": mismatched})
    with pytest.raises(DataError, match="one value per step"):
        SimilarityCurve([0, 1], [0.1])
    with pytest.raises(DataError, match="strictly increasing"):
        SimilarityCurve([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="no checkpoint at step 3"):
        SimilarityCurve([0, 1], [0.1, 0.2]).at(3)


def test_metric_registry_directions():
    assert metrics.names() == ["attack_success_rate", "mrsgr", "msgr", "non_target_sgr", "similarity_after_attack"]
    higher = {name: metrics.get(name).higher_is_better for name in metrics.names()}
    assert higher == {
        "msgr": True, "mrsgr": True, "similarity_after_attack": False, "attack_success_rate": False,
        "non_target_sgr": False,
    }
    assert metrics.get("msgr").info()["definition"] == "paper"
    assert metrics.get("mrsgr").info()["definition"] == "project"
    for name in metrics.names():
        info = metrics.get(name).info()
        assert set(info) == {"higher_is_better", "aggregation", "definition", "description"} and info["description"]
    with pytest.raises(UnknownNameError, match="did you mean 'msgr'"):
        metrics.get("msrg")


def test_metrics_on_a_curve_set():
    # "n" is a non-target whose immunized curve is ABOVE the base one: SGR -0.25 at both steps, reported as |.|.
    n = _pair([0.2, 0.4, 0.4], [0.2, 0.5, 0.5])
    success = {"a": _pair([0.0, 0.5, 1.0], [0.0, 0.0, 0.25])}
    curves = CurveSet({"a": A, "b": B, "n": n}, success, frozenset({"n"}))
    value = {name: metrics.get(name)().compute(curves) for name in metrics.names()}
    assert value["msgr"] == pytest.approx(37.5)
    assert value["mrsgr"] == pytest.approx(50.625)
    assert value["similarity_after_attack"] == pytest.approx((0.4 + 0.25) / 2)
    assert value["attack_success_rate"] == pytest.approx(0.25)
    assert value["non_target_sgr"] == pytest.approx(25.0)
    empty = CurveSet({"a": A})
    assert math.isnan(metrics.get("attack_success_rate")().compute(empty))
    assert math.isnan(metrics.get("non_target_sgr")().compute(empty))
