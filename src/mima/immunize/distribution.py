"""The distribution of simulated attackers (docs/method.md, "Distribution of attackers"): which attacker an outer
step samples, and, under the alternating schedule, where each attack starts.

Both are functions of (seed, step) and of what the run carried so far, never of the step's own generator, so a
single attacker draws nothing (its runs give the numbers they gave before distributions), every process of a
torchrun run samples the same attacker, and a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from mima.data.concepts import ConceptSpec
from mima.functional import Order, Params
from mima.immunize.attacker_spec import AttackerSpec
from mima.immunize.attackers import SimulatedAttacker, simulated_attackers
from mima.immunize.config import ImmunizeConfig
from mima.models.components import Components

# apart from the step's own generator (`step_generator`, seeded by (seed, step)) and from each other
_SAMPLING_STREAM, _TOKEN_STREAM, _RETAIN_SAMPLING_STREAM, _RETAIN_TOKEN_STREAM = 1, 2, 3, 4


def sample_attacker(weights: list[float], seed: int, step: int, stream: int = _SAMPLING_STREAM) -> int:
    """The index of the attacker outer step `step` (0-based) uses, drawn with probabilities proportional to
    `weights` from a generator seeded by (seed, step, stream) alone; with one attacker, 0 without any draw."""
    if len(weights) == 1:
        return 0
    seed_state = np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed_state))
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator).item())


class AttackerDistribution:
    """The run's simulated attackers (`ImmunizeConfig.attacker_specs()`), the one the current outer step sampled
    (`attacker`), and, under the alternating schedule (`persistent_attacker`), where each attack ended.

    A carried parameter that is also a UNet parameter (`full`'s S^l) is kept as its change from the weights its
    attack started from and added to the next step's weights: the attacker's progress and the immunizer's ascent
    then act on the same weights, as in the authors' alternating code. The attacker's own parameters (LoRA factors,
    a token embedding) are kept as they are. One entry per attacker and attacked concepts (a MIMA copy, the joint
    attack); the retain term's attacks start afresh (`afresh`), with an attacker of its own where
    `retain_attackers` lists some (`retain_index`, sampled as the step's attacker, from a stream of its own).
    """

    def __init__(self, config: ImmunizeConfig, components: Components, specs: list[ConceptSpec],
                 lower_names: list[str], retained: Sequence[ConceptSpec] = ()) -> None:
        self.seed, self.persistent = config.seed, config.persistent_attacker
        self.attackers = [_bound(spec, components, specs, lower_names, retained) for spec in config.attacker_specs()]
        self.retain_attackers = [_bound(spec, components, specs, lower_names, retained)
                                 for spec in config.retain_attacker_specs()]
        self.index, self.retain_index, self.retaining = 0, 0, False
        self.carried: dict[str, Params] = {}

    @property
    def attacker(self) -> SimulatedAttacker:
        """The step's attacker, or inside `afresh` the retain term's own where it has one."""
        if self.retaining and self.retain_attackers:
            return self.retain_attackers[self.retain_index]
        return self.attackers[self.index]

    def sample(self, step: int) -> dict[str, float]:
        """Choose outer step `step`'s attacker (`sample_attacker`) and, where it has `tokens`, its fresh token (each
        equally likely), and so the retain term's own; returns their indices to log (`attacker`, `token`,
        `retain_attacker`, `retain_token`)."""
        self.index, drawn = _draw(self.attackers, self.seed, step, "", _SAMPLING_STREAM, _TOKEN_STREAM)
        if self.retain_attackers:
            self.retain_index, more = _draw(self.retain_attackers, self.seed, step, "retain_",
                                            _RETAIN_SAMPLING_STREAM, _RETAIN_TOKEN_STREAM)
            drawn.update(more)
        return drawn

    def start(self, base: Params, concepts: Sequence[int | None], generator: torch.Generator) -> Params:
        """phi_0 of the attack on `concepts`: the attacker's fresh start (its draws always made), or where its attack
        on the same concepts ended at the last outer step."""
        phi = self.attacker.start(base, [c for c in concepts if c is not None], generator)
        carried = self.carried.get(self._key(concepts))
        if carried is None:
            return phi
        # in the fresh start's order (a checkpoint returns names sorted), so sums over parameters round alike
        # the attacker's own parameters as fresh leaves, as its fresh start gives them (the reference path steps
        # by differentiating them)
        return {n: base[n] + carried[n] if n in base else carried[n].detach().requires_grad_() for n in phi}

    def carry(self, concepts: Sequence[int | None], phi: Params, base: Params) -> None:
        """Under the alternating schedule, remember where the attack on `concepts` ended (`phi`)."""
        if key := self._key(concepts):
            self.carried[key] = {n: (p - base[n] if n in base else p).detach().clone() for n, p in phi.items()}

    @contextmanager
    def afresh(self, order: Order | None = None, lr_scale: float = 1.0) -> Iterator[None]:
        """Attacks inside start afresh and carry nothing (the retain term's, whatever concepts they name), are
        differentiated through in `order` where given, not the attacker's own, and step at `lr_scale` times its
        rate."""
        self.retaining = True
        attacker = self.attacker
        persistent, spec, lr = self.persistent, attacker.spec, attacker.lr
        self.persistent, attacker.lr = False, lr * lr_scale
        if order is not None:
            attacker.spec = dataclasses.replace(spec, order=order)
        try:
            yield
        finally:
            self.persistent, attacker.spec, attacker.lr, self.retaining = persistent, spec, lr, False

    def _key(self, concepts: Sequence[int | None]) -> str | None:
        if not self.persistent or None in concepts:
            return None
        return f"{self.index}:{','.join(map(str, concepts))}"

    def state(self) -> dict[str, torch.Tensor]:
        """Everything carried, as flat named tensors for a checkpoint (`key/parameter`)."""
        return {f"{key}/{name}": t for key, phi in self.carried.items() for name, t in phi.items()}

    def load(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore what `state` returned."""
        self.carried = {}
        for flat, tensor in state.items():
            key, name = flat.split("/", 1)
            self.carried.setdefault(key, {})[name] = tensor.to(device)


def _bound(spec: AttackerSpec, components: Components, specs: list[ConceptSpec], lower_names: list[str],
           retained: Sequence[ConceptSpec]) -> SimulatedAttacker:
    attacker = simulated_attackers.get(spec.kind)(spec)
    attacker.bind(components, specs, lower_names, retained)
    return attacker


def _draw(attackers: list[SimulatedAttacker], seed: int, step: int, prefix: str, stream: int,
          token_stream: int) -> tuple[int, dict[str, float]]:
    """`sample`'s draw from one list of attackers: the index, and what to log under `prefix`."""
    index = sample_attacker([attacker.spec.weight for attacker in attackers], seed, step, stream)
    drawn = {f"{prefix}attacker": index}
    if tokens := attackers[index].spec.tokens:
        drawn[f"{prefix}token"] = sample_attacker([1.0] * len(tokens), seed, step, token_stream)
        attackers[index].draw_token(drawn[f"{prefix}token"])
    return index, drawn
