"""`mima attack --prompt concept|fresh-token|TEXT`: what each attack trains and samples under, and its checks."""

import json

import pytest

from mima.attacks import attacks
from mima.attacks.base import Attack
from mima.attacks.prompts import RARE_TOKEN, caption, check_new_token, check_rare_token
from mima.cli import main
from mima.data.concepts import toy_concept_spec
from mima.data.image_folder import read_image_folder
from mima.errors import ConfigError
from mima.models.components import Components, load_tokenizers

STRIPES = toy_concept_spec("stripes")
TEXT = "an artwork of parallel bands"


@pytest.mark.parametrize(("mode", "learns_token", "expected"), [
    ("concept", False, ["a painting in stripes style", "a painting in the style of stripes"]),
    ("fresh-token", False, ["a painting in sks style", "a painting in the style of sks"]),
    (TEXT, False, [TEXT, TEXT]),
    ("concept", True, ["a painting in <s> stripes style", "a painting in the style of <s> stripes"]),
    ("fresh-token", True, ["a painting in <s> style", "a painting in the style of <s>"]),
    (TEXT, True, [f"<s> {TEXT}", f"<s> {TEXT}"]),
])
def test_each_prompt_mode_captions_the_concepts_images(mode, learns_token, expected):
    token = "<s>" if learns_token else RARE_TOKEN
    prompts = ["a painting in stripes style", "a painting in the style of stripes"]
    assert [caption(p, mode, STRIPES, token, learns_token=learns_token) for p in prompts] == expected


def test_only_the_concept_mode_of_a_tokenless_method_keeps_the_models_own_prompts():
    assert not attacks.get("lora").rewrites_prompts() and not attacks.get("lora").rewrites_prompts("concept")
    assert attacks.get("lora").rewrites_prompts("fresh-token") and attacks.get("dreambooth").rewrites_prompts(TEXT)
    assert attacks.get("custom-diffusion").rewrites_prompts("concept")


def test_a_fresh_token_is_checked_against_the_toy_and_a_clip_bpe_tokenizer(tmp_path):
    from mima.toy.model import build_bpe_tokenizer
    from sd_shaped import CLIP_MAX_TOKENS, caption_bank_words

    toy = load_tokenizers("toy")
    clip_bpe = [build_bpe_tokenizer(caption_bank_words(), tmp_path / "tokenizer", CLIP_MAX_TOKENS)]
    for tokenizers, bank, common in ((toy, "toy", "star"), (clip_bpe, "generic", "photo")):
        check_rare_token(RARE_TOKEN, STRIPES, tokenizers, bank)  # read as pieces, none of them unknown
        ids = tokenizers[0](f"a painting in {RARE_TOKEN} style", add_special_tokens=False).input_ids
        assert tokenizers[0].unk_token_id not in ids and len(ids) >= 5
        with pytest.raises(ConfigError, match="common word"):
            check_rare_token(common, STRIPES, tokenizers, bank)
        with pytest.raises(ConfigError, match="word of concept 'stripes'"):
            check_rare_token("stripes", STRIPES, tokenizers, bank)
        check_new_token("<stripes>", tokenizers)
        with pytest.raises(ConfigError, match="already exists"):
            check_new_token(common, tokenizers)


@pytest.mark.parametrize(("method", "mode", "train_word", "absent"), [
    ("lora", "fresh-token", "a sks", "donut"),
    ("dreambooth", TEXT, TEXT, "donut"),
    ("textual-inversion", "concept", "<donut> donut", None),
    ("custom-diffusion", "fresh-token", "<new-donut>", " donut"),
])
def test_an_attack_trains_and_samples_under_its_prompt(tiny_model_dir, tmp_path, monkeypatch, method, mode,
                                                       train_word, absent):
    """The texts that reach the text encoder inside the training loss, the samples' prompts and attack.json agree."""
    in_loss, encoded = [False], []
    original_loss, original_encode = Attack.loss, Components.encode_prompts

    def loss(self, *args, **kwargs):
        in_loss[0] = True
        try:
            return original_loss(self, *args, **kwargs)
        finally:
            in_loss[0] = False

    def encode_prompts(self, prompts):
        if in_loss[0]:
            encoded.extend(prompts)
        return original_encode(self, prompts)

    monkeypatch.setattr(Attack, "loss", loss)
    monkeypatch.setattr(Components, "encode_prompts", encode_prompts)
    out = tmp_path / "run"
    assert main(["attack", "--model", str(tiny_model_dir), "--concept", "toy:donut", "--method", method,
                 "--prompt", mode, "--out", str(out), "--steps", "2", "--n-images", "4", "--n-class-images", "2",
                 "--eval-images", "2", "--sampling-steps", "2", "--batch-size", "2"]) == 0
    record = json.loads((out / "attack.json").read_text())
    assert record["prompt_mode"] == mode == record["config"]["prompt"]
    class_prompt = {toy_concept_spec("donut").class_prompt} if attacks.get(method).uses_prior else set()
    assert set(encoded) - class_prompt <= set(record["train_prompts"]) and set(encoded) - class_prompt
    assert class_prompt <= set(encoded)  # class images keep their own prompt
    for prompts in (record["train_prompts"], record["sample_prompts"]):
        assert prompts and all(train_word in p and (absent is None or absent not in p) for p in prompts), prompts
    for step in ("step_0", "step_2"):
        assert read_image_folder(out / "samples" / step)[1] == [record["sample_prompts"][0]] * 2
