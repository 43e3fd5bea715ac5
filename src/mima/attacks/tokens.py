"""A new learnable token: added to the tokenizer, its embedding a separate parameter injected by a hook.

Keeping the vector outside the embedding matrix means the optimiser (and its weight decay) touches nothing
else; the matrix row is written only at export, in the format `pipe.load_textual_inversion` reads.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from mima.data.captions import frequent_words, load_caption_bank
from mima.data.concepts import ConceptSpec, concept_phrase
from mima.errors import ConfigError
from mima.models.components import Components
from mima.utils.io import save_tensors

EMBEDDINGS_FILE = "learned_embeds.safetensors"


class NewToken:
    """Adds `token` to the tokenizer, initialised from the embedding of `init_word`'s first sub-token."""

    def __init__(self, components: Components, token: str, init_word: str) -> None:
        tokenizer, text_encoder = components.tokenizer, components.text_encoder
        if token in tokenizer.get_vocab() or len(tokenizer.tokenize(token)) == 1:
            raise ConfigError(f"token '{token}' already exists in the tokenizer; choose a new one with --token")
        init_id = tokenizer(init_word, add_special_tokens=False).input_ids[0]
        tokenizer.add_tokens(token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
        self.token, self.token_id = token, tokenizer.convert_tokens_to_ids(token)
        self.vector = torch.nn.Parameter(embedding.weight[init_id].detach().clone())
        embedding.register_forward_hook(self._inject)

    def _inject(self, module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        mask = (inputs[0] == self.token_id)[..., None]  # (B, T, 1)
        return torch.where(mask, self.vector.to(output.dtype), output)

    def export(self, out_dir: Path) -> Path:
        """Write `{token: vector}` as `learned_embeds.safetensors` (diffusers' textual-inversion format)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(out_dir / EMBEDDINGS_FILE, {self.token: self.vector.detach()})
        return out_dir


def with_token(prompt: str, concept: ConceptSpec, token: str, *, keep_words: bool = False) -> str:
    """`prompt` with the words that name `concept` replaced by `token` (or preceded by it, with `keep_words`).

    "a painting in the style of Zorblax Quenn" -> "a painting in the style of <zorblax-style>"; a prompt that names
    the concept in no word gets the token in front.
    """
    phrase = concept_phrase(prompt, concept, _template_words())
    if phrase is None:
        return f"{token} {prompt}"
    return prompt.replace(phrase, f"{token} {phrase}" if keep_words else token)


@cache
def _template_words() -> frozenset[str]:
    """Words of prompt templates ("a", "photo", "of"), which name no concept: the generic bank's frequent ones."""
    return frequent_words(load_caption_bank("generic"))
