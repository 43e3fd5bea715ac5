"""The check the meta-gradient tests share: the concept-by-concept gradient against autograd of the reference."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def assert_gradients_equal_the_objectives(immunizer, batches: Callable[[], dict], seed: int) -> tuple[float, dict]:
    """`immunizer.gradients` (concept by concept, through `unroll` / `unrolled_vjp` and the Merge's pull-back) gives
    the value, logs and gradient of differentiating its one-expression `objective`, on the same batches (`batches()`
    draws them afresh) and the same draws (`seed`). Returns the objective's value and the gradients."""
    objective, logs = immunizer.objective(batches(), torch.Generator().manual_seed(seed))
    params = immunizer.trainable_parameters()
    expected = dict(zip(params, torch.autograd.grad(objective, list(params.values())), strict=True))
    value, grads, step_logs = immunizer.gradients(batches(), torch.Generator().manual_seed(seed))
    assert value == pytest.approx(objective.item(), rel=1e-10)
    assert step_logs == pytest.approx(logs, rel=1e-10)
    assert set(grads) == set(expected)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-8, atol=1e-12)
    return objective.item(), grads
