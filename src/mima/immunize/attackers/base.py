"""The SimulatedAttacker interface and the `simulated_attackers` registry.

A simulated attacker trains parameters phi of its own (LoRA factors, a token embedding) or the UNet's own S^l
(`full`), starting each outer step from phi_0. At phi, the diffusion loss sees the UNet weights `weights` returns
and the text conditioning `hidden` returns. The bi-level immunizers run every kind through the same inner steps
(`mima.functional.unroll`, `unrolled_vjp`), so each kind works in first and second order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.config import AttackerSpec
from mima.models.components import Components
from mima.models.encoding import Batch
from mima.registry import Registry


class SimulatedAttacker(ABC):
    """One kind of simulated attacker, configured by an `AttackerSpec`.

    Its parameters are named apart from the UNet's (except `full`'s, which ARE the UNet's S^l), so that one dict
    `{**base, **phi}` holds everything a loss needs.
    """

    default_lr: ClassVar[float] = 1.0
    """The learning rate of its inner steps when the spec sets none."""

    def __init__(self, spec: AttackerSpec) -> None:
        self.spec = spec
        self.lr = self.default_lr if spec.lr is None else spec.lr

    @abstractmethod
    def prepare(self, components: Components, specs: list[ConceptSpec], lower_names: list[str]) -> None:
        """Bind to the model and the concepts (`lower_names`: S^l, the UNet parameters it may change)."""

    @abstractmethod
    def start(self, base: Params, concepts: list[int], generator: torch.Generator) -> Params:
        """phi_0 of an attack on `concepts` (concept indices; one for a MIMA copy, all for imma-joint), a function
        of `base` where it starts from it. Fresh parameters draw their initialisation from `generator`."""

    @abstractmethod
    def weights(self, params: Params) -> Params:
        """The UNet weights phi changes, from `{**base, **phi}` (differentiable in both): what the diffusion loss
        uses and what MIMA's Merge merges."""

    def hidden(self, params: Params, batch: Batch, concept: int | None) -> torch.Tensor:
        """The text conditioning of `batch` (of concept index `concept`, None for class images) at `params`:
        the batch's own, unless the attacker trains the text side."""
        return batch.hidden

    def kept(self, phi: Params) -> Params:
        """What of an adapted phi the pull-back (`pull_back`) and the upper loss (`hidden`) need; all of it unless
        the kind overrides this."""
        return phi

    def pull_back(self, base: Params, phi: Params, cotangent: Params, wrt: list[str]) -> tuple[Params, Params]:
        """From `cotangent` on `weights({**base, **phi})`: the cotangent reaching phi (`phi` as `kept` keeps it)
        and the gradient reaching the base parameters named `wrt` directly, not through phi (autograd through
        `weights`)."""
        base_leaves = {name: base[name].detach().requires_grad_() for name in wrt}
        phi_leaves = {name: p.detach().requires_grad_() for name, p in phi.items()}
        weights = self.weights({**base, **base_leaves, **phi_leaves})
        inputs = [*phi_leaves.values(), *base_leaves.values()]
        grads = torch.autograd.grad([weights[n] for n in weights], inputs, [cotangent[n] for n in weights],
                                    allow_unused=True)
        named = dict(zip([*phi_leaves, *base_leaves], grads, strict=True))
        return ({n: named[n] if named[n] is not None else torch.zeros_like(p) for n, p in phi_leaves.items()},
                {n: named[n] for n in base_leaves if named[n] is not None})


simulated_attackers: Registry[SimulatedAttacker] = Registry("simulated attacker", SimulatedAttacker)
