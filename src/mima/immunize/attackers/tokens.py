"""Fresh tokens of the simulated attackers that learn one (textual-inversion, custom-diffusion).

The model's own tokenizers and text encoders are left as they are, so the immunized model is saved without the
tokens: private copies of the tokenizers know them, hand the text encoder the init word's id where one stands, and
a hook on the input embedding, present only while a prompt is encoded, puts the token's vector (part of phi) there.
The text encoder runs inside the loss, so the conditioning is differentiable in the vector, twice over.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from mima.attacks.tokens import init_word
from mima.data.concepts import ConceptSpec
from mima.functional import Params
from mima.models.components import Components


class _PrivateReader:
    """A private copy of one tokenizer that also reads the fresh tokens. It gives the text encoder the init word's
    id where the active concept's token stands, and remembers where, for `inject`."""

    def __init__(self, tokenizer: Any, tokens: list[str], init_words: list[str]) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.add_tokens(tokens)
        self.model_max_length = tokenizer.model_max_length
        self.token_ids = [self.tokenizer.convert_tokens_to_ids(token) for token in tokens]
        self.init_ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in init_words]
        self.concept, self.vector, self.where = 0, torch.zeros(()), torch.zeros((), dtype=torch.bool)

    def __call__(self, prompts: list[str], **kwargs: Any) -> Any:
        encoded = self.tokenizer(prompts, **kwargs)
        self.where = encoded.input_ids == self.token_ids[self.concept]
        encoded["input_ids"] = encoded.input_ids.masked_fill(self.where, self.init_ids[self.concept])
        return encoded

    def inject(self, module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        where = self.where.to(output.device)[..., None]  # (B, T, 1)
        return torch.where(where, self.vector.to(output.dtype), output)


class FreshTokens:
    """One fresh token per concept (`tokens[n]`, starting from `init_word(specs[n])`), with one embedding per text
    encoder, named "token:<n>:<text encoder>" (SDXL: two per concept)."""

    def __init__(self, components: Components, specs: list[ConceptSpec], tokens: list[str]) -> None:
        self.components = components
        words = [init_word(spec) for spec in specs]
        self.readers = [_PrivateReader(tokenizer, tokens, words) for tokenizer, _ in components.text_pairs()]
        parts = components.family.text_parts
        self.encoder_names = [encoder for _, encoder in parts]
        private = {tokenizer: reader for (tokenizer, _), reader in zip(parts, self.readers, strict=True)}
        self.view = dataclasses.replace(components, **private)
        for _, encoder in components.text_pairs():
            encoder.requires_grad_(False)  # only the vectors are differentiated

    def names(self, concept: int) -> list[str]:
        """The names of concept `concept`'s embeddings, one per text encoder."""
        return [f"token:{concept}:{encoder}" for encoder in self.encoder_names]

    def initial(self, concept: int) -> Params:
        """Concept `concept`'s embeddings at the start of an attack: its init word's, as the real attacks start."""
        return {name: embedding.weight[reader.init_ids[concept]].detach().clone().requires_grad_()
                for name, reader, embedding in self._per_encoder(concept)}

    def conditioning(self, prompts: list[str], concept: int, params: Params) -> torch.Tensor:
        """The UNet's conditioning of `prompts`, where concept `concept`'s token has its embeddings in `params`."""
        handles = []
        for name, reader, embedding in self._per_encoder(concept):
            reader.concept, reader.vector = concept, params[name]
            handles.append(embedding.register_forward_hook(reader.inject))
        try:
            return self.components.family.conditioning(self.view, prompts)
        finally:
            for handle, reader in zip(handles, self.readers, strict=True):
                handle.remove()
                reader.vector = torch.zeros(())  # the reader keeps no graph alive

    def _per_encoder(self, concept: int) -> list[tuple[str, _PrivateReader, torch.nn.Module]]:
        """Per text encoder: the name of concept `concept`'s embedding, the private reader, the input embedding."""
        embeddings = [encoder.get_input_embeddings() for _, encoder in self.components.text_pairs()]
        return list(zip(self.names(concept), self.readers, embeddings, strict=True))
