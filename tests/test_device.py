"""utils/device.py: device and precision resolution (refused before any model loads), seeding, memory helpers."""

import random

import numpy as np
import pytest
import torch

from mima.errors import ConfigError
from mima.utils.device import (
    Placement,
    free_memory,
    peak_memory_bytes,
    resolve_device,
    resolve_placement,
    seed_everything,
    solve_device,
    start_peak_memory,
    step_generator,
)

ACCELERATORS_HERE = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def draw() -> tuple[float, float, float, list[float]]:
    return random.random(), random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(4).tolist()


def test_seed_everything_is_reproducible():
    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


def test_step_generators_depend_only_on_seed_and_step():
    first = torch.randn(3, generator=step_generator(0, 5))
    assert torch.equal(first, torch.randn(3, generator=step_generator(0, 5)))
    assert not torch.equal(first, torch.randn(3, generator=step_generator(0, 6)))
    assert step_generator(0, 5).device == torch.device("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None)
    if not ACCELERATORS_HERE:
        assert resolve_device("auto") == torch.device("cpu")
    for name in ("gpu0", "meta", "cuda:x"):
        with pytest.raises(ConfigError, match=f"invalid device '{name}'"):
            resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_unavailable_cuda_is_refused(name):
    with pytest.raises(ConfigError, match=f"device '{name}' requested but CUDA is not available"):
        resolve_device(name)


@pytest.mark.skipif(hasattr(torch.backends, "mps") and torch.backends.mps.is_available(), reason="MPS is here")
def test_unavailable_mps_is_refused():
    with pytest.raises(ConfigError, match="device 'mps' requested but MPS is not available"):
        resolve_device("mps")


def test_precision_choices():
    cpu = resolve_placement("cpu", "bf16")
    record = cpu.record()
    assert cpu.dtype is torch.bfloat16 and record.pop("peak_memory_mib") > 1
    assert record == {"device": "cpu", "mixed_precision": "bf16", "dtype": "bfloat16"}
    with cpu.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
        assert (torch.ones(2, 2, dtype=torch.float64) @ torch.ones(2, 2, dtype=torch.float64)).dtype is torch.float64
    with resolve_placement("cpu", "no").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32
    assert not cpu.grad_scaler().is_enabled()
    assert Placement(torch.device("cpu"), "fp16").grad_scaler().is_enabled()
    with pytest.raises(ConfigError, match="fp16 needs a GPU; on the CPU use bf16"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(ConfigError, match="invalid mixed precision 'fp8'"):
        resolve_placement("cpu", "fp8")


def test_solve_device_keeps_float64_off_mps():
    assert solve_device(torch.device("cpu")) == torch.device("cpu")
    assert solve_device(torch.device("mps")) == torch.device("cpu")
    assert solve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_memory_helpers_on_cpu():
    free_memory()
    peak = peak_memory_bytes(torch.device("cpu"))
    assert peak is None or peak > 1 << 20
    assert peak_memory_bytes("meta") is None
    assert start_peak_memory("cpu") is None  # the RSS peak cannot be restarted
