"""The simulated attackers that learn a token (textual-inversion, custom-diffusion) and the fresh-token prompt:
meta-gradients against the whole objective and finite differences, what MIMA merges, and the saved model."""

import copy
import json

import pytest
import torch

from gradient_checks import assert_gradients_equal_the_objectives
from mima.cli import main
from mima.data.concepts import ConceptSpec, toy_concept_spec
from mima.errors import ConfigError
from mima.immunize import ImmunizeConfig, immunizers
from mima.models.components import Components
from mima.models.encoding import EncodedConcept, EncodedImages

SEED = 7
TOKEN_KINDS = ("textual-inversion", "custom-diffusion")


def _images(components, prompts: list[str], g: torch.Generator) -> EncodedImages:
    size = components.unet.config.sample_size
    mean = torch.randn(len(prompts), 4, size, size, generator=g, dtype=torch.float64)
    hidden = components.encode_prompts(prompts).detach().double()
    return EncodedImages(mean, 0.1 * torch.ones_like(mean), hidden, prompts)


def _concepts(components, specs: list[ConceptSpec]) -> list[EncodedConcept]:
    concepts = []
    for i, spec in enumerate(specs):
        g = torch.Generator().manual_seed(i)
        prompts = [spec.prompts[j % len(spec.prompts)] for j in range(3)]
        prior = _images(components, [spec.class_prompt] * 3, g)
        concepts.append(EncodedConcept(spec.name, _images(components, prompts, g), prior))
    return concepts


@pytest.fixture
def world(tiny_components):
    """Float64 copies of the tiny components (text encoder too: the token's gradient runs through it), two toy
    concepts with their prompts, and `make(method, order, attacker, **overrides)` -> a prepared immunizer."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    components.text_encoder.double()
    specs = [toy_concept_spec("stripes"), toy_concept_spec("dots")]
    concepts = _concepts(components, specs)

    def make(method: str, order: str, attacker: dict, **overrides):
        config = ImmunizeConfig(
            method=method, order=order, caption_bank="toy", attackers=(attacker,),
            upper_params=("*attn2.to_k*", "*attn2.to_v*", "*attn2.to_q*"),
            **{"prior_weight": 0.0, "retain_weight": 0.0, "bank_prior_weight": 0.0, "hvp": "exact", **overrides},
        )
        immunizer = immunizers.get(method)(config)
        immunizer.prepare(components, specs, concepts)
        return immunizer

    return components, concepts, make


def _batches(concepts):
    g = torch.Generator().manual_seed(SEED)
    return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}


@pytest.mark.parametrize("order", ["second-order", "first-order"])
@pytest.mark.parametrize("method", ["mima", "imma-joint"])
@pytest.mark.parametrize(
    "attacker",
    [{"kind": "textual-inversion", "lr": 0.5, "steps": 2, "clip": 0.05},
     {"kind": "custom-diffusion", "lr": 0.5, "steps": 2, "clip": 0.05},
     {"kind": "custom-diffusion", "lr": 0.5, "prompt": "fresh-token", "clip": 0.0},
     {"kind": "full", "lr": 0.5, "prompt": "fresh-token", "clip": 0.05},
     {"kind": "lora", "lr": 0.5, "prompt": "fresh-token", "clip": 0.05},
     {"kind": "textual-inversion", "lr": 0.05, "steps": 3, "optimizer": "adam", "order": "first-order",
      "trajectory_points": 2},
     {"kind": "custom-diffusion", "lr": 0.5, "steps": 3, "order": "first-order", "trajectory_points": 3}],
)
def test_concept_by_concept_gradient_equals_the_whole_objectives(world, attacker, method, order):
    """`gradients` (one concept at a time, through `unroll` / `unrolled_vjp` and the attacker's pull-back) gives
    the value and gradient of differentiating `objective`, with the prior, anchor and retain terms on."""
    _, concepts, make = world
    terms = {"prior_weight": 0.7, "anchor_weight": 0.3, "retain_weight": 0.5}
    immunizer = make(method, order, attacker, **terms)
    assert_gradients_equal_the_objectives(immunizer, lambda: _batches(concepts), SEED + 1)


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_the_alternating_schedule_carries_the_tokens_in_both_paths(world, method):
    """Under `persistent_attacker` the second outer step's tokens start where the first's ended, in the
    concept-by-concept gradient as in the reference objective."""
    _, concepts, make = world
    attacker = {"kind": "textual-inversion", "lr": 0.5, "steps": 2}
    by_concept = make(method, "second-order", attacker, persistent_attacker=True)
    reference = make(method, "second-order", attacker, persistent_attacker=True, concept_by_concept=False)
    steps = [[immunizer.gradients(_batches(concepts), torch.Generator().manual_seed(SEED + 1)) for _ in range(2)]
             for immunizer in (by_concept, reference)]
    for (value, grads, _), (expected_value, expected, _) in zip(*steps, strict=True):
        assert value == pytest.approx(expected_value, rel=1e-10)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-8, atol=1e-12)
    assert steps[0][1][0] != pytest.approx(steps[0][0][0], rel=1e-6)  # the carried tokens moved the second step
    assert all(key.startswith("token:") for key in {k.split("/", 1)[1] for k in by_concept.state()})


def _directional_finite_difference(immunizer, concepts, direction, eps=1e-5):
    params = immunizer.trainable_parameters()
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
        values.append(immunizer.gradients(_batches(concepts), torch.Generator().manual_seed(SEED + 1))[0])
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
    return (values[0] - values[1]) / (2 * eps)


def test_textual_inversion_second_order_gradient_reaches_the_upper_weights_through_the_token(world):
    """TI changes no UNet weight, so first order sees only the upper loss's direct gradient; second order adds
    what reaches S^u through the token's inner steps, and matches finite differences of the objective."""
    _, concepts, make = world
    attacker = {"kind": "textual-inversion", "lr": 0.5, "steps": 2, "clip": 0.0}
    second, first = make("mima", "second-order", attacker), make("mima", "first-order", attacker)
    batches = _batches(concepts)
    grads = second.gradients(batches, torch.Generator().manual_seed(SEED + 1))[1]
    first_grads = first.gradients(batches, torch.Generator().manual_seed(SEED + 1))[1]
    through_token = {n: grads[n] - first_grads[n] for n in grads}
    assert max(g.abs().max().item() for g in through_token.values()) > 1e-6
    g = torch.Generator().manual_seed(0)
    params = second.trainable_parameters()
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    finite_difference = _directional_finite_difference(second, concepts, direction)
    analytic = sum((grads[n] * direction[n]).sum() for n in params).item()
    assert abs(finite_difference - sum((first_grads[n] * direction[n]).sum() for n in params).item()) > 1e-7
    assert analytic == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)


def test_textual_inversion_mima_is_imma_joint_with_the_step_times_n(world):
    """Nothing to merge: MIMA's copies each tune their own token on their concept; imma-joint tunes every token on
    the mean over the N concepts, a step 1/N as long per token. Unclipped, N x its rate gives MIMA's gradient."""
    _, concepts, make = world
    lr, n = 0.5, len(concepts)
    mima = make("mima", "second-order", {"kind": "textual-inversion", "lr": lr, "clip": 0.0})
    joint = make("imma-joint", "second-order", {"kind": "textual-inversion", "lr": lr * n, "clip": 0.0})
    _, mima_grads, _ = mima.gradients(_batches(concepts), torch.Generator().manual_seed(SEED + 1))
    _, joint_grads, _ = joint.gradients(_batches(concepts), torch.Generator().manual_seed(SEED + 1))
    for name in mima_grads:
        torch.testing.assert_close(joint_grads[name], mima_grads[name], rtol=1e-9, atol=1e-13)


def test_custom_diffusion_copies_change_only_key_values_and_their_merge_is_the_closed_form(world):
    components, concepts, make = world
    immunizer = make("mima", "second-order", {"kind": "custom-diffusion", "lr": 0.5})
    base, attacker = immunizer.base_parameters(), immunizer.attacker
    phi = attacker.start(base, [0], torch.Generator())
    assert set(attacker.weights({**base, **phi})) == set(immunizer.plan.key_value_names)
    assert set(attacker.kept(phi)) == {"token:0:text_encoder"}
    [(thetas, _)], _ = immunizer.adapted_parameters(base, _batches(concepts), torch.Generator().manual_seed(1))
    assert all(set(theta) == set(immunizer.plan.key_value_names) for theta in thetas)  # K/V in closed form only


def test_token_attackers_leave_the_model_tokenizer_and_text_encoder_as_they_are(world):
    components, concepts, make = world
    size, rows = len(components.tokenizer), components.text_encoder.get_input_embeddings().weight.clone()
    for kind in TOKEN_KINDS:
        immunizer = make("mima", "second-order", {"kind": kind, "lr": 0.5})
        immunizer.gradients(_batches(concepts), torch.Generator().manual_seed(SEED + 1))
    embedding = components.text_encoder.get_input_embeddings()
    assert len(components.tokenizer) == size and torch.equal(embedding.weight, rows)
    assert not embedding._forward_hooks  # the hooks exist only while a prompt is encoded
    assert "<stripes>" not in components.tokenizer.get_vocab()


def test_the_token_and_fresh_token_captions(world):
    components, concepts, make = world
    ti = make("mima", "second-order", {"kind": "textual-inversion"}).attacker
    cd = make("mima", "second-order", {"kind": "custom-diffusion"}).attacker
    full = make("mima", "second-order", {"kind": "full", "prompt": "fresh-token"}).attacker
    prompt = "a painting in stripes style"
    assert ti.caption(prompt, 0) == "a painting in <stripes> style"  # as the TI attack captions
    assert cd.caption(prompt, 0) == "a painting in <new-stripes> stripes style"  # as the CD attack
    assert full.caption(prompt, 0) == "a painting in sks style"
    assert make("mima", "second-order", {"kind": "full"}).attacker.caption(prompt, 0) == prompt
    spec = toy_concept_spec("stripes")
    assert full.merge_prompts(0) == [full.caption(p, 0) for p in spec.prompts]  # the rows it trains under
    assert cd.merge_prompts(0) == list(spec.prompts)  # a learned token's row moves: not a Merge row
    batch = concepts[0].batch(2, torch.Generator().manual_seed(0))
    expected = components.encode_prompts([full.caption(p, 0) for p in batch.prompts]).double()
    torch.testing.assert_close(full.hidden({}, batch, 0), expected)  # constants, for the steps and the upper loss
    assert full.hidden({}, batch, None) is batch.hidden  # class images keep their class prompt


def test_attacker_prompt_is_checked():
    with pytest.raises(ConfigError, match="prompt must be 'concept', 'fresh-token' or 'description'"):
        ImmunizeConfig(attackers=({"kind": "full", "prompt": "sks"},))
    with pytest.raises(ConfigError, match="tokens are the words of prompt 'fresh-token'"):
        ImmunizeConfig(attackers=({"kind": "lora", "tokens": ["zq"]},)).check_names()
    with pytest.raises(ConfigError, match="each of tokens must be one word"):
        ImmunizeConfig(attackers=({"kind": "lora", "prompt": "fresh-token", "tokens": ["zq vkx"]},))
    with pytest.raises(ConfigError, match="learns its own token"):
        ImmunizeConfig(attackers=({"kind": "textual-inversion", "tokens": ["zq"]},)).check_names()
    pool = {"kind": "lora", "prompt": "fresh-token", "tokens": ["zq", "stripes"]}
    with pytest.raises(ConfigError, match="'stripes' is a word of concept 'stripes'"):
        ImmunizeConfig(attackers=(pool,)).check_concepts([toy_concept_spec("stripes")])
    pool = {"kind": "lora", "prompt": "fresh-token", "tokens": ["zq", "photo"]}
    with pytest.raises(ConfigError, match="'photo' is a common word.*in simulated attacker 'lora''s tokens"):
        ImmunizeConfig(attackers=(pool,), caption_bank="toy").check_concepts([toy_concept_spec("dots")])


def test_a_fresh_token_drawn_per_outer_step_captions_conditions_and_merges_that_step(world):
    """With `tokens`, each outer step draws one word, a function of (seed, step) alone, logged by its index; the
    step's captions, conditioning and Merge rows hold that word, and its concept-by-concept gradient is still the
    objective's."""
    components, concepts, make = world
    words = ("zq", "vkx", "qjx")
    pool = {"kind": "lora", "lr": 0.5, "prompt": "fresh-token", "clip": 0.05, "tokens": words}
    immunizer = make("mima", "second-order", pool, prior_weight=0.7, retain_weight=0.5, retain_prompt="attacker")
    drawn = [immunizer.begin_step(step)["token"] for step in range(12)]
    assert drawn == [make("mima", "second-order", pool).begin_step(step)["token"] for step in range(12)]
    assert set(drawn) == {0, 1, 2}
    attacker, batch = immunizer.attacker, concepts[0].batch(2, torch.Generator().manual_seed(0))
    immunizer.begin_step(drawn.index(0))
    zq = attacker.hidden({}, batch, 0)
    immunizer.begin_step(drawn.index(2))
    assert attacker.caption("a painting in stripes style", 0) == "a painting in qjx style"
    captions = [attacker.caption(p, 0) for p in batch.prompts]
    torch.testing.assert_close(attacker.hidden({}, batch, 0), components.encode_prompts(captions).double())
    assert not torch.allclose(attacker.hidden({}, batch, 0), zq)
    assert all("qjx" in row for row in attacker.merge_prompts(0))
    assert len(immunizer.plans) == 1  # zq's (the first word's), built before any step
    assert immunizer.plan is immunizer.plan_for(attacker) and len(immunizer.plans) == 2  # qjx's, when drawn
    assert all(plan.gram is immunizer.regularizer for plan in immunizer.plans.values())  # the bank's, once
    assert_gradients_equal_the_objectives(immunizer, lambda: _batches(concepts), SEED + 1)


def test_sd_shaped_textual_inversion_replaces_a_multi_token_name_by_one_token(sd15_model_dir, sdxl_model_dir):
    """On CLIP-like BPE tokenizers, a concept word that splits into several tokens becomes the one fresh token;
    its vector moves the conditioning (in both of SDXL's encoders, one vector each)."""
    spec = ConceptSpec(name="zorblax", prompts=("a painting in the style of Zorblax Quenn",),
                       class_prompt="a painting")
    for folder, encoders in ((sd15_model_dir, ["text_encoder"]), (sdxl_model_dir, ["text_encoder", "text_encoder_2"])):
        components = Components.from_pretrained(folder)
        assert len(components.tokenizer.tokenize("Zorblax")) > 1
        concept = _concepts(components, [spec])[0]
        config = ImmunizeConfig(method="imma-joint", caption_bank="generic", prior_weight=0.0, retain_weight=0.0,
                                bank_prior_weight=0.0, attackers=({"kind": "textual-inversion"},))
        immunizer = immunizers.get("imma-joint")(config)
        immunizer.prepare(components, [spec], [concept])
        attacker, size = immunizer.attacker, len(components.tokenizer)
        assert attacker.caption(spec.prompts[0], 0) == "a painting in the style of <zorblax>"
        phi = attacker.start({}, [0], torch.Generator())
        assert list(phi) == [f"token:0:{encoder}" for encoder in encoders]
        batch = concept.batch(2, torch.Generator().manual_seed(0))
        hidden = attacker.hidden(phi, batch, 0)
        assert hidden.shape == batch.hidden.shape and not torch.allclose(hidden, batch.hidden)
        grads = torch.autograd.grad(hidden.square().sum(), list(phi.values()))
        assert all(g.abs().sum() > 0 for g in grads)
        assert len(components.tokenizer) == size


def test_cli_immunize_with_a_textual_inversion_attacker_saves_the_model_without_its_tokens(tiny_model_dir, tmp_path,
                                                                                          capsys):
    config = tmp_path / "immunize.yaml"
    config.write_text("attackers:\n  - {kind: textual-inversion, steps: 2}\n")
    out = tmp_path / "run"
    code = main([
        "immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out", str(out),
        "--config", str(config), "--steps", "2", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2",
        "--caption-bank", "toy",
    ])
    assert code == 0, capsys.readouterr().err
    before, after = Components.from_pretrained(tiny_model_dir), Components.from_pretrained(out / "model")
    assert len(after.tokenizer) == len(before.tokenizer)
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()
    rows = after.text_encoder.get_input_embeddings().weight
    assert rows.shape == before.text_encoder.get_input_embeddings().weight.shape
    assert torch.equal(rows, before.text_encoder.get_input_embeddings().weight)
    record = json.loads((out / "immunization.json").read_text())
    assert record["config"]["attackers"] == [{"kind": "textual-inversion", "lr": 3.0, "steps": 2,
                                              "prompt": "fresh-token"}]  # with its kind's defaults: what ran
    assert {"upper/stripes", "lower/stripes"} <= set(record["log"][0])


@pytest.mark.parametrize("kind", ["full", "lora", "textual-inversion", "custom-diffusion"])
def test_a_skipped_attack_draws_what_the_attack_draws(world, kind):
    """A process that leaves a concept's attack to another draws from the shared generator what the attack draws
    (fresh factors or token, then each step's noise and timesteps), so that both processes stay in step."""
    _, concepts, make = world
    immunizer = make("mima", "second-order", {"kind": kind, "lr": 0.5, "steps": 2})
    base = immunizer.base_parameters()
    lower, _ = _batches(concepts)["dots"]
    attacked, skipped = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    immunizer.unroll(base, [lower], [1], attacked)
    immunizer.skip_attack(base, lower, 1, skipped)
    assert torch.equal(attacked.get_state(), skipped.get_state())
