"""How each protected concept's upper loss counts in the ascent: contrasted with its class prompt's (`upper_contrast`),
capped (`upper_cap`) and weighted toward the targets the ascent has raised least (`upper_focus`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mima.functional import Params
from mima.immunize.base import Immunizer
from mima.models.encoding import Batch

DECAY = 0.9  # about ten outer steps, so that the one draw behind each step's upper loss does not steer the weights


class Focus:
    """Each protected concept's weight in the ascent's mean: N softmax(-r / temperature), mean 1, where r is the rise
    of the concept's counted upper loss since the first outer step, averaged over the steps so far (exponentially);
    so the ascent goes to the targets it has raised least, as group DRO (Sagawa et al., 2020) weights the groups with
    the highest loss. Uniform with temperature 0 (off) and until the first step ends."""

    state_names = ("focus/first", "focus/average")

    def __init__(self, names: Sequence[str], temperature: float) -> None:
        self.names, self.temperature = list(names), temperature
        self.first: torch.Tensor | None = None
        self.average: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:
        """The weights of the coming step (float64, on the CPU), one per name."""
        if self.first is None or self.average is None:
            return torch.ones(len(self.names), dtype=torch.float64)
        return len(self.names) * torch.softmax(-(self.average - self.first) / self.temperature, dim=0)

    def logs(self) -> dict[str, float]:
        """The weights of the coming step as `focus/NAME` (nothing when off)."""
        if not self.temperature:
            return {}
        return {f"focus/{name}": weight for name, weight in zip(self.names, self.weights().tolist(), strict=True)}

    def update(self, logs: dict[str, float]) -> None:
        """Count a finished outer step's upper losses (its logs' `upper/NAME`)."""
        if not self.temperature:
            return
        losses = torch.tensor([logs[f"upper/{name}"] for name in self.names], dtype=torch.float64)
        self.first = losses if self.first is None else self.first
        self.average = losses.clone() if self.average is None else DECAY * self.average + (1 - DECAY) * losses

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of it, named `state_names` (nothing until the first step ends)."""
        if self.first is None or self.average is None:
            return {}
        return dict(zip(self.state_names, (self.first, self.average), strict=True))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned (other names in `state` are not its own)."""
        self.first, self.average = (state.get(name) for name in self.state_names)


class AscentTerms(Immunizer):
    """The ascent's side of the bi-level objective. Uses the bi-level machinery of `BilevelImmunizer` (its
    `fused_losses`), its one subclass, which sets `focus`."""

    focus: Focus

    def end_step(self, logs: dict[str, float]) -> None:
        self.focus.update(logs)

    def contrasted_losses(
        self, weights: Params, conditioning: Sequence[Params], batches: Sequence[Batch],
        draws: Sequence[tuple[torch.Tensor, torch.Tensor]], concepts: Sequence[int | None], contrast: float,
        teacher: bool = False,
    ) -> torch.Tensor:
        """`fused_losses`, each less `contrast` times the loss of its images under their class prompt (the prior's
        conditioning) at the same noise and timesteps: what the concept's prompt adds to denoising them."""
        if not contrast:
            return self.fused_losses(weights, conditioning, batches, draws, concepts, teacher)
        classed = [Batch(batch.latents, batch.prior[1]) for batch in batches]
        both = self.fused_losses(weights, [*conditioning, *conditioning], [*batches, *classed], [*draws, *draws],
                                 [*concepts, *[None] * len(batches)], teacher)
        return both[:len(batches)] - contrast * both[len(batches):]

    def counted(self, loss: torch.Tensor) -> torch.Tensor:
        """An upper loss as the objective counts it: min(L, upper_cap) when the ascent is bounded (APDM, NeurIPS
        2025, argues the plain -L does not converge), so a concept above the cap pushes no further."""
        return torch.clamp(loss, max=self.config.upper_cap) if self.config.upper_cap > 0 else loss

    def weighted_mean(self, losses: Sequence[float]) -> float:
        """The ascent's mean of the concepts' counted upper losses, each weighted by `focus`."""
        weights = self.focus.weights().tolist()
        return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / len(losses)
