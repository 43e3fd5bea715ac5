"""The SimulatedAttacker interface and the `simulated_attackers` registry.

A simulated attacker trains parameters phi of its own (LoRA factors, a token embedding) or the UNet's own S^l
(`full`), starting each outer step from phi_0. At phi, the diffusion loss sees the UNet weights `weights` returns
and the text conditioning `hidden` returns. The bi-level immunizers run every kind through the same inner steps
(`mima.functional.unroll`, `unrolled_vjp`), so each kind works in first and second order.

Its prompt (`AttackerSpec.prompt`) is that of the real attacks: `concept`, the concept's own prompts, or
`fresh-token`, the words naming the concept replaced by a token. A kind that trains no token uses the rare untrained
identifier "sks" there (DreamBooth's; its hidden states are computed once), or one of `AttackerSpec.tokens` drawn
per outer step (`draw_token`); a kind that learns one
(`learns_token`) always writes its token in, beside the concept's words under `concept`. A kind that trains no token
may also take `description`: each image under one of its concept's descriptions (`ConceptSpec.descriptions`), which
describe it without naming it, their hidden states encoded once when it binds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from mima.attacks.config import CONCEPT_PROMPT, FRESH_TOKEN_PROMPT
from mima.attacks.prompts import RARE_TOKEN, caption
from mima.data.concepts import ConceptSpec
from mima.errors import ConfigError
from mima.functional import Params
from mima.immunize.attacker_spec import DESCRIPTION_PROMPT, AttackerSpec
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
    default_prompt: ClassVar[str] = CONCEPT_PROMPT
    """The prompt when `spec.prompt` is unset."""
    learns_token: ClassVar[bool] = False
    """Whether phi holds a fresh token's embedding; then every prompt it trains under holds the token."""

    def __init__(self, spec: AttackerSpec) -> None:
        self.check_spec(spec)
        self.spec = spec
        self.lr = self.default_lr if spec.lr is None else spec.lr
        self.prompt_mode = spec.prompt or self.default_prompt
        self._constant_hidden: dict[str, torch.Tensor] = {}  # caption -> its hidden states (no text side trains)
        self.fresh_token = spec.tokens[0] if spec.tokens else RARE_TOKEN

    def bind(self, components: Components, specs: list[ConceptSpec], lower_names: list[str],
             retained: Sequence[ConceptSpec] = ()) -> None:
        """`prepare`, after keeping what the prompts need (the model and the concepts): what the immunizers call.

        Concept indices from `len(specs)` on are the `retained` concepts', which the retain term attacks as this
        attacker would attack a target (its prompts, its token); `targets` counts the targets before them.
        """
        self.components, self.specs, self.targets = components, [*specs, *retained], len(specs)
        self.prepare(components, self.specs, lower_names)
        if self.prompt_mode == DESCRIPTION_PROMPT:
            for concept, spec in enumerate(self.specs):
                self._encode_constant([self.caption(text, concept) for text in spec.descriptions])

    @classmethod
    def check_spec(cls, spec: AttackerSpec) -> None:
        """ConfigError where `spec` asks this kind for what it cannot do: `ImmunizeConfig.check_names` calls it
        before any model loads."""
        if cls.learns_token and spec.prompt == DESCRIPTION_PROMPT:
            raise ConfigError(f"simulated attacker '{spec.kind}': prompt '{DESCRIPTION_PROMPT}' is for kinds that "
                              f"learn no token (full, lora); give it '{CONCEPT_PROMPT}' or 'fresh-token'")
        if cls.learns_token and spec.tokens:
            raise ConfigError(f"simulated attacker '{spec.kind}' learns its own token; tokens are for kinds that "
                              f"learn none (full, lora)")
        if spec.tokens and (spec.prompt or cls.default_prompt) != FRESH_TOKEN_PROMPT:
            raise ConfigError(f"simulated attacker '{spec.kind}': tokens are the words of prompt "
                              f"'{FRESH_TOKEN_PROMPT}'; give it prompt: {FRESH_TOKEN_PROMPT}")

    def token(self, concept: int) -> str:
        """The token written into concept `concept`'s prompts: the rare untrained word of this outer step unless
        overridden."""
        return self.fresh_token

    def draw_token(self, choice: int) -> None:
        """Take `spec.tokens[choice]` as this outer step's untrained token (`AttackerDistribution.sample` draws
        `choice`)."""
        self.fresh_token = self.spec.tokens[choice]

    def caption(self, prompt: str, concept: int) -> str:
        """The prompt an image of concept index `concept` with its own prompt `prompt` is trained under, as the
        real attacks caption it (`mima.attacks.prompts.caption`)."""
        token = self.token(concept)
        mode = CONCEPT_PROMPT if self.prompt_mode == DESCRIPTION_PROMPT else self.prompt_mode  # a description as is
        return caption(prompt, mode, self.specs[concept], token, learns_token=self.learns_token)

    def texts(self, concept: int) -> list[str]:
        """The texts concept `concept`'s images are captioned from: its descriptions under `description`, else its
        prompts."""
        spec = self.specs[concept]
        return list(spec.descriptions) if self.prompt_mode == DESCRIPTION_PROMPT else list(spec.prompts)

    def merge_prompts(self, concept: int) -> list[str]:
        """The prompts on whose token features MIMA's closed-form Merge keeps concept `concept`'s copy: those it
        trains under, as this attacker captions them, where the caption is constant (a learned token's is not: the
        concept's own prompts)."""
        spec = self.specs[concept]
        return list(spec.prompts) if self.learns_token else [self.caption(p, concept) for p in self.texts(concept)]

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
        the batch's own under `concept`, else the captions of its images' texts (`image_texts`), encoded once (no
        text side is trained)."""
        if concept is None or self.prompt_mode == CONCEPT_PROMPT:
            return batch.hidden
        return self._constant_hiddens([self.caption(text, concept) for text in self.image_texts(batch, concept)],
                                      batch.hidden)

    def _constant_hiddens(self, captions: list[str], like: torch.Tensor) -> torch.Tensor:
        """The hidden states of `captions`, encoded once each, as `like`'s dtype and device."""
        self._encode_constant(captions)
        return torch.stack([self._constant_hidden[text] for text in captions]).to(like)

    def image_texts(self, batch: Batch, concept: int) -> list[str]:
        """The text each image of `batch` (of concept index `concept`) is captioned from: its own prompt, or under
        `description` one of the concept's descriptions, the same for an image at every step (cycling over them by
        the image's index in its concept)."""
        if self.prompt_mode != DESCRIPTION_PROMPT:
            return batch_prompts(batch, self.spec.kind)
        if len(batch.images) != batch.latents.shape[0]:
            raise ValueError(f"simulated attacker '{self.spec.kind}' describes images: the batch must carry their "
                             f"indices")
        descriptions = self.specs[concept].descriptions
        return [descriptions[image % len(descriptions)] for image in batch.images]

    def _encode_constant(self, captions: list[str]) -> None:
        """Encode the `captions` not encoded yet, without a graph."""
        missing = [text for text in dict.fromkeys(captions) if text not in self._constant_hidden]
        if missing:
            with torch.no_grad():
                encoded = self.components.encode_prompts(missing)
            self._constant_hidden.update(dict(zip(missing, encoded, strict=True)))

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


def batch_prompts(batch: Batch, kind: str) -> list[str]:
    """The prompts of `batch`, which an attacker that rewrites them needs (a batch built without them is a bug)."""
    if len(batch.prompts) != batch.latents.shape[0]:
        raise ValueError(f"simulated attacker '{kind}' rewrites prompts: the batch must carry one per image")
    return batch.prompts


simulated_attackers: Registry[SimulatedAttacker] = Registry("simulated attacker", SimulatedAttacker)
