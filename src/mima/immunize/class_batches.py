"""Which class-image batches the prior and retain terms take at an outer step, and how the retain term captions
them."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from mima.attacks.config import FRESH_TOKEN_PROMPT
from mima.immunize.attackers import SimulatedAttacker
from mima.immunize.base import ConceptBatches, RetainedConcept
from mima.models.encoding import Batch

RetainPair = tuple[Batch, Batch, int | None]  # lower, upper, the concept index the attacker conditions them as


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
) -> list[RetainPair]:
    """The retain term's (lower, upper, concept) triples: `class_batches` under their class prompt (concept None),
    or with `retain_prompt: attacker` and an attacker that writes a token (a fresh-token attacker, or one that
    learns its token), as that attacker conditions its concept's images (concept: that concept's index, the
    batches carrying its prompts): the token must stay learnable for images other than the targets.

    With `retained` concepts, as many pairs of their images instead, each from one of them drawn uniformly from
    `generator`, under their own prompts or (as above) as the attacker conditions that concept (its index in
    the attacker's concepts, after the targets).
    """
    classes = class_batches(batches, class_of)
    under_token = retain_prompt == "attacker" and (attacker.learns_token or attacker.prompt_mode == FRESH_TOKEN_PROMPT)
    if retained:
        if generator is None:
            raise ValueError("retained concepts are drawn from a generator; pass the outer step's")
        return [_retained_pair(retained, attacker.targets, under_token, lower.latents.shape[0], generator)
                for lower, _ in classes.values()]
    if not under_token:
        return [(lower, upper, None) for lower, upper in classes.values()]
    concept_batches = list(batches.values())

    def captioned(images: Batch, concept_batch: Batch) -> Batch:
        return Batch(images.latents, images.hidden, prompts=concept_batch.prompts)

    return [(captioned(lower, concept_batches[n][0]), captioned(upper, concept_batches[n][1]), n)
            for n, (lower, upper) in classes.items()]


def _retained_pair(
    retained: Sequence[RetainedConcept], targets: int, under_token: bool, size: int, generator: torch.Generator,
) -> RetainPair:
    index = int(torch.randint(len(retained), (1,), generator=generator))
    encoded = retained[index][1]
    lower = encoded.batch(size, generator)
    return lower, encoded.batch(size, generator), targets + index if under_token else None
