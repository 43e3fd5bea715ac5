"""Devices, precision, seeding, memory and the per-step random generators.

This is the only module that names accelerator backends; everything else asks it.
"""

from __future__ import annotations

import gc
import os
import random
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError

MixedPrecision = Literal["no", "fp16", "bf16"]
_COMPUTE_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    """Turn a device name into a `torch.device`, checking that its backend is here (before any model loads).

    Args:
        name (`str`, *optional*, defaults to `"auto"`):
            `"auto"`/`None` picks CUDA, then MPS, then CPU; otherwise `"cpu"`, `"cuda"`, `"cuda:N"` or `"mps"`.

    Raises:
        [`~mima.errors.ConfigError`]: If the name is invalid or its backend is not available.
    """
    if name is None or name == "auto":
        if torch.cuda.is_available():  # one GPU per process under torchrun / accelerate launch
            index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
            return torch.device("cuda", index % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"invalid device '{name}'; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here (try --device auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device '{name}' requested but MPS is not available here (try --device auto or cpu)")
    return device


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for processes that compute on `device`: NCCL on CUDA (with `device` made
    current, which NCCL's object collectives use), gloo elsewhere."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return "nccl"
    return "gloo"


def solve_device(device: torch.device) -> torch.device:
    """Where float64 linear algebra (the Merge and erase solves) runs: `device` itself, except MPS, which has no
    float64, so the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def native_precision(device: torch.device) -> MixedPrecision:
    """bf16 where `device` computes it natively (a GPU with bfloat16 support; a CPU whose oneDNN has bf16 kernels,
    AVX-512 or AMX), else no: on an AVX2-only CPU bf16 is emulated (measured: the toy's samples 10x slower than in
    float32)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    return "no"


@dataclass(frozen=True)
class Placement:
    """Where a run computes and in which precision: models keep float32 weights (the master copy of what is
    trained); `autocast()` runs their forward passes in `dtype`; fp16 adds loss scaling (`grad_scaler()`)."""

    device: torch.device
    mixed_precision: MixedPrecision = "no"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the forward passes."""
        return _COMPUTE_DTYPES[self.mixed_precision]

    def autocast(self) -> AbstractContextManager:
        """Forward passes in `dtype` (float32 ops, such as the float64 Merge, stay as they are)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed_precision != "no")

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Dynamic loss scaling, enabled only for fp16, whose small gradients would otherwise flush to zero."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mixed_precision == "fp16")

    def record(self) -> dict[str, str | float | None]:
        """What a run's JSON record says about where it ran, with the peak memory so far (`peak_memory_bytes`)."""
        dtype = str(self.dtype).removeprefix("torch.")
        peak = peak_memory_bytes(self.device)
        return {"device": str(self.device), "mixed_precision": self.mixed_precision, "dtype": dtype,
                "peak_memory_mib": None if peak is None else round(peak / 2**20, 1)}

    def describe(self) -> str:
        precision = "float32" if self.mixed_precision == "no" else f"{self.mixed_precision} autocast, float32 weights"
        return f"device {self.device} ({precision})"


def resolve_placement(
    device: str | None, mixed_precision: MixedPrecision = "no", *, loss_scaling: bool = True,
    flag: str = "--mixed-precision",
) -> Placement:
    """Check a `--device` / `--mixed-precision` pair and return its [`Placement`].

    fp16 is refused on the CPU (it would be slower than float32 there and less exact than bf16) and where the
    caller cannot scale its losses (`loss_scaling=False`: immunization, whose simulated attacker takes unscaled
    gradients inside the graph); bf16 is the choice in both cases.

    Args:
        device (`str`, *optional*): see [`resolve_device`].
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`.
        loss_scaling (`bool`, defaults to `True`): whether the caller applies [`Placement.grad_scaler`].
        flag (`str`, defaults to `"--mixed-precision"`): the option an error names.

    Raises:
        [`~mima.errors.ConfigError`]: for an unavailable device or an unsupported precision there.
    """
    if mixed_precision not in _COMPUTE_DTYPES:
        raise ConfigError(f"invalid mixed precision '{mixed_precision}'; expected one of {', '.join(_COMPUTE_DTYPES)}")
    resolved = resolve_device(device)
    if mixed_precision == "fp16" and resolved.type == "cpu":
        raise ConfigError(f"{flag} fp16 needs a GPU; on the CPU use bf16 (or no)")
    if mixed_precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{flag} bf16: {resolved} has no bfloat16 support; use no (or fp16 for attacks)")
    if mixed_precision == "fp16" and not loss_scaling:
        raise ConfigError(f"{flag} fp16 is not supported for immunization (its inner gradients are "
                          "not loss-scaled); use bf16")
    return Placement(resolved, mixed_precision)


def free_memory() -> None:
    """Run the garbage collector and release cached accelerator memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _mps_available():
        torch.mps.empty_cache()


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak memory used on `device`, in bytes.

    For CUDA this is the peak allocated by torch (since the process started, or since
    `torch.cuda.reset_peak_memory_stats`); for the CPU it is the process's peak resident set size since it started.

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


class GraphBytes:
    """While active, counts the bytes of the tensors autograd saves for a backward, each storage once and none of
    `ignore`'s (which exist anyway, e.g. the weights): what a graph adds to memory (`bytes`)."""

    def __init__(self, ignore: Iterable[torch.Tensor]) -> None:
        self.ignored = {tensor.untyped_storage().data_ptr() for tensor in ignore}
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.ignored:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> GraphBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on `device` has run (GPUs run it asynchronously), e.g. before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def start_peak_memory(device: torch.device | str) -> int | None:
    """Restart `peak_memory_bytes`'s count on a GPU and return the bytes allocated now, so that the peak of what
    follows, less this, is what it added; `None` where the peak cannot be restarted (the CPU's RSS peak cannot)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of training step `step`: batches, noise and timesteps depend only on (seed, step),
    so a resumed run draws exactly what an uninterrupted one would.

    It stays on the CPU on every device: draws are made there and moved (a few small tensors per step), so the
    same seed gives the same batches, noise and timesteps on the CPU, CUDA and MPS, which device generators,
    each with its own algorithm, would not.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
