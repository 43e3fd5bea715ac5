"""The check the meta-gradient tests share: the concept-by-concept gradient against autograd of the reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

FINITE_DIFFERENCE_RTOL = 1e-2
"""How close the finite-difference Hessian-vector product brings the meta-gradient to the exact one, in relative L2
norm (measured: up to 5e-3 in float64 on the test fixture, up to 4e-3 in float32 on the toy and SD-shaped models)."""


def assert_gradients_equal_the_objectives(immunizer, batches: Callable[[], dict], seed: int) -> tuple[float, dict]:
    """`immunizer.gradients` (concept by concept, through `unroll` / `unrolled_vjp` and the Merge's pull-back) gives
    the value, logs and gradient of differentiating its one-expression `objective`, on the same batches (`batches()`
    draws them afresh) and the same draws (`seed`): exactly with `hvp: exact` (the immunizer's setting), and within
    `FINITE_DIFFERENCE_RTOL` with `hvp: finite-difference`. Returns the objective's value and the gradients."""
    assert immunizer.config.hvp == "exact"
    objective, logs = immunizer.objective(batches(), torch.Generator().manual_seed(seed))
    params = immunizer.trainable_parameters()
    expected = dict(zip(params, torch.autograd.grad(objective, list(params.values())), strict=True))
    value, grads, step_logs = immunizer.gradients(batches(), torch.Generator().manual_seed(seed))
    assert value == pytest.approx(objective.item(), rel=1e-10)
    assert step_logs == pytest.approx(logs, rel=1e-10)
    assert set(grads) == set(expected)
    for name in expected:  # (float64 sums in another order differ by up to ~1e-10 of the gradient's scale)
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-8, atol=1e-9 * scale + 1e-15)
    assert_finite_differences_close(immunizer, batches, seed, value, expected)
    return objective.item(), grads


def assert_finite_differences_close(
    immunizer, batches: Callable[[], dict], seed: int, value: float, exact: dict
) -> None:
    """With `hvp: finite-difference`, the same value and a gradient within `FINITE_DIFFERENCE_RTOL` of `exact`."""
    exact_config = immunizer.config
    immunizer.config = exact_config.with_overrides(hvp="finite-difference")
    try:
        difference_value, grads, _ = immunizer.gradients(batches(), torch.Generator().manual_seed(seed))
    finally:
        immunizer.config = exact_config
    assert difference_value == pytest.approx(value, rel=1e-10)
    names = sorted(exact)
    approx, reference = (torch.cat([g[n].flatten() for n in names]) for g in (grads, exact))
    assert (approx - reference).norm() <= FINITE_DIFFERENCE_RTOL * reference.norm()
