"""`textual-inversion`: a fresh token embedding per concept, as the Textual Inversion attack learns it.

phi changes no UNet weight: the adapted model is the released one, read under the fresh-token prompt the token's
steps have tuned. So MIMA has nothing to merge, and its copies differ from imma-joint's shared attack only in the
step size each token gets (docs/method.md, "Simulated attackers").
"""

from __future__ import annotations

import torch

from mima.attacks.config import FRESH_TOKEN_PROMPT
from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.immunize.attackers.base import SimulatedAttacker, batch_prompts
from mima.immunize.attackers.tokens import FreshTokens
from mima.models.components import Components
from mima.models.encoding import Batch


class TextualInversionAttacker(SimulatedAttacker):
    """A fresh token per concept, tuned by the inner steps; the upper loss is read under the prompt holding it.

    phi = concept n's embeddings "token:<n>:<text encoder>"; the token is "<concept name>", as the attack names it.
    """

    default_prompt = FRESH_TOKEN_PROMPT
    learns_token = True
    default_lr = 3.0  # measured on the toy (docs/method.md, "Simulated attackers"): the held-out loss falls

    def prepare(self, components: Components, specs: list[ConceptSpec], lower_names: list[str]) -> None:
        self.tokens = FreshTokens(components, specs, [self.token(n) for n in range(len(specs))])

    def token(self, concept: int) -> str:
        return f"<{self.specs[concept].name}>"

    def start(self, base: Params, concepts: list[int], generator: torch.Generator) -> Params:
        return {name: vector for n in concepts for name, vector in self.tokens.initial(n).items()}

    def weights(self, params: Params) -> Params:
        return {}

    def hidden(self, params: Params, batch: Batch, concept: int | None) -> torch.Tensor:
        """The batch's prompts captioned with concept `concept`'s token, encoded with its embeddings in `params`
        (the batch's own conditioning for class images, `concept` None)."""
        if concept is None:
            return batch.hidden
        prompts = [self.caption(p, concept) for p in batch_prompts(batch, self.spec.kind)]
        return self.tokens.conditioning(prompts, concept, params).to(batch.hidden.dtype)

    def pull_back(self, base: Params, phi: Params, cotangent: Params, wrt: list[str]) -> tuple[Params, Params]:
        """The tokens change no weight: nothing reaches them or the base from the weights."""
        return {name: torch.zeros_like(vector) for name, vector in phi.items()}, {}
