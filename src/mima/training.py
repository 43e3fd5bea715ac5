"""The one training-loop skeleton that immunization and every attack share.

It owns what the two loops have in common: the per-step generators that make resume exact, precision (autocast
around the forward pass, loss scaling for fp16), the NaN guard, gradient clipping, the optimizer step, the
progress bar and atomic checkpoints. Placement is decided before the loop (the models, the encoded data and any
adapter live on `placement.device`); the loop only draws each step's randomness on the CPU and lets the data move.
Plain torch rather than accelerate: a run uses one device, and accelerate's `prepare` adds nothing there that
this loop does not already do in a few lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mima.errors import ConfigError, TrainingError
from mima.utils.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from mima.utils.device import Placement, step_generator


@dataclass(frozen=True)
class LoopSettings:
    """How long a loop runs, how often it checkpoints, and how it names its steps in the log and in errors."""

    steps: int
    save_every: int
    seed: int
    grad_clip: float  # max global gradient norm (0: off)
    checkpoint_dir: Path
    desc: str  # progress-bar label
    loss_name: str = "loss"  # the log key of the minimised quantity
    step_name: str = "step"  # how an error names a step, e.g. "outer step"
    show_progress: bool = True  # False on all but the main process of a distributed run: one bar on the terminal


class TrainingLoop:
    """Minimise a loss over `params` with `optimizer` for `settings.steps` steps; resumable bit for bit.

    Subclasses give `loss(generator)`, run under autocast and differentiated by the loop, or override `gradients`
    when they compute their own (as a meta-gradient taken concept by concept does). `at_checkpoint()` is called at
    step 0 of a fresh run, at every checkpoint and at the last step (attacks write their evaluation samples there).
    """

    def __init__(self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, settings: LoopSettings,
                 placement: Placement) -> None:
        self.params, self.optimizer, self.settings, self.placement = params, optimizer, settings, placement
        self.scaler = placement.grad_scaler()
        self.step, self.log = 0, []

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise at this step (every random draw from `generator`), and extra values to log."""
        raise NotImplementedError(f"{type(self).__name__} defines neither `loss` nor `gradients`")

    def gradients(self, generator: torch.Generator) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
        """The minimised value, its gradient for each of `params` this step moves (loss-scaled under fp16; one left
        out keeps its value and optimizer state) and extra values to log.

        By default `loss` under autocast, differentiated outside it. autograd.grad rather than backward: only the
        trained parameters get gradients, not the graph's other leaves (the simulated attacker's copies)."""
        with self.placement.autocast():
            loss, logs = self.loss(generator)
        self.check_finite(loss.item())
        grads = torch.autograd.grad(self.scaler.scale(loss), list(self.params.values()))
        return loss.item(), dict(zip(self.params, grads, strict=True)), logs

    def check_finite(self, value: float) -> None:
        """The NaN guard: stop with the step named, before the optimizer touches the weights."""
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite {self.settings.loss_name} {value} at {self.settings.step_name} {self.step + 1}; "
                f"the last checkpoint in '{self.settings.checkpoint_dir}' is intact (lower the learning rate)"
            )

    def at_checkpoint(self) -> None:
        """Called at step 0 of a fresh run, at every checkpoint and at the last step (nothing by default)."""
        return None

    def run(self, resume: bool) -> list[dict[str, float]]:
        settings, folder = self.settings, self.settings.checkpoint_dir
        if resume:
            self.step, self.log = load_checkpoint(folder, self.params, self.optimizer, self.scaler)
        elif has_checkpoint(folder):
            raise ConfigError(f"'{folder}' holds an unfinished run; pass --resume or use another --out")
        if self.step == 0:
            self.at_checkpoint()
        quiet = {} if settings.show_progress else {"disable": True}  # unset: a worker's TQDM_DISABLE still holds
        with tqdm(total=settings.steps, initial=self.step, desc=settings.desc, **quiet) as bar:
            while self.step < settings.steps:
                logs = self.train_step()
                self.step += 1
                self.log.append({"step": self.step, **logs})
                bar.update(1)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items()})
                if self.step % settings.save_every == 0 or self.step == settings.steps:
                    self.at_checkpoint()
                if self.step % settings.save_every == 0 and self.step < settings.steps:
                    self.save_checkpoint()
        return self.log

    def save_checkpoint(self) -> None:
        save_checkpoint(self.settings.checkpoint_dir, self.params, self.optimizer, self.step, self.log, self.scaler)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this step's generator; returns the values to log."""
        value, grads, logs = self.gradients(step_generator(self.settings.seed, self.step))
        for name, grad in grads.items():
            self.params[name].grad = grad.to(self.params[name].dtype)
        self.scaler.unscale_(self.optimizer)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed; the scale then shrinks
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {self.settings.loss_name: value, **logs}
