"""What a real model and a real concept need: words that name a concept, erasure computed once, batch sizes chosen
from the resolution, the toy's learning rates kept for the toy only, the toy judge only for toy concepts."""

from __future__ import annotations

import copy

import pytest
import torch

from mima.attacks import attacks
from mima.attacks.tokens import with_token
from mima.data.captions import load_caption_bank
from mima.data.concepts import ConceptSpec, load_concepts, naming_words, toy_concept_spec
from mima.errors import ConfigError
from mima.evaluate.evaluate import DEFAULT_ENCODERS, default_encoders
from mima.immunize import ImmunizeConfig, erase
from mima.models.components import speaks_toy_vocabulary
from mima.models.cross_attention import cross_attention_modules
from mima.models.encoding import images_per_call

ZORBLAX = ConceptSpec("zorblax-style", ("a painting in the style of Zorblax Quenn",), class_prompt="a painting")


def test_a_caption_naming_the_concept_in_words_is_not_preserved():
    bank = [*load_caption_bank("generic"), "a portrait by Zorblax Quenn", "Quenn at the beach"]
    preserved = erase.preserved_captions([ZORBLAX], bank)
    assert preserved == bank[:-2]
    assert naming_words(ZORBLAX, frozenset({"a", "in", "the", "of", "painting"})) == {"zorblax", "quenn", "style"}


def test_toy_concepts_keep_their_preserved_captions_and_token_prompts():
    bank = load_caption_bank("toy")
    for name in ("stripes", "star", "plaid"):
        spec = toy_concept_spec(name)
        assert erase.preserved_captions([spec], bank) == [c for c in bank if name not in c]
        assert [with_token(p, spec, "<t>") for p in spec.prompts] == [p.replace(name, "<t>") for p in spec.prompts]


def test_a_prompt_naming_the_concept_in_no_word_gets_the_token_in_front():
    assert with_token("an oil painting", ZORBLAX, "<z>") == "<z> an oil painting"


def test_erasure_is_the_uce_closed_form_computed_once_for_every_projection(tiny_components, monkeypatch):
    components, original, calls = copy.deepcopy(tiny_components), erase.erasure_map, []
    monkeypatch.setattr(erase, "erasure_map", lambda *args: calls.append(args) or original(*args))
    layers = cross_attention_modules(components.unet)
    before = {path: (a.to_k.weight.clone(), a.to_v.weight.clone()) for path, a in layers.items()}
    erase.erase_concepts(components, ["a painting in stripes style"], ["a painting"], ["a photo of a star"])
    assert len(calls) == 1
    for path, attention in layers.items():
        for w_old, w_new in zip(before[path], (attention.to_k.weight, attention.to_v.weight), strict=True):
            assert not torch.equal(w_old, w_new)
            torch.testing.assert_close(w_new, _uce_direct(w_old, *calls[0]))


def test_erasure_maps_each_target_onto_its_erase_to_prompt_else_its_class_prompt(monkeypatch):
    calls = []
    monkeypatch.setattr(erase, "erase_concepts", lambda _, targets, neutrals, *rest: calls.append((targets, neutrals)))
    square, dots, zorblax = load_concepts([{"name": "toy:square", "erase_to": "a photo of a triangle"}, "toy:dots",
                                           {"name": "zorblax", "prompt": "a Zorblax painting", "erase_to": "art"}])
    erase.erase_targets(None, [square, dots, zorblax], ImmunizeConfig(caption_bank="toy"))
    assert calls == [([*square.prompts, *dots.prompts, "a Zorblax painting"],
                      ["a photo of a triangle"] * len(square.prompts) + ["a painting"] * len(dots.prompts) + ["art"])]
    assert square.class_prompt == "a photo of an object"
    assert ConceptSpec("plain", ("a plain thing",)).erasure_prompt == ""
    with pytest.raises(ConfigError, match="concept key 'erase_to' must be a text"):
        load_concepts([{"name": "toy:square", "erase_to": 3}])


def _uce_direct(w_old, c, c_star, p, weight, ridge=1e-2):
    """UCE's closed form solved for one W: W (C^T C + l P^T P + r I) = W_old (C*^T C + l P^T P + r I)."""
    w, c, c_star, p = (t.to(torch.float64) for t in (w_old, c, c_star, p))
    eye = torch.eye(w.shape[1], dtype=torch.float64)
    lhs = c.T @ c + weight * p.T @ p + ridge * eye
    return torch.linalg.solve(lhs.T, (w @ (c_star.T @ c + weight * p.T @ p + ridge * eye)).T).T.to(w_old.dtype)


@pytest.mark.parametrize(("resolution", "images"), [(32, 32), (64, 32), (512, 8), (2 * 512, 2), (4 * 512, 1)])
def test_images_per_call_follows_the_resolution(resolution, images):
    assert images_per_call(resolution) == images


def test_the_toy_keeps_its_learning_rates_real_models_get_the_reference_ones(sd15_model_dir, tmp_path):
    from mima.attacks import AttackConfig, AttackRun

    assert speaks_toy_vocabulary("toy") and not speaks_toy_vocabulary(sd15_model_dir)
    for method in attacks.names():
        config = AttackConfig(method=method)
        toy = AttackRun("toy", toy_concept_spec("star"), config, tmp_path).config
        real = AttackRun(str(sd15_model_dir), ZORBLAX, config, tmp_path).config
        assert (toy.lr, real.lr) == (attacks.get(method).default_lr, attacks.get(method).reference_lr)
        assert real.lr < toy.lr


def test_the_toy_judge_is_a_default_encoder_for_toy_concepts_only():
    assert default_encoders(["stripes", "star"]) == DEFAULT_ENCODERS
    assert default_encoders(["stripes", "zorblax-style"]) == ("efficientnet-lite0",)

