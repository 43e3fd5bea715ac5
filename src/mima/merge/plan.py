"""MergePlan: everything the Merge needs that does not change during immunization, computed once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mima.merge.closed_form import FactorizedGram, apply_merge, factorize_gram, merge_solution, merged_values
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names
from mima.utils.device import solve_device

Params = dict[str, torch.Tensor]


@torch.no_grad()
def prompt_token_embeddings(components: Components, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs of each prompt's tokens after the start token, up to its first end token (rows, d)."""
    tokens, hidden = components.token_features(prompts)
    hidden = hidden.float().cpu()  # (B, T, d)
    rows = []
    for ids, states in zip(tokens, hidden, strict=True):
        end = int((ids == components.tokenizer.eos_token_id).nonzero()[0])
        rows.append(states[1 : end + 1])
    return torch.cat(rows)


def unique_rows(rows: torch.Tensor, decimals: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with duplicates removed (compared after rounding), and each input row's index among them."""
    _, inverse = torch.unique(rows.round(decimals=decimals), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(rows.shape[0]), reduce="amin")
    return rows[first], inverse


def regularizer(components: Components, caption_bank: list[str], ridge: float = 1e-3) -> FactorizedGram:
    """M + ridge I factorised, M = C_reg^T C_reg of the caption bank's token features (deduplicated), where the
    Merge solves."""
    reg_bank = unique_rows(prompt_token_embeddings(components, caption_bank))[0]  # (s, d)
    return factorize_gram(reg_bank.to(solve_device(components.unet.device)), ridge)


@dataclass
class MergePlan:
    """Targets C_n per concept, the deduplicated stack C, and the factorised regulariser M + ridge I.

    They live on the UNet's device, except on MPS (no float64): there they stay on the CPU, and each K/V weight
    goes there for the float64 solve and comes back. `merge` maps the base parameters and N adapted copies to the
    merged parameters: cross-attention keys and values in closed form (docs/method.md, "The Merge"), every other
    adapted parameter averaged over concepts.
    """

    key_value_names: frozenset[str]
    concept_targets: list[torch.Tensor]  # N x (m_n, d)
    targets: torch.Tensor  # (m, d) float64, deduplicated over all concepts
    row_index: torch.Tensor  # (sum m_n,), row of `targets` for each stacked concept row
    gram: FactorizedGram
    solution: torch.Tensor  # (m, d) float64, X = (C M^-1 C^T)^-1 C M^-1: the same for every layer and step

    @classmethod
    def build(
        cls, components: Components, concept_prompts: list[list[str]], caption_bank: list[str] | FactorizedGram,
        ridge: float = 1e-3,
    ) -> MergePlan:
        """The plan keeping each concept's copy on its `concept_prompts`' tokens, regularised by `caption_bank`'s
        (or by its `regularizer`, computed once for several plans)."""
        concept_targets = [unique_rows(prompt_token_embeddings(components, p))[0] for p in concept_prompts]
        targets, row_index = unique_rows(torch.cat(concept_targets))
        device = solve_device(components.unet.device)
        gram = caption_bank if isinstance(caption_bank, FactorizedGram) else regularizer(components, caption_bank,
                                                                                          ridge)
        targets = targets.to(device, torch.float64)
        return cls(
            key_value_names=frozenset(key_value_parameter_names(components.unet)),
            concept_targets=[c.to(device, torch.float64) for c in concept_targets],
            targets=targets, row_index=row_index.to(device), gram=gram, solution=merge_solution(targets, gram),
        )

    def merge_key_value(self, w0: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """Closed-form merge of one K/V weight given each copy's outputs V_n = C_n W_n^T on its concept's tokens
        (float64, from `copy_values`): W_hat c = W_n c for concept n's tokens c (shared tokens: mean).

        Solved in float64 where the plan lives (autocast leaves float64 alone), returned in w0's device and dtype.
        """
        device = self.targets.device
        stacked = torch.cat([v.to(device) for v in values])  # (sum m_n, d_out)
        counts = torch.bincount(self.row_index, minlength=self.targets.shape[0]).to(stacked)[:, None]
        merged = torch.zeros(self.targets.shape[0], w0.shape[0], dtype=stacked.dtype, device=device)
        merged = merged.index_add(0, self.row_index, stacked) / counts  # (m, d_out)
        w0_64 = w0.to(device, torch.float64)
        return apply_merge(w0_64, self.targets, merged, self.solution).to(w0.device, w0.dtype)

    def copy_values(self, n: int, weight: torch.Tensor) -> torch.Tensor:
        """V_n = C_n W_n^T of concept n's adapted copy of a K/V weight, in float64 where the plan lives."""
        return merged_values([weight.to(self.targets.device, torch.float64)], [self.concept_targets[n]])[1]

    def inputs(self) -> MergeInputs:
        """An empty `MergeInputs` to add the adapted copies to, one at a time."""
        return MergeInputs(self)

    def merge(self, base: Params, adapted: list[Params]) -> Params:
        """Merge(theta'_1 .. theta'_N) over the adapted parameter names."""
        inputs = self.inputs()
        for copy in adapted:
            inputs.add(copy)
        return inputs.merge(base)


class MergeInputs:
    """What the Merge keeps of N adapted copies, added one at a time: the sum of every parameter it averages and,
    for each K/V weight, each copy's outputs on its own concept's tokens (V_n = C_n W_n^T, a few rows).

    So memory does not grow with N by a parameter copy per concept, and the Merge is linear in what is kept:
    the gradient reaching copy n is the mean's share for averaged parameters and dV_n^T C_n for K/V weights.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan, self.count = plan, 0
        self.sums: Params = {}
        self.values: dict[str, dict[int, torch.Tensor]] = {}  # K/V name -> concept index -> (m_n, d_out)

    def add(self, copy: Params, index: int | None = None) -> None:
        """Add concept `index`'s adapted copy (default: the next concept in the plan's order)."""
        index = self.count if index is None else index
        for name, tensor in copy.items():
            if name in self.plan.key_value_names:
                self.values.setdefault(name, {})[index] = self.plan.copy_values(index, tensor)  # (m_n, d_out)
            else:
                self.sums[name] = self.sums[name] + tensor if name in self.sums else tensor
        self.count += 1

    def names(self) -> list[str]:
        """The names of the parameters the copies changed (merged in closed form or averaged)."""
        return [*self.values, *self.sums]

    def combine(self, total: Callable[[Params], Params]) -> None:
        """Every process's copies in one, when each process added some of the concepts: `total` sums a dict of
        tensors over the processes (the identity for one process holding them all)."""
        rows = [c.shape[0] for c in self.plan.concept_targets]
        stacked = {}
        for name, values in self.values.items():
            d_out = next(iter(values.values())).shape[1]
            stacked[name] = torch.cat([values.get(n, self.plan.concept_targets[n].new_zeros(m, d_out))
                                       for n, m in enumerate(rows)])
        summed = total({**{f"values/{n}": t for n, t in stacked.items()},
                        **{f"sums/{n}": t for n, t in self.sums.items()}})
        self.values = {name: dict(enumerate(summed[f"values/{name}"].split(rows))) for name in stacked}
        self.sums, self.count = {name: summed[f"sums/{name}"] for name in self.sums}, len(rows)

    def merge(self, base: Params) -> Params:
        """Merge(theta'_1 .. theta'_N): K/V weights in closed form from W_0 = base, the rest averaged."""
        merged = {name: self.plan.merge_key_value(base[name], _ordered(vs)) for name, vs in self.values.items()}
        return {**merged, **{name: total / self.count for name, total in self.sums.items()}}

    def pull_back(self, base: Params, merged_grad: Params, wrt: list[str]) -> tuple[Callable[[int], Params], Params]:
        """The gradient reaching each copy, and the base parameters named `wrt` (W_0 of merged K/V weights), from
        the gradient `merged_grad` of the merged parameters.

        Returns a function of the concept index giving that copy's gradient (built on demand: one at a time),
        and the gradient of the base parameters.
        """
        mean_grads = {name: merged_grad[name] / self.count for name in self.sums}
        if not self.values:  # nothing merged in closed form
            return (lambda n: mean_grads), {}
        w0 = {name: base[name].detach().requires_grad_() for name in self.values if name in wrt}
        values = {name: [v.detach().requires_grad_() for v in _ordered(vs)] for name, vs in self.values.items()}
        merged = {name: self.plan.merge_key_value(w0.get(name, base[name]), vs) for name, vs in values.items()}
        inputs = [v for vs in values.values() for v in vs] + list(w0.values())
        grads = iter(torch.autograd.grad([merged[n] for n in merged], inputs, [merged_grad[n] for n in merged]))
        value_grads = {name: [next(grads) for _ in vs] for name, vs in values.items()}  # N x (m_n, d_out)
        base_grads = {name: next(grads) for name in w0}

        def copy_grad(n: int) -> Params:
            targets = self.plan.concept_targets[n]  # float64, like the value gradients
            kv = {name: (gs[n].T @ targets).to(base[name]) for name, gs in value_grads.items()}  # (d_out, d)
            return {**mean_grads, **kv}

        return copy_grad, base_grads


def _ordered(values: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    return [values[n] for n in sorted(values)]
