"""MIMA (Zheng & Yeh, AAAI 2025): one adapted copy per concept, merged in closed form, ascended through."""

from __future__ import annotations

import torch

from mima.data.captions import load_caption_bank
from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.base import ConceptBatches, immunizers
from mima.immunize.bilevel import BilevelImmunizer
from mima.merge.plan import MergePlan
from mima.models.components import Components
from mima.models.encoding import EncodedConcept


@immunizers.register("mima")
class MIMA(BilevelImmunizer):
    """theta' = Merge(theta'_1 .. theta'_N), theta'_n = theta - alpha grad L(x^l_n, c_n; theta)."""

    def prepare(self, components: Components, specs: list[ConceptSpec], concepts: list[EncodedConcept]) -> None:
        super().prepare(components, specs, concepts)
        captions = load_caption_bank(self.config.caption_bank)
        self.plan = MergePlan.build(components, [list(s.prompts) for s in specs], captions, ridge=self.config.ridge)

    def adapted_parameters(
        self, base: Params, batches: ConceptBatches, generator: torch.Generator
    ) -> tuple[Params, dict[str, float]]:
        copies, logs = [], {}
        for name, (lower, _) in batches.items():
            adapted, logs[f"lower/{name}"] = self.adapt(base, [lower], generator)
            copies.append(adapted)
        return self.plan.merge(base, copies), logs
