"""Training checkpoints as a directory, written atomically: named tensors (safetensors), optimizer state, the fp16
loss scale when there is one, progress (step and log) and the settings of the run that made them. A crash leaves
either the previous checkpoint or the new one, never half of one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mima.errors import ConfigError, ModelError
from mima.utils.io import (
    atomic_directory,
    atomic_write_text,
    load_tensors,
    load_torch_state,
    save_tensors,
    save_torch_state,
)

PROGRESS_FILE = "progress.json"
SETTINGS_FILE = "settings.json"
SCALER_FILE = "grad_scaler.pt"
STATE_FILE = "state.safetensors"


def has_checkpoint(directory: Path) -> bool:
    return (directory / PROGRESS_FILE).is_file()


def write_settings(directory: Path, settings: Mapping[str, Any]) -> None:
    """Record the settings of the run about to fill `directory`; every later checkpoint carries them forward."""
    atomic_write_text(directory / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_settings(directory: Path) -> dict[str, Any] | None:
    """The settings recorded with the checkpoint in `directory`, or None if it records none."""
    path = directory / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"the checkpoint's settings '{path}' are unreadable: {e}") from None


def save_checkpoint(
    directory: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int, log: list,
    scaler: torch.amp.GradScaler | None = None, state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the checkpoint; `state`: other named tensors the run needs to resume exactly (`load_state`)."""
    with atomic_directory(directory) as tmp:
        if (directory / SETTINGS_FILE).is_file():
            shutil.copy2(directory / SETTINGS_FILE, tmp / SETTINGS_FILE)
        save_tensors(tmp / "trainable.safetensors", {name: t.detach() for name, t in tensors.items()})
        if state:
            save_tensors(tmp / STATE_FILE, {name: t.detach().contiguous() for name, t in state.items()})
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
    returns (step, log).

    Raises:
        [`~mima.errors.ConfigError`]: If there is no checkpoint.
        [`~mima.errors.ModelError`]: If it holds other tensors than `tensors` (it was made by another kind of run).
    """
    if not has_checkpoint(directory):
        raise ConfigError(f"--resume: no checkpoint in '{directory}'")
    saved = load_tensors(directory / "trainable.safetensors")
    mismatch = sorted(set(saved) ^ set(tensors)) or [
        name for name, tensor in tensors.items() if saved[name].shape != tensor.shape
    ]
    if mismatch:
        raise ModelError(f"the checkpoint in '{directory}' does not fit this run (tensor(s) {', '.join(mismatch[:3])} "
                         f"differ); it was made with other settings")
    for name, tensor in tensors.items():
        tensor.copy_(saved[name])
    try:
        optimizer.load_state_dict(load_torch_state(directory / "optimizer.pt"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"the optimizer state in '{directory}' does not fit this run: {e}") from None
    if scaler is not None and scaler.is_enabled() and (directory / SCALER_FILE).is_file():
        scaler.load_state_dict(load_torch_state(directory / SCALER_FILE))
    progress = json.loads((directory / PROGRESS_FILE).read_text())
    return progress["step"], progress["log"]


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """The `state` tensors `save_checkpoint` wrote in `directory` (none: empty)."""
    path = directory / STATE_FILE
    return load_tensors(path) if path.is_file() else {}
