import random

import numpy as np
import pytest
import torch

from mima.errors import ConfigError
from mima.utils.device import (
    free_memory,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)


def draw() -> tuple[float, float, float, list[float]]:
    return random.random(), random.gauss(0, 1), float(np.random.standard_normal()), torch.randn(4).tolist()


def test_seed_everything_is_reproducible():
    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


def test_rng_state_round_trip(tmp_path):
    seed_everything(0)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's generator
    np.random.standard_normal()  # and a cached one in NumPy's
    state = rng_state()
    expected = draw()
    draw()
    set_rng_state(state)
    assert draw() == expected

    path = tmp_path / "rng.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    draw()
    set_rng_state(loaded)
    assert draw() == expected


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert isinstance(resolve_device(), torch.device)
    assert resolve_device("auto") == resolve_device(None)
    with pytest.raises(ConfigError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    with pytest.raises(ConfigError, match="invalid dtype 'fp8'; expected one of fp32, fp16, bf16"):
        resolve_dtype("fp8")


def test_memory_helpers_on_cpu():
    free_memory()
    reset_peak_memory("cpu")
    peak = peak_memory_bytes(torch.device("cpu"))
    assert peak is None or peak > 1 << 20
    assert peak_memory_bytes("meta") is None
