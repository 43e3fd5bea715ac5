"""MergePlan: everything the Merge needs that does not change during immunization, computed once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mima.merge.closed_form import FactorizedGram, closed_form_merge, factorize_gram, merged_values
from mima.models.components import Components
from mima.models.cross_attention import key_value_parameter_names
from mima.utils.device import solve_device

Params = dict[str, torch.Tensor]


@torch.no_grad()
def prompt_token_embeddings(components: Components, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs of each prompt's tokens after the start token, up to its first end token (rows, d)."""
    tokens = components.tokenizer(
        prompts, padding="max_length", max_length=components.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = components.text_encoder(tokens.to(components.text_encoder.device))[0].float().cpu()  # (B, T, d)
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


@dataclass
class MergePlan:
    """Targets C_n per concept, the deduplicated stack C, and the factorised regulariser M + ridge I.

    They live on the UNet's device, except on MPS (no float64): there they stay on the CPU, and each K/V weight
    goes there for the float64 solve and comes back. `merge` maps the base parameters and N adapted copies to the
    merged parameters: cross-attention keys and values in closed form (method.md, the Merge layer), every other
    adapted parameter averaged over concepts.
    """

    key_value_names: frozenset[str]
    concept_targets: list[torch.Tensor]  # N x (m_n, d)
    targets: torch.Tensor  # (m, d), deduplicated over all concepts
    row_index: torch.Tensor  # (sum m_n,), row of `targets` for each stacked concept row
    gram: FactorizedGram

    @classmethod
    def build(
        cls, components: Components, concept_prompts: list[list[str]], caption_bank: list[str], ridge: float = 1e-3
    ) -> MergePlan:
        concept_targets = [unique_rows(prompt_token_embeddings(components, p))[0] for p in concept_prompts]
        targets, row_index = unique_rows(torch.cat(concept_targets))
        reg_bank = unique_rows(prompt_token_embeddings(components, caption_bank))[0]  # (s, d)
        device = solve_device(components.unet.device)
        return cls(
            key_value_names=frozenset(key_value_parameter_names(components.unet)),
            concept_targets=[c.to(device, torch.float64) for c in concept_targets],
            targets=targets.to(device, torch.float64), row_index=row_index.to(device),
            gram=factorize_gram(reg_bank.to(device), ridge),
        )

    def merge_key_value(self, w0: torch.Tensor, adapted: list[torch.Tensor]) -> torch.Tensor:
        """Closed-form merge of one K/V weight: W_hat c = W_n c for concept n's tokens c (shared tokens: mean).

        Computed in float64 (so also exact under autocast, which leaves float64 alone), returned in w0's device
        and dtype."""
        device = self.targets.device
        w0_64 = w0.to(device, torch.float64)
        _, stacked = merged_values([a.to(device, torch.float64) for a in adapted], self.concept_targets)
        counts = torch.bincount(self.row_index, minlength=self.targets.shape[0]).to(stacked)[:, None]
        values = torch.zeros(self.targets.shape[0], w0.shape[0], dtype=stacked.dtype, device=device)
        values = values.index_add(0, self.row_index, stacked) / counts  # (m, d_out)
        return closed_form_merge(w0_64, self.targets, values, self.gram).to(w0.device, w0.dtype)

    def merge(self, base: Params, adapted: list[Params]) -> Params:
        """Merge(theta'_1 .. theta'_N) over the adapted parameter names."""
        merged = {}
        for name in adapted[0]:
            copies = [a[name] for a in adapted]
            if name in self.key_value_names:
                merged[name] = self.merge_key_value(base[name], copies)
            else:
                merged[name] = torch.stack(copies).mean(dim=0)
        return merged
