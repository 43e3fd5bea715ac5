from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import CLIPTokenizer

from mima.toy.model import MAX_PROMPT_TOKENS, toy_vocabulary, train_bpe_merges
from mima.toy.world import toy_concepts


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


def test_build_is_identical_across_processes(tmp_path):
    # Python's string hashing (hence set and dict order of pairs) changes with PYTHONHASHSEED.
    script = ("import sys, pathlib; from mima.toy.model import build_toy_tokenizer; "
              "build_toy_tokenizer(pathlib.Path(sys.argv[1]))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], check=True, env=env)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_bpe_merges_make_every_training_word_one_symbol():
    merges = train_bpe_merges(["low", "lower", "newest", "widest"])
    tokenizer = CLIPTokenizer(vocab=_vocab_for(merges), merges=merges)
    assert [tokenizer.tokenize(w) for w in ("low", "lower", "newest", "widest")] == [
        ["low</w>"], ["lower</w>"], ["newest</w>"], ["widest</w>"]
    ]
    assert merges[0] == ("e", "s")  # ("l", "o") and ("s", "t</w>") are as frequent and sort after it


def _vocab_for(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = sorted({part for pair in merges for part in pair} | {a + b for a, b in merges})
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}
