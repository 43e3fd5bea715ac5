"""Which class-image batches the prior and retain terms take at an outer step, and how the retain term captions
them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from mima.attacks.config import FRESH_TOKEN_PROMPT
from mima.immunize.attackers import SimulatedAttacker
from mima.immunize.base import ConceptBatches
from mima.models.encoding import Batch


def class_batches(batches: ConceptBatches, class_of: Mapping[str, Hashable]) -> dict[int, tuple[Batch, Batch]]:
    """The (lower, upper) class-image batches, by the index in `batches` of the concept they come from: the first
    concept of each class (`class_of`: concept name -> its class; with `class_batches: per-class`, its class prompt
    and class-image folder, whose concepts draw from one pool, else the concept itself)."""
    firsts, classes = {}, set()
    for n, (name, (lower, upper)) in enumerate(batches.items()):
        if lower.prior is not None and class_of[name] not in classes:
            classes.add(class_of[name])
            firsts[n] = (Batch(*lower.prior), Batch(*upper.prior))
    return firsts


def retain_batches(
    batches: ConceptBatches, class_of: Mapping[str, Hashable], attacker: SimulatedAttacker, retain_prompt: str
) -> list[tuple[Batch, Batch]]:
    """The retain term's (lower, upper) class batches: `class_batches` under their class prompt, or with
    `retain_prompt: attacker` and a fresh-token attacker that learns no token, under the prompts that attacker gives
    its concept's images (the rare token must stay learnable for images other than the targets)."""
    classes = class_batches(batches, class_of)
    if not (retain_prompt == "attacker" and attacker.prompt_mode == FRESH_TOKEN_PROMPT and not attacker.learns_token):
        return list(classes.values())
    concept_batches = list(batches.values())

    def captioned(n: int, images: Batch, concept_batch: Batch) -> Batch:
        return Batch(images.latents, attacker.hidden({}, concept_batch, n).to(images.hidden))

    return [(captioned(n, lower, concept_batches[n][0]), captioned(n, upper, concept_batches[n][1]))
            for n, (lower, upper) in classes.items()]
