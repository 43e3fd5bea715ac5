"""Training checkpoints as a directory, written atomically: named tensors (safetensors), optimizer state, the fp16
loss scale when there is one, and progress (step and log). A crash leaves either the previous checkpoint or the
new one, never half of one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mima.errors import ConfigError
from mima.utils.io import atomic_directory, load_tensors, load_torch_state, save_tensors, save_torch_state

PROGRESS_FILE = "progress.json"
SCALER_FILE = "grad_scaler.pt"


def has_checkpoint(directory: Path) -> bool:
    return (directory / PROGRESS_FILE).is_file()


def save_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int, log: list,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    with atomic_directory(directory) as tmp:
        save_tensors(tmp / "trainable.safetensors", {name: t.detach() for name, t in tensors.items()})
        save_torch_state(optimizer.state_dict(), tmp / "optimizer.pt")
        if scaler is not None and scaler.is_enabled():
            save_torch_state(scaler.state_dict(), tmp / SCALER_FILE)
        (tmp / PROGRESS_FILE).write_text(json.dumps({"step": step, "log": log}))


@torch.no_grad()
def load_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, list]:
    """Copy the saved values into `tensors` (in place, on their device) and restore `optimizer` (and `scaler`);
    returns (step, log)."""
    if not has_checkpoint(directory):
        raise ConfigError(f"--resume: no checkpoint in '{directory}'")
    saved = load_tensors(directory / "trainable.safetensors")
    for name, tensor in tensors.items():
        tensor.copy_(saved[name])
    optimizer.load_state_dict(load_torch_state(directory / "optimizer.pt"))
    if scaler is not None and scaler.is_enabled() and (directory / SCALER_FILE).is_file():
        scaler.load_state_dict(load_torch_state(directory / SCALER_FILE))
    progress = json.loads((directory / PROGRESS_FILE).read_text())
    return progress["step"], progress["log"]
