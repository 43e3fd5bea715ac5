"""A new learnable token: added to the tokenizer, its embedding a separate parameter injected by a hook.

Keeping the vector outside the embedding matrix means the optimiser (and its weight decay) touches nothing
else; the matrix row is written only at export, in the format `pipe.load_textual_inversion` reads.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open

from mima.data.captions import frequent_words, load_caption_bank
from mima.data.concepts import ConceptSpec, concept_phrase
from mima.errors import ConfigError
from mima.models.components import Components
from mima.utils.io import load_tensors, save_tensors

EMBEDDINGS_FILE = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")  # the community's SDXL textual-inversion keys, one per text encoder


class NewToken:
    """Adds `token` to every tokenizer of the model (SDXL has two), each embedding initialised from `init_word`'s
    first sub-token in that encoder."""

    def __init__(self, components: Components, token: str, init_word: str) -> None:
        self.token, self.token_ids, self.vectors = token, [], []
        for tokenizer, text_encoder in components.text_pairs():
            if token_exists(tokenizer, token):
                raise ConfigError(f"token '{token}' already exists in the tokenizer; choose a new one with --token")
            init_id = tokenizer(init_word, add_special_tokens=False).input_ids[0]
            tokenizer.add_tokens(token)
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = text_encoder.get_input_embeddings()
            self.token_ids.append(tokenizer.convert_tokens_to_ids(token))
            self.vectors.append(torch.nn.Parameter(embedding.weight[init_id].detach().clone()))
            embedding.register_forward_hook(self._injector(len(self.vectors) - 1))

    def _injector(self, index: int):
        def inject(module: torch.nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
            mask = (inputs[0] == self.token_ids[index])[..., None]  # (B, T, 1)
            return torch.where(mask, self.vectors[index].to(output.dtype), output)

        return inject

    def export(self, out_dir: Path) -> Path:
        """Write `learned_embeds.safetensors` in diffusers' textual-inversion format: `{token: vector}`, or for
        SDXL `{"clip_l": (1, d1), "clip_g": (1, d2)}` with the token in the metadata (`load_token_embeddings`)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        vectors = [v.detach() for v in self.vectors]
        if len(vectors) == 1:
            tensors = {self.token: vectors[0]}
        else:
            tensors = {key: vector[None] for key, vector in zip(SDXL_KEYS, vectors, strict=True)}
        save_tensors(out_dir / EMBEDDINGS_FILE, tensors, metadata={"token": self.token})
        return out_dir


def load_token_embeddings(pipe: DiffusionPipeline, directory: str | Path) -> None:
    """Load a `NewToken` export into a plain diffusers pipeline, into both text encoders for SDXL."""
    path = Path(directory) / EMBEDDINGS_FILE
    if getattr(pipe, "text_encoder_2", None) is None:
        pipe.load_textual_inversion(directory, weight_name=EMBEDDINGS_FILE)
        return
    with safe_open(path, framework="pt") as f:
        token = f.metadata()["token"]
    tensors = load_tensors(path)
    pairs = ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))
    for key, (text_encoder, tokenizer) in zip(SDXL_KEYS, pairs, strict=True):
        pipe.load_textual_inversion(tensors[key], token=token, text_encoder=text_encoder, tokenizer=tokenizer)


def token_exists(tokenizer: Any, token: str) -> bool:
    """Whether `tokenizer` already reads `token` as one of its tokens (then it cannot be learned as a new one)."""
    return token in tokenizer.get_vocab() or len(tokenizer.tokenize(token)) == 1


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
