"""What an attack captions its training images with (`--prompt`), and the checks of a fresh token.

Three modes: `concept` (the concept's own prompts), `fresh-token` (the words that name the concept replaced by a
token) and any other text, the one caption of every image (e.g. a style described without the artist's name).
A method that learns a token (textual inversion, custom diffusion) always writes it into the prompt: beside the
concept's words under `concept`, in their place under `fresh-token`, in front of (or beside the concept's words in)
a fixed text. A method that trains no token (LoRA, DreamBooth) uses a rare identifier under `fresh-token`, as
DreamBooth's "sks": it is never trained, only the weights learn to draw the concept when it is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from mima.attacks.config import CONCEPT_PROMPT, FRESH_TOKEN_PROMPT
from mima.attacks.tokens import token_exists, with_token
from mima.data.captions import load_caption_bank, words
from mima.data.concepts import ConceptSpec
from mima.errors import ConfigError

RARE_TOKEN = "sks"  # DreamBooth's identifier: rare in CLIP's vocabulary, in the toy and generic caption banks in none


def caption(prompt: str, mode: str, concept: ConceptSpec, token: str | None, *, learns_token: bool) -> str:
    """The training (and sampling) prompt of one image whose own prompt is `prompt`, under prompt `mode`."""
    if mode == FRESH_TOKEN_PROMPT:
        return with_token(prompt, concept, token)
    text = prompt if mode == CONCEPT_PROMPT else mode
    return with_token(text, concept, token, keep_words=True) if learns_token and token not in text.split() else text


def check_new_token(token: str, tokenizers: Sequence) -> None:
    """A token a method learns must be new to every tokenizer (`ConfigError` otherwise)."""
    if any(token_exists(tokenizer, token) for tokenizer in tokenizers):
        raise ConfigError(f"token '{token}' already exists in the tokenizer; choose a new one with --token")


@cache
def _common_words(caption_bank: str) -> frozenset[str]:
    """Every word of a caption bank's captions (read once per bank: a run checks each token against each concept)."""
    return frozenset(w for text in load_caption_bank(caption_bank) for w in words(text))


def check_rare_token(
    token: str, concept: ConceptSpec, tokenizers: Sequence, caption_bank: str | None, where: str = "--token"
) -> None:
    """An untrained fresh token must not be a word of the concept's prompts or of the model's common captions
    (`caption_bank`: "toy" for a model of the toy world, else "generic"; None: not checked), and every tokenizer
    must read it without its unknown token (`ConfigError` otherwise, pointing at `where` the token was given)."""
    own = {w for text in (concept.name, *concept.prompts, concept.class_prompt or "") for w in words(text)}
    common = _common_words(caption_bank) if caption_bank else frozenset()
    hint = f"give another rare word in {where} (default '{RARE_TOKEN}')"
    if set(words(token)) & own:
        raise ConfigError(f"fresh token '{token}' is a word of concept '{concept.name}''s prompts; {hint}")
    if set(words(token)) & common:
        raise ConfigError(f"fresh token '{token}' is a common word of the model's prompts, not a rare one; {hint}")
    for tokenizer in tokenizers:
        ids = tokenizer(token, add_special_tokens=False).input_ids
        if not ids or tokenizer.unk_token_id in ids:
            raise ConfigError(f"fresh token '{token}' is unknown to the model's tokenizer; {hint}")
