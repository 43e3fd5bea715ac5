"""Concept descriptions (prompts that describe a concept without naming it) and the simulated attacker that trains
under them (`AttackerSpec.prompt: description`): the toy world's built-in ones, the concepts YAML, the checks, the
hidden states the losses see, and the CLI end to end."""

import copy
import json
import re

import pytest
import torch
from transformers import CLIPTokenizer

from mima.cli import main
from mima.data.captions import load_caption_bank, words
from mima.data.concepts import load_concepts, toy_concept_spec
from mima.errors import ConfigError
from mima.immunize import ImmunizeConfig, bilevel, immunizers
from mima.losses import denoising_losses
from mima.merge.plan import MergePlan
from mima.models.components import Components, toy_model_dir
from mima.models.encoding import EncodedConcept, EncodedImages
from mima.toy import world as toy_world
from mima.toy.model import MAX_PROMPT_TOKENS

DESCRIBING_LORA = {"kind": "lora", "prompt": "description", "lr": 0.5, "steps": 2, "clip": 0.05}


def test_toy_styles_are_described_in_words_the_toy_tokenizer_knows():
    """Every word of every built-in description is one token of the shipped toy model's tokenizer (not pieces or
    unknowns), each fits its prompt length, and no two styles share a description."""
    tokenizer = CLIPTokenizer.from_pretrained(toy_model_dir() / "tokenizer")
    vocabulary = tokenizer.get_vocab()
    styles = [c for c in toy_world.toy_concepts() if c.family == "style"]
    seen = set()
    for concept in styles:
        spec = toy_concept_spec(concept.name)  # checked: no description names the style
        assert spec.descriptions == concept.descriptions and len(spec.descriptions) >= 2
        for text in spec.descriptions:
            unknown = [w for w in words(text) if f"{w}</w>" not in vocabulary]
            assert not unknown, f"{concept.name}: '{text}' has words the toy tokenizer does not know: {unknown}"
            assert len(tokenizer(text).input_ids) <= MAX_PROMPT_TOKENS
            assert text not in seen
            seen.add(text)
    assert toy_concept_spec("circle").descriptions == ()  # no words for the shapes


def test_concepts_yaml_descriptions_are_read_and_checked(tmp_path, capsys):
    images = tmp_path / "zorb"
    entry = {"name": "zorblax", "prompt": "a painting in the style of Zorblax Quenn", "class_prompt": "a painting"}
    spec, = load_concepts([{**entry, "descriptions": ["swirling blue brushwork", "a night sky in thick paint"]}])
    assert spec.descriptions == ("swirling blue brushwork", "a night sky in thick paint")
    for descriptions, message in ((["thick paint by Quenn"], re.escape("names the concept ('Quenn')")),
                                  ([" "], "must be a non-empty text"),
                                  ("swirls", "must be a list of texts")):
        with pytest.raises(ConfigError, match=message):
            load_concepts([{**entry, "descriptions": descriptions}])
    path = tmp_path / "concepts.yaml"
    path.write_text(f"concepts:\n  - name: zorblax\n    prompt: a painting in the style of Zorblax Quenn\n"
                    f"    images: {images}\n    descriptions: [a Zorblax painting]\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mima: error: concept 'zorblax': description 'a Zorblax painting'")


def test_a_describing_attacker_needs_descriptions_and_no_learned_token(tiny_model_dir, tmp_path, capsys):
    config = ImmunizeConfig(attackers=(DESCRIBING_LORA,))
    config.check_concepts([toy_concept_spec("stripes")])
    with pytest.raises(ConfigError, match="concept 'circle' has no descriptions"):
        config.check_concepts([toy_concept_spec("stripes"), toy_concept_spec("circle")])
    with pytest.raises(ConfigError, match="prompt 'description' is for kinds that learn no token"):
        ImmunizeConfig(attackers=({"kind": "textual-inversion", "prompt": "description"},)).check_names()
    with pytest.raises(ConfigError, match="prompt must be 'concept', 'fresh-token' or 'description'"):
        ImmunizeConfig(attackers=({"kind": "lora", "prompt": "describe"},))
    yaml = tmp_path / "immunize.yaml"
    yaml.write_text("attackers:\n  - {kind: lora, prompt: description}\n")
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:circle", "--out", str(out),
                 "--config", str(yaml), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "concept 'circle' has no descriptions" in err[0]
    assert not out.exists()  # refused before the run folder, the images and the model


def _images(components, prompts: list[str], g: torch.Generator) -> EncodedImages:
    size = components.unet.config.sample_size
    mean = torch.randn(len(prompts), 4, size, size, generator=g, dtype=torch.float64)
    hidden = components.encode_prompts(prompts).detach().double()
    return EncodedImages(mean, 0.1 * torch.ones_like(mean), hidden, prompts)


@pytest.fixture
def described(tiny_components):
    """Float64 tiny components, two toy styles of three images each and a MIMA immunizer whose attacker trains
    under their descriptions."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec("stripes"), toy_concept_spec("dots")]
    concepts = [EncodedConcept(s.name, _images(components, [s.prompt] * 3, torch.Generator().manual_seed(i)), None)
                for i, s in enumerate(specs)]
    config = ImmunizeConfig(method="mima", caption_bank="toy", attackers=(DESCRIBING_LORA,), prior_weight=0.0,
                            retain_weight=0.0, bank_prior_weight=0.0,
                            upper_params=("*attn2.to_k*", "*attn2.to_v*", "*attn2.to_q*"))
    immunizer = immunizers.get("mima")(config)
    immunizer.prepare(components, specs, concepts)
    return components, specs, concepts, immunizer


def test_the_losses_see_the_descriptions_encodings(described, monkeypatch):
    """Every loss of the attack and of the ascent is conditioned on the encoding of one of its concept's
    descriptions, image i of the concept always under description i mod their count; MIMA merges on them."""
    components, specs, concepts, immunizer = described
    g = torch.Generator().manual_seed(3)
    batches = {c.name: (c.batch(4, g), c.batch(4, g)) for c in concepts}
    expected = []
    for spec, (lower, upper) in zip(specs, batches.values(), strict=True):
        for batch in (lower, upper):
            texts = [spec.descriptions[i % len(spec.descriptions)] for i in batch.images]
            expected.append(components.encode_prompts(texts).double())
            assert not torch.allclose(expected[-1], batch.hidden)  # the concept's own prompt: not what is trained
    seen = []

    def spy(unet_call, scheduler, batches, targets=None):
        seen.extend(hidden.detach() for *_, hidden in batches)
        return denoising_losses(unet_call, scheduler, batches, targets)

    monkeypatch.setattr(bilevel, "denoising_losses", spy)
    immunizer.gradients(batches, torch.Generator().manual_seed(4))
    assert len(seen) >= 2 * len(expected)  # two inner steps and the upper loss per concept
    matches = [[torch.allclose(hidden, e, atol=1e-6) for e in expected] for hidden in seen]
    assert all(any(row) for row in matches), "a loss saw hidden states that are no description's encoding"
    assert all(any(row[k] for row in matches) for k in range(len(expected)))  # every batch's descriptions used
    assert immunizer.attacker.merge_prompts(0) == list(specs[0].descriptions)


def test_cli_immunize_with_a_describing_lora_attacker(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "immunize.yaml"
    config.write_text("attackers:\n  - {kind: lora, prompt: description, lr: 0.5}\n")
    out = tmp_path / "run"
    code = main([
        "immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
        "--config", str(config), "--steps", "2", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2",
        "--caption-bank", "toy", "--setting", "personalize",
    ])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "immunization.json").read_text())
    assert record["config"]["attackers"][0]["prompt"] == "description"
    assert record["concepts"][0]["descriptions"] == list(toy_concept_spec("stripes").descriptions)
    assert {"upper/stripes", "lower/stripes"} <= set(record["log"][0])
    before, after = Components.from_pretrained(tiny_model_dir), Components.from_pretrained(out / "model")
    changed = [n for n, p in after.unet.named_parameters() if not torch.equal(p, before.unet.get_parameter(n))]
    assert changed and all(".transformer_blocks." in n for n in changed)


def test_mima_merges_each_attacker_on_the_prompts_it_trains_under(described):
    """In a distribution, each attacker's copies are merged on its own captions: the concept's prompts for one,
    the descriptions for the other (the Merge's rows are their token features)."""
    components, specs, concepts, _ = described
    config = ImmunizeConfig(method="mima", caption_bank="toy", prior_weight=0.0, retain_weight=0.0,
                            bank_prior_weight=0.0, attackers=({"kind": "lora"}, DESCRIBING_LORA))
    immunizer = immunizers.get("mima")(config)
    immunizer.prepare(components, specs, concepts)
    expected = [MergePlan.build(components, [list(getattr(s, texts)) for s in specs], load_caption_bank("toy"),
                                ridge=config.ridge) for texts in ("prompts", "descriptions")]
    plans = []
    for index, plan in enumerate(expected):
        immunizer.distribution.index = index
        plans.append(immunizer.plan)
        for got, want in zip(plans[-1].concept_targets, plan.concept_targets, strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(plans[-1].solution, plan.solution)  # the regulariser computed once, the same
    assert plans[0] is not plans[1] and len(immunizer.plans) == 2
