from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from mima.data.toy_world import toy_concepts
from mima.models.toy import MAX_PROMPT_TOKENS, toy_vocabulary


@pytest.fixture(scope="module")
def tokenizer(tiny_components) -> CLIPTokenizer:
    return tiny_components.tokenizer


def test_every_vocabulary_word_is_one_token(tokenizer):
    split = {word: tokenizer.tokenize(word) for word in toy_vocabulary()}
    assert {word: tokens for word, tokens in split.items() if len(tokens) != 1} == {}


def test_vocabulary_is_large_enough(tokenizer):
    assert len(tokenizer) > 500


def test_encode_decode_round_trip(tokenizer):
    prompt = "a painting in the style of plaid"
    ids = tokenizer(prompt).input_ids
    assert len(ids) == len(prompt.split()) + 2
    assert (ids[0], ids[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_words_outside_the_vocabulary_still_encode(tokenizer):
    ids = tokenizer("a zebra").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra"


def test_every_concept_prompt_fits_the_context(tokenizer):
    prompts = [p for c in toy_concepts() for p in (*c.prompts, c.class_prompt)]
    assert max(len(tokenizer(p).input_ids) for p in prompts) <= MAX_PROMPT_TOKENS


def test_save_load_round_trip_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a photo of a star", "a heart in plaid style", "a zebra on the moon", ""]
    assert reloaded(prompts).input_ids == tokenizer(prompts).input_ids
    assert len(reloaded) == len(tokenizer)


def test_shipped_pipeline_folder_tokenizer_matches(tokenizer, tiny_model_dir):
    reloaded = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert reloaded("a painting in checker style").input_ids == tokenizer("a painting in checker style").input_ids
