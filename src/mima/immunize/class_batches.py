"""Which class-image batches the prior and retain terms take at an outer step, and how the retain term captions
them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from mima.attacks.config import FRESH_TOKEN_PROMPT
from mima.immunize.attackers import SimulatedAttacker
from mima.immunize.base import ConceptBatches, RetainedConcept
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
    batches: ConceptBatches, class_of: Mapping[str, Hashable], attacker: SimulatedAttacker, retain_prompt: str,
    retained: Sequence[RetainedConcept] = (), generator: torch.Generator | None = None,
) -> list[tuple[Batch, Batch]]:
    """The retain term's (lower, upper) batches: `class_batches` under their class prompt, or with
    `retain_prompt: attacker` and a fresh-token attacker that learns no token, under the prompts that attacker gives
    its concept's images (the rare token must stay learnable for images other than the targets).

    With `retained` concepts, as many batches of their images instead, each pair from one of them drawn uniformly
    from `generator`, under their own prompts or (as above) their naming words replaced by the attacker's token.
    """
    classes = class_batches(batches, class_of)
    under_token = (retain_prompt == "attacker" and attacker.prompt_mode == FRESH_TOKEN_PROMPT
                   and not attacker.learns_token)
    if retained:
        if generator is None:
            raise ValueError("retained concepts are drawn from a generator; pass the outer step's")
        return [_retained_pair(retained, attacker, under_token, lower.latents.shape[0], generator)
                for lower, _ in classes.values()]
    if not under_token:
        return list(classes.values())
    concept_batches = list(batches.values())

    def captioned(n: int, images: Batch, concept_batch: Batch) -> Batch:
        return Batch(images.latents, attacker.hidden({}, concept_batch, n).to(images.hidden))

    return [(captioned(n, lower, concept_batches[n][0]), captioned(n, upper, concept_batches[n][1]))
            for n, (lower, upper) in classes.items()]


def _retained_pair(
    retained: Sequence[RetainedConcept], attacker: SimulatedAttacker, under_token: bool, size: int,
    generator: torch.Generator,
) -> tuple[Batch, Batch]:
    spec, encoded = retained[int(torch.randint(len(retained), (1,), generator=generator))]

    def conditioned(batch: Batch) -> Batch:
        return Batch(batch.latents, attacker.retained_hidden(batch, spec) if under_token else batch.hidden)

    lower = encoded.batch(size, generator)
    return conditioned(lower), conditioned(encoded.batch(size, generator))
