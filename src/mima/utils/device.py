"""Devices, dtypes, seeding, memory and RNG state.

This is the only module that names accelerator backends; everything else asks it.
"""

from __future__ import annotations

import gc
import random
import sys
from typing import Any, Literal

import numpy as np
import torch

from ..errors import ConfigError

_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (all devices).

    Args:
        seed (`int`):
            The seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(name: str | None = None) -> torch.device:
    """Turn a device name into a `torch.device`.

    Args:
        name (`str`, *optional*, defaults to `"auto"`):
            `"auto"`/`None` picks CUDA, then MPS, then CPU; anything else is passed to `torch.device`.

    Raises:
        [`~mima.errors.ConfigError`]: If the name is invalid or its backend is not available.
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device '{name}'; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device '{name}' requested but MPS is not available")
    return device


def resolve_dtype(name: Literal["fp32", "fp16", "bf16"]) -> torch.dtype:
    """Map a short dtype name to a `torch.dtype`.

    Args:
        name (`str`):
            One of `"fp32"`, `"fp16"`, `"bf16"`.

    Raises:
        [`~mima.errors.ConfigError`]: For any other name.
    """
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"invalid dtype '{name}'; expected one of {', '.join(_DTYPES)}") from None


def free_memory() -> None:
    """Run the garbage collector and release cached accelerator memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _mps_available():
        torch.mps.empty_cache()


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak memory used on `device`, in bytes.

    For CUDA this is the peak allocated by torch since the last [`reset_peak_memory`]; for the CPU it is the
    process's peak resident set size since it started (it cannot be reset).

    Args:
        device (`torch.device` or `str`):
            The device to query.

    Returns:
        `int` or `None`: `None` where the backend offers no peak measure.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "cpu":
        try:
            import resource
        except ImportError:  # Windows
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS but in KiB on Linux and the BSDs.
        return peak if sys.platform == "darwin" else peak * 1024
    return None


def reset_peak_memory(device: torch.device | str) -> None:
    """Reset the peak measured by [`peak_memory_bytes`] where the backend allows it (CUDA); a no-op elsewhere.

    Args:
        device (`torch.device` or `str`):
            The device whose peak to reset.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rng_state() -> dict[str, Any]:
    """Capture the state of Python's, NumPy's and torch's global random generators.

    The result holds only tensors and plain Python values, so it survives `torch.save` and
    `torch.load(..., weights_only=True)`.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states captured by [`rng_state`].

    Accelerator states are restored only when present in `state` and the backend is available here.

    Args:
        state (`dict`):
            The output of [`rng_state`], possibly after a `torch.save`/`torch.load` round trip.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"].cpu())


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step `step`: batches, noise and timesteps depend only on (seed, step),
    so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
