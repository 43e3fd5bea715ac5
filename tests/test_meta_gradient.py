"""The MIMA meta-gradient: second order against finite differences and a hand-unrolled reference; first order
against the gradient with the inner step detached."""

import copy
from contextlib import nullcontext

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradient_checks import assert_finite_differences_close, assert_gradients_equal_the_objectives
from mima import functional
from mima.data.concepts import toy_concept_spec
from mima.immunize import ImmunizeConfig, bilevel, immunizers
from mima.immunize.attacker_spec import DEFAULT_ATTACKERS
from mima.immunize.class_batches import retain_batches
from mima.losses import diffusion_loss
from mima.models.cross_attention import differentiable_attention, key_value_parameter_names
from mima.models.encoding import EncodedConcept, EncodedImages
from mima.utils.device import GraphBytes

SEED = 7


def _random_images(prompt: str, components, g: torch.Generator) -> EncodedImages:
    size = components.unet.config.sample_size
    mean = torch.randn(3, 4, size, size, generator=g, dtype=torch.float64)
    hidden = components.encode_prompts([prompt] * 3).detach().double()
    return EncodedImages(mean, 0.1 * torch.ones_like(mean), hidden)


def _random_concept(name: str, components, seed: int, with_prior: bool = False) -> EncodedConcept:
    g = torch.Generator().manual_seed(seed)
    instance = _random_images(f"a painting in {name} style", components, g)
    return EncodedConcept(name, instance, _random_images("a painting", components, g) if with_prior else None)


@pytest.fixture
def setup(tiny_components):
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec("stripes"), toy_concept_spec("dots")]
    concepts = [_random_concept(s.name, components, i) for i, s in enumerate(specs)]

    def make(order: str, method: str = "mima", inner_clip: float = 0.0, **overrides):
        # attackers=(): one `full` attacker
        config = ImmunizeConfig(
            method=method, order=order, inner_lr=0.5, inner_clip=inner_clip, prior_weight=0.0, caption_bank="toy",
            upper_params=("*attn2.to_k*", "*attn2.to_v*", "*attn2.to_q*"),
            **{"hvp": "exact", "attackers": (), "retain_prompt": "class", "bank_prior_weight": 0.0, **overrides},
        )
        immunizer = immunizers.get(method)(config)
        immunizer.prepare(components, specs, concepts)
        return immunizer

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    def objective(immunizer):
        return immunizer.objective(batches(), torch.Generator().manual_seed(SEED + 1))[0]

    make.concepts = concepts  # the concepts every immunizer is prepared on
    return components, make, objective


def _gradient(immunizer, objective):
    params = immunizer.trainable_parameters()
    return dict(zip(params, torch.autograd.grad(objective(immunizer), list(params.values())), strict=True))


LORA = {"kind": "lora", "lr": 0.5, "steps": 2, "clip": 0.05, "rank": 2}
"""A lora simulated attacker whose down factor matters: its first step moves only `up` (`up` starts at 0)."""


@pytest.mark.parametrize(("overrides", "directions"), [({}, 3), ({"attackers": (LORA,)}, 1)])
def test_second_order_meta_gradient_matches_finite_differences(setup, overrides, directions):
    _, make, objective = setup
    immunizer = make("second-order", **overrides)
    grads = _gradient(immunizer, objective)
    params = immunizer.trainable_parameters()
    g = torch.Generator().manual_seed(0)
    for _ in range(directions):
        direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        eps = 1e-5
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(sign * eps * direction[n])
            values.append(objective(immunizer).item())
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(sign * eps * direction[n])
        finite_difference = (values[0] - values[1]) / (2 * eps)
        analytic = sum((grads[n] * direction[n]).sum() for n in params).item()
        assert abs(finite_difference) > 1e-6  # a real, non-vanishing directional derivative
        assert analytic == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)


def _hand_unrolled_gradient(immunizer, objective_batches, generator_seed, create_graph, clip):
    """MIMA written out by hand: per-concept SGD step (its gradient scaled down to global norm `clip` if longer),
    Merge, mean upper loss. Returns its gradient on S^u and the inner gradients' norms."""
    unet, scheduler = immunizer.unet, immunizer.scheduler
    upper = immunizer.trainable_parameters()
    module_params = dict(unet.named_parameters())
    base = {n: upper.get(n, module_params[n].detach().requires_grad_()) for n in module_params}
    generator = torch.Generator().manual_seed(generator_seed)

    def loss(params, batch):
        def call(x, t, h):
            return torch.func.functional_call(unet, params, (x, t), {"encoder_hidden_states": h}).sample

        return diffusion_loss(call, scheduler, batch.latents, batch.hidden, generator=generator)

    copies, norms = [], []
    for lower, _ in objective_batches.values():
        grads = torch.autograd.grad(loss(base, lower), list(base.values()), create_graph=create_graph)
        step = [g if create_graph else g.detach() for g in grads]
        norm = torch.cat([g.flatten() for g in step]).norm()
        norms.append(norm.item())
        if clip and norm > clip:
            step = [g * (clip / norm) for g in step]
        copies.append({n: p - 0.5 * g for (n, p), g in zip(base.items(), step, strict=True)})
    merged = immunizer.plan.merge(base, copies)
    upper_losses = [loss(merged, up) for _, up in objective_batches.values()]
    objective = -torch.stack(upper_losses).mean()
    return dict(zip(upper, torch.autograd.grad(objective, list(upper.values())), strict=True)), norms


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("order", ["second-order", "first-order"])
def test_meta_gradient_matches_hand_unrolled_reference(setup, order, clip):
    components, make, objective = setup
    immunizer = make(order, inner_clip=clip)
    grads = _gradient(immunizer, objective)
    g = torch.Generator().manual_seed(SEED)
    batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in make.concepts}
    with differentiable_attention():  # the fused attention kernels have no double backward
        reference, norms = _hand_unrolled_gradient(immunizer, batches, SEED + 1, order == "second-order", clip)
    assert not clip or min(norms) > clip  # the clip binds on every concept's step
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-9, atol=1e-12)


def test_first_and_second_order_differ(setup):
    _, make, objective = setup
    first, second = _gradient(make("first-order"), objective), _gradient(make("second-order"), objective)
    assert any(not torch.allclose(first[n], second[n]) for n in first)


def test_merge_plan_is_identity_when_nothing_adapted(setup):
    components, make, _ = setup
    immunizer = make("second-order")
    base = {n: p.detach() for n, p in components.unet.named_parameters()}
    merged = immunizer.plan.merge(base, [base, base])
    kv = set(key_value_parameter_names(components.unet))
    for name in base:
        torch.testing.assert_close(merged[name], base[name], rtol=0, atol=1e-9 if name in kv else 0)


def test_a_clipped_inner_step_has_the_clip_norm_and_exact_second_order_gradients():
    from mima.functional import sgd_step

    def step(w: torch.Tensor, max_norm: float) -> dict[str, torch.Tensor]:
        loss = (torch.sin(w) * w).sum() + (w**4).sum()
        return sgd_step({"w": w}, loss, lr=0.5, order="second-order", max_norm=max_norm)

    w = torch.tensor([0.9, -1.3, 2.0], dtype=torch.float64, requires_grad=True)
    clipped, free = step(w, 1.0)["w"], step(w, 0.0)["w"]
    assert abs((w - clipped).norm().item() - 0.5) < 1e-12  # the gradient (norm > 30) is scaled to norm 1
    assert (w - free).norm().item() > 10
    assert torch.allclose(step(w, 1e6)["w"], free)  # a clip above the norm changes nothing
    assert torch.autograd.gradcheck(lambda v: (step(v, 1.0)["w"] ** 2).sum(), (w,))


@pytest.mark.parametrize(
    ("method", "order", "overrides"),
    [
        ("mima", "second-order",
         {"inner_clip": 0.05, "prior_weight": 0.7, "anchor_weight": 0.3, "retain_weight": 0.5}),
        ("mima", "second-order", {"inner_steps": 2, "inner_clip": 0.05}),
        ("mima", "first-order", {"inner_clip": 0.05, "prior_weight": 0.7, "retain_weight": 0.5}),
        ("mima", "second-order", {"lower_params": ("*attn*", "*conv_in*"), "inner_clip": 0.0}),
        ("imma-joint", "second-order", {"inner_clip": 0.05}),
        ("imma-joint", "second-order", {"inner_steps": 2}),
        ("imma", "second-order", {"inner_clip": 0.05}),
        ("mima", "second-order", {"attackers": (LORA,), "prior_weight": 0.7, "retain_weight": 0.5}),
        ("mima", "first-order", {"attackers": (LORA,), "retain_weight": 0.5}),
        ("imma-joint", "second-order", {"attackers": (LORA,), "retain_weight": 0.5}),
        ("imma-joint", "first-order", {"attackers": (LORA,), "retain_weight": 0.5}),
        ("mima", "second-order", {"attackers": ({**LORA, "prompt": "description"},), "retain_weight": 0.5}),
        ("mima", "first-order", {"attackers": ({"kind": "full", "prompt": "description", "lr": 0.5},)}),
        ("imma-joint", "second-order", {"attackers": ({"kind": "full", "prompt": "description", "lr": 0.5},)}),
        ("mima", "second-order", {"attackers": DEFAULT_ATTACKERS, "retain_prompt": "attacker", "retain_weight": 0.5}),
        ("mima", "second-order", {"inner_clip": 0.05, "retain_weight": 0.5, "retain_order": "first-order"}),
        ("imma-joint", "second-order", {"attackers": (LORA,), "retain_weight": 0.5, "retain_order": "first-order"}),
        ("mima", "second-order", {"attackers": (LORA,), "retain_weight": 0.5, "retain_lr_scale": 3.0}),
        ("mima", "second-order", {"inner_clip": 0.05, "prior_weight": 0.7, "bank_prior_weight": 0.4,
                                   "bank_prior_target": "noise"}),
        ("imma-joint", "first-order", {"attackers": (LORA,), "retain_weight": 0.5, "bank_prior_weight": 0.4,
                                        "bank_prior_target": "noise"}),
        ("mima", "second-order", {"bank_prior_weight": 0.4, "bank_prior_target": "original"}),
        ("mima", "second-order", {"attackers": DEFAULT_ATTACKERS, "retain_prompt": "attacker", "retain_weight": 0.5,
                                   "retain_target": "original"}),
        ("imma-joint", "first-order", {"inner_clip": 0.05, "retain_weight": 0.5, "retain_target": "original"}),
        ("mima", "second-order", {"inner_clip": 0.05, "prior_weight": 0.7, "upper_contrast": 0.5}),
        ("mima", "second-order", {"attackers": DEFAULT_ATTACKERS, "upper_contrast": 1.0}),
        ("imma-joint", "first-order", {"attackers": (LORA,), "upper_contrast": 1.0}),
        ("imma", "second-order", {"inner_clip": 0.05, "upper_contrast": 0.5}),
        ("imma-each", "second-order", {"inner_clip": 0.05, "prior_weight": 0.7, "retain_weight": 0.5}),
        ("imma-each", "first-order", {"attackers": ({**LORA, "steps": 2, "trajectory_points": 2},)}),
        ("imma-each", "second-order", {"attackers": DEFAULT_ATTACKERS, "retain_prompt": "attacker",
                                        "retain_weight": 0.5, "upper_contrast": 0.5}),
    ],
)
def test_concept_by_concept_gradient_equals_the_whole_objectives(tiny_components, method, order, overrides):
    """`gradients` (one concept's double-backward graph at a time) gives the value and gradient of `objective`
    (every concept's graph at once), with the prior, anchor, retain and bank prior terms too."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots", "checker")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    config = ImmunizeConfig(method=method, order=order, inner_lr=0.5, caption_bank="toy", hvp="exact",
                            **{"prior_weight": 0.0, "retain_weight": 0.0, "bank_prior_weight": 0.0, "attackers": (),
                               "retain_prompt": "class", **overrides})
    bank = _random_images("a painting in rings style", components, torch.Generator().manual_seed(5))
    immunizer = immunizers.get(method)(config)
    immunizer.prepare(components, specs, concepts)
    g = torch.Generator().manual_seed(6)  # a teacher the weights have moved away from, as after some outer steps
    original = {name: p.detach() + 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype)
                for name, p in components.unet.named_parameters() if name in immunizer.upper_names}
    immunizer.bank, immunizer.original = bank, original

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    objective, _ = assert_gradients_equal_the_objectives(immunizer, batches, SEED + 1)
    all_at_once = immunizers.get(method)(config.with_overrides(concept_by_concept=False))
    all_at_once.prepare(components, specs, concepts)
    all_at_once.bank, all_at_once.original = bank, original
    assert all_at_once.gradients(batches(), torch.Generator().manual_seed(SEED + 1))[0] == objective


def test_imma_each_with_one_concept_is_imma(tiny_components):
    """One concept: its own copy is the only copy, so imma-each's value and gradient are IMMA's."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec("stripes")]
    concepts = [_random_concept("stripes", components, 0, with_prior=True)]
    config = ImmunizeConfig(caption_bank="toy", hvp="exact", prior_weight=0.5, retain_weight=0.0,
                            bank_prior_weight=0.0, attackers=(LORA,))
    results = []
    for method in ("imma-each", "imma"):
        immunizer = immunizers.get(method)(config.with_overrides(method=method))
        immunizer.prepare(components, specs, concepts)
        g = torch.Generator().manual_seed(SEED)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
        results.append(immunizer.gradients(batches, torch.Generator().manual_seed(SEED + 1)))
    (each, each_grads, _), (imma, imma_grads, _) = results
    assert each == pytest.approx(imma, rel=1e-12)
    for name, grad in imma_grads.items():
        torch.testing.assert_close(each_grads[name], grad, rtol=1e-10, atol=1e-14)


def test_imma_each_takes_each_upper_loss_at_its_own_copy_where_mima_averages_them(tiny_components):
    """The copies are MIMA's (same draws); MIMA takes every upper loss at their Merge, which outside the keys and
    values is their mean, and imma-each takes concept n's at copy n."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]
    concepts = [_random_concept(s.name, components, i) for i, s in enumerate(specs)]
    config = ImmunizeConfig(caption_bank="toy", prior_weight=0.0, retain_weight=0.0, bank_prior_weight=0.0,
                            attackers=({**LORA, "clip": 0.0},))
    points = {}
    for method in ("imma-each", "mima"):
        immunizer = immunizers.get(method)(config.with_overrides(method=method))
        immunizer.prepare(components, specs, concepts)
        g = torch.Generator().manual_seed(SEED)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
        base = immunizer.base_parameters()
        [points[method]], _ = immunizer.adapted_parameters(base, batches, torch.Generator().manual_seed(SEED + 1))
    (own, _), (merged, _) = points["imma-each"], points["mima"]
    key_values = set(key_value_parameter_names(components.unet))
    averaged = [name for name in merged[0] if name not in key_values]
    assert averaged and merged[0] is merged[1]  # MIMA: one theta' for every concept
    for name in averaged:
        assert not torch.allclose(own[0][name], own[1][name])  # each copy its own update
        torch.testing.assert_close(merged[0][name], (own[0][name] + own[1][name]) / 2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_the_contrasted_ascent_takes_only_what_the_concept_prompt_adds(tiny_components, method):
    """`upper_contrast` c: each upper loss is L(concept prompt) - c L(class prompt) on the same images, noise and
    timesteps. Where the class prompt is the concept's own, that is (1 - c) L, value and gradient, so at c = 1 the
    ascent has nothing to climb; under a class prompt of its own the contrast has a gradient."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]

    def ascent(contrast: float, class_prompt: str | None) -> tuple[float, dict]:
        concepts = []
        for i, spec in enumerate(specs):
            g = torch.Generator().manual_seed(i)
            instance = _random_images(spec.prompt, components, g)
            concepts.append(EncodedConcept(spec.name, instance, _random_images(class_prompt or spec.prompt,
                                                                               components, g)))
        config = ImmunizeConfig(method=method, inner_lr=0.5, caption_bank="toy", prior_weight=0.0, retain_weight=0.0,
                                bank_prior_weight=0.0, attackers=(LORA,), upper_contrast=contrast)
        immunizer = immunizers.get(method)(config)
        immunizer.prepare(components, specs, concepts)
        g = torch.Generator().manual_seed(SEED)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
        objective, grads, _ = immunizer.gradients(batches, torch.Generator().manual_seed(SEED + 1))
        return objective, grads

    plain, plain_grads = ascent(0.0, None)
    assert plain < 0 and any(g.abs().sum() > 0 for g in plain_grads.values())
    quarter, quarter_grads = ascent(0.25, None)
    assert quarter == pytest.approx(0.75 * plain, rel=1e-9)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(quarter_grads[name], 0.75 * grad, rtol=1e-8, atol=1e-14)
    whole, whole_grads = ascent(1.0, None)
    assert abs(whole) < 1e-12 and all(g.abs().max() < 1e-12 for g in whole_grads.values())
    _, classed_grads = ascent(1.0, "a painting")
    assert any(g.abs().max() > 1e-6 for g in classed_grads.values())


@pytest.mark.parametrize("method", ["mima", "imma-joint", "imma-each"])
def test_the_focused_ascent_weights_each_concept_as_its_focus_says(tiny_components, method):
    """`upper_focus`: the objective is minus the mean of the counted upper losses, each times its concept's weight
    (logged unweighted), on both the concept-by-concept and the one-expression path; weights that favour one
    concept move the gradient away from the plain mean's."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots", "checker")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    config = ImmunizeConfig(method=method, inner_lr=0.5, caption_bank="toy", hvp="exact", prior_weight=0.5,
                            retain_weight=0.0, bank_prior_weight=0.0, attackers=(LORA,), upper_focus=0.05)

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    immunizer = immunizers.get(method)(config)
    immunizer.prepare(components, specs, concepts)
    plain, plain_grads, logs = immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1))
    assert immunizer.focus.weights().tolist() == [1.0, 1.0, 1.0]  # nothing counted yet
    immunizer.end_step({"upper/stripes": 0.1, "upper/dots": 0.1, "upper/checker": 0.1})
    immunizer.end_step({"upper/stripes": 0.6, "upper/dots": 0.1, "upper/checker": 0.3})  # dots has not risen
    weights = immunizer.focus.weights().tolist()
    assert weights[1] > weights[2] > weights[0] and sum(weights) == pytest.approx(3.0)
    focused, grads = assert_gradients_equal_the_objectives(immunizer, batches, SEED + 1)
    uppers = [logs[f"upper/{name}"] for name in ("stripes", "dots", "checker")]
    ascent = -sum(w * u for w, u in zip(weights, uppers, strict=True)) / 3
    assert focused == pytest.approx(plain + ascent + sum(uppers) / 3, rel=1e-9)
    assert any(not torch.allclose(grads[name], plain_grads[name], rtol=1e-3) for name in grads)


def test_the_retain_term_can_caption_class_images_as_a_fresh_token_attacker_does(tiny_components):
    """`retain_prompt: attacker`: under a fresh-token LoRA attacker, the retain term's class images keep their
    latents and take the captions that attacker gives the concept's images ("sks" for the concept's words); under
    a concept-prompt attacker, their class prompt; and the concept-by-concept gradient still equals the objective's."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]
    concepts = []
    for i, spec in enumerate(specs):
        g = torch.Generator().manual_seed(i)
        instance, prior = _random_images(spec.prompt, components, g), _random_images("a painting", components, g)
        instance.prompts = [spec.prompt] * 3
        concepts.append(EncodedConcept(spec.name, instance, prior))

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    def immunizer(prompt: str, retain_prompt: str):
        attacker = {**LORA, "prompt": prompt}
        config = ImmunizeConfig(inner_lr=0.5, caption_bank="toy", hvp="exact", prior_weight=0.0, retain_weight=0.5,
                                bank_prior_weight=0.0, attackers=(attacker,), retain_prompt=retain_prompt)
        made = immunizers.get("mima")(config)
        made.prepare(components, specs, concepts)
        return made

    def retained(prompt: str, retain_prompt: str):
        made = immunizer(prompt, retain_prompt)
        triples = retain_batches(drawn, made.class_of, made.attacker, retain_prompt)
        return made.attacker, zip(triples, drawn.values(), strict=True)

    drawn = batches()
    sks = components.encode_prompts(["a painting in sks style"] * 2).double()  # both concepts' prompt, token for name
    attacker, triples = retained("fresh-token", "attacker")
    for n, ((lower, upper, concept), (own_lower, own_upper)) in enumerate(triples):
        assert torch.equal(lower.latents, own_lower.prior[0]) and torch.equal(upper.latents, own_upper.prior[0])
        assert concept == n  # conditioned as the attacker conditions that concept's images
        # the class prompt's encoding kept beside the new captions: what `retain_target: original`'s teacher reads
        assert torch.equal(lower.hidden, own_lower.prior[1]) and torch.equal(upper.hidden, own_upper.prior[1])
        torch.testing.assert_close(attacker.hidden({}, lower, concept), sks)
        torch.testing.assert_close(attacker.hidden({}, upper, concept), sks)
    for prompt, retain_prompt in (("fresh-token", "class"), ("concept", "attacker")):
        for (lower, upper, concept), (own_lower, own_upper) in retained(prompt, retain_prompt)[1]:
            assert torch.equal(lower.hidden, own_lower.prior[1]) and torch.equal(upper.hidden, own_upper.prior[1])
            assert concept is None
    assert_gradients_equal_the_objectives(immunizer("fresh-token", "attacker"), batches, SEED + 1)


def _with_retained_concepts(tiny_components):
    """Two targets (their prompts kept, which a fresh-token attacker rewrites), two retained concepts (rings,
    zigzag; std 0, so every latent is the concept's constant 10 + r), a draw of the targets' batches, and a maker
    of MIMA immunizers retaining them under one given simulated attacker (float64, the text encoder too: a learned
    token's gradient runs through it)."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    components.text_encoder.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    for spec, concept in zip(specs, concepts, strict=True):
        concept.instance.prompts = [spec.prompt] * 3
    others = [toy_concept_spec(name) for name in ("rings", "zigzag")]
    retained = []
    for r, spec in enumerate(others):
        hidden = components.encode_prompts([spec.prompt] * 3).detach().double()
        mean = torch.full((3, 4, 8, 8), 10.0 + r, dtype=torch.float64)
        images = EncodedImages(mean, torch.zeros_like(mean), hidden, [spec.prompt] * 3)
        retained.append((spec, EncodedConcept(spec.name, images, None)))

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    def make(attacker: dict, **overrides):
        config = ImmunizeConfig(inner_lr=0.5, caption_bank="toy", hvp="exact", prior_weight=0.0, retain_weight=0.5,
                                bank_prior_weight=0.0, attackers=(attacker,),
                                retain_concepts=("toy:rings", "toy:zigzag"), **overrides)
        made = immunizers.get("mima")(config)
        made.retained = retained
        made.prepare(components, specs, concepts)
        return made

    return components, others, retained, batches, make


def test_the_retain_term_can_take_other_concepts_images(tiny_components):
    """`retain_concepts`: the retain term takes as many batches as it takes class batches, each pair from one of the
    retained concepts (drawn from the step's generator), under their own prompts, or under a fresh-token attacker
    with `retain_prompt: attacker` with that attacker's token for their name; the concept-by-concept gradient still
    equals the objective's."""
    components, others, retained, batches, make = _with_retained_concepts(tiny_components)

    def immunizer(prompt: str, retain_prompt: str):
        return make({**LORA, "prompt": prompt}, retain_prompt=retain_prompt)

    def pairs(prompt: str, retain_prompt: str, seed: int):
        made = immunizer(prompt, retain_prompt)
        return made.attacker, retain_batches(batches(), made.class_of, made.attacker, retain_prompt, made.retained,
                                             torch.Generator().manual_seed(seed))

    drawn = [triple for seed in range(4) for triple in pairs("concept", "class", seed)[1]]
    assert len(drawn) == 8 and {triple[0].latents.flatten()[0].item() for triple in drawn} == {10.0, 11.0}
    for lower, upper, concept in drawn:  # a pair from one concept, under its own prompt
        r = int(lower.latents.flatten()[0].item()) - 10
        assert (lower.latents == 10 + r).all() and (upper.latents == 10 + r).all() and concept is None
        torch.testing.assert_close(lower.hidden, retained[r][1].instance.hidden[:2])
    attacker, triples = pairs("fresh-token", "attacker", 0)
    for lower, upper, concept in triples:  # the retained concepts' indices follow the two targets'
        r = int(lower.latents.flatten()[0].item()) - 10
        assert concept == 2 + r
        token = components.encode_prompts([others[r].prompt.replace(others[r].name, "sks")] * 2).double()
        torch.testing.assert_close(attacker.hidden({}, lower, concept), token)
        torch.testing.assert_close(attacker.hidden({}, upper, concept), token)
    made = immunizer("fresh-token", "attacker")
    assert_gradients_equal_the_objectives(made, batches, SEED + 1)

    def retain_term():
        return made.objective(batches(), torch.Generator().manual_seed(SEED + 1))[1]["retain"]

    with_retained = retain_term()
    made.retained = []  # the targets' class images instead: the retain term is another one
    assert retain_term() != pytest.approx(with_retained, rel=1e-6)


@pytest.mark.parametrize("kind", ["textual-inversion", "custom-diffusion"])
def test_the_retain_term_teaches_a_learned_token_the_retained_concepts(tiny_components, kind):
    """`retain_prompt: attacker` under an attacker that learns its token: the retain term's simulated attack trains a
    token of its own on the retained concepts' images (their indices after the targets'), so the term is their loss
    after that token learned them, below its value with the token left where it starts; the concept-by-concept
    gradient still equals the objective's, and under the alternating schedule the retain term carries nothing."""
    _, _, _, batches, make = _with_retained_concepts(tiny_components)

    def retain_term(lr: float) -> float:  # one SGD step: the loss after it falls as the step is taken
        made = make({"kind": kind, "steps": 1, "lr": lr}, retain_prompt="attacker")
        return made.objective(batches(), torch.Generator().manual_seed(SEED + 1))[1]["retain"]

    assert retain_term(1.0) < retain_term(1e-9) - 5e-4  # (a learning rate must be positive)
    attacker = {"kind": kind, "steps": 2, "lr": 0.5}
    assert_gradients_equal_the_objectives(make(attacker, retain_prompt="attacker"), batches, SEED + 1)
    made = make(attacker, retain_prompt="attacker", persistent_attacker=True)
    made.gradients(batches(), torch.Generator().manual_seed(SEED + 1))
    assert made.distribution.carried and {key.split(":")[1] for key in made.distribution.carried} <= {"0", "1"}


def test_the_retain_term_can_have_attackers_of_its_own(tiny_components):
    """`retain_attackers`: the retain term is the one its own attacker would give as the step's attacker (same
    draws), the ascent keeps the step's attacker, and the concept-by-concept gradient still equals the objective's,
    a many-step first-order attacker taken along its trajectory (its start a point or not) included."""
    _, _, _, batches, make = _with_retained_concepts(tiny_components)
    token = {"kind": "textual-inversion", "steps": 2, "lr": 0.5}

    def retain_term(made) -> tuple[list[float], dict]:
        base = {name: p.detach() for name, p in made.base_parameters().items()}
        [(name, term)] = made.preservation_gradients(base, batches(), torch.Generator().manual_seed(1))
        assert name == "retain"
        return term

    own = make(LORA, retain_prompt="attacker", retain_attackers=(token,))
    losses, grads = retain_term(own)
    alone_losses, alone = retain_term(make(token, retain_prompt="attacker"))
    assert own.attacker.spec.kind == "lora" and losses == alone_losses and grads.keys() == alone.keys()
    for name, grad in alone.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=0)
    assert retain_term(make(LORA, retain_prompt="attacker"))[0] != losses  # the LoRA's own retain term differs
    assert_gradients_equal_the_objectives(own, batches, SEED + 1)
    long = {**token, "steps": 4, "order": "first-order", "trajectory_points": 2}
    for attacker in (long, {**long, "trajectory_start": True}):  # the start: the init word in the token's place
        assert_gradients_equal_the_objectives(make(LORA, retain_prompt="attacker", retain_attackers=(attacker,)),
                                              batches, SEED + 1)


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_gradient_checkpointing_gives_the_same_meta_gradient(setup, method):
    """Checkpointed UNet blocks are recomputed with the substituted weights and the math attention kernel, so the
    second-order meta-gradient is unchanged (diffusers' own checkpointing would recompute with the module's
    weights under functional_call)."""
    components, make, _ = setup
    g = torch.Generator().manual_seed(SEED)
    immunizer = make("second-order", method, inner_clip=0.05)
    batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in make.concepts}
    plain = immunizer.gradients(batches, torch.Generator().manual_seed(SEED + 1))
    checkpointed = make("second-order", method, inner_clip=0.05, gradient_checkpointing=True)
    assert components.unet.down_blocks[0].gradient_checkpointing
    again = checkpointed.gradients(batches, torch.Generator().manual_seed(SEED + 1))
    assert again[0] == pytest.approx(plain[0], rel=1e-12)
    for name in plain[1]:
        torch.testing.assert_close(again[1][name], plain[1][name], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("attackers", [(), (LORA,)], ids=["full", "lora"])
def test_kept_inner_gradients_save_one_unet_pass_per_copy_and_change_nothing(setup, monkeypatch, attackers):
    """With `kept_gradients`, each copy's finite-difference product reuses the gradient its attack took: one
    UNet forward fewer per copy but the last (which keeps its whole run anyway), and the same meta-gradient. A LoRA
    attacker's steps leave S^u where it is, so they take S^u's gradient too (`unroll`'s `also`), in the same
    backward: without that, its products would recompute it at every inner step of every copy."""
    components, make, _ = setup
    forwards = []
    components.unet.register_forward_hook(lambda *_: forwards.append(1))

    def run(fraction: float):
        immunizer = make("second-order", inner_clip=0.05, hvp="finite-difference", kept_gradients=fraction,
                         attackers=attackers)
        g = torch.Generator().manual_seed(SEED)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in make.concepts}
        forwards.clear()
        value, grads, _ = immunizer.gradients(batches, torch.Generator().manual_seed(SEED + 1))
        return value, grads, len(forwards)

    def assert_same(run, reference):
        assert run[0] == reference[0]
        for name, grad in reference[1].items():
            torch.testing.assert_close(run[1][name], grad, rtol=1e-12, atol=1e-15)

    steps = attackers[0]["steps"] if attackers else 1  # a product per inner step
    recorded = []  # per copy: whether its steps took S^u's gradient too

    def spy(*args, also=(), **kwargs):
        recorded.append(bool(also))
        return functional.unroll(*args, also=also, **kwargs)

    monkeypatch.setattr(bilevel, "unroll", spy)
    recomputed = run(0.0)
    assert recorded == [False] * (len(make.concepts) - 1) + [True]  # no budget: only the last keeps its gradients
    kept = run(1.0)
    assert recomputed[2] == kept[2] + (len(make.concepts) - 1) * steps
    assert_same(kept, recomputed)
    monkeypatch.setattr(bilevel, "unroll", lambda *args, also=(), **kwargs: functional.unroll(*args, **kwargs))
    unrecorded = run(1.0)  # the full attacker's steps cover S^u anyway
    assert unrecorded[2] == kept[2] + (len(make.concepts) * steps if attackers else 0)
    assert_same(unrecorded, kept)


@pytest.mark.parametrize(("copies", "measured", "keeps"), [(1.5, True, True), (0.5, True, False), (1.5, False, True),
                                                          (0.5, False, False)])
def test_kept_gradients_take_a_fraction_of_the_peak_memory(setup, monkeypatch, copies, measured, keeps):
    """The copies keep their inner-step gradients while they fit in `kept_gradients` of the peak memory before the
    steps, or of the UNet's parameters where the device has no peak measure: room for 1.5 copies' gradients keeps the
    first copy's (the last keeps its run anyway), room for 0.5 keeps none."""
    components, make, _ = setup
    unet_bytes = functional.tensor_bytes(components.unet.parameters())
    lower_bytes = functional.tensor_bytes(p for name, p in components.unet.named_parameters()
                                          if name in make("second-order").lower_names)
    peak = 4 * unet_bytes
    monkeypatch.setattr(bilevel, "peak_memory_bytes", lambda device: peak if measured else None)
    immunizer = make("second-order", inner_clip=0.05, hvp="finite-difference",
                     kept_gradients=copies * lower_bytes / (peak if measured else unet_bytes))
    kept, for_replay = [], functional.Unrolled.for_replay

    def spy(run, keep_gradients=False):
        kept.append(keep_gradients)
        return for_replay(run, keep_gradients)

    monkeypatch.setattr(functional.Unrolled, "for_replay", spy)
    g = torch.Generator().manual_seed(SEED)
    immunizer.gradients({c.name: (c.batch(2, g), c.batch(2, g)) for c in make.concepts},
                        torch.Generator().manual_seed(SEED + 1))
    assert kept == [keeps]


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_fused_batches_go_through_the_unet_together_and_change_nothing(tiny_components, method):
    """`fused_batches`: batches at one set of weights (the upper losses at the merged or attacked weights, the prior
    term's class images, the retain term's attack, its product and its upper losses) go through the UNet in one call
    where their graph fits, and the value and gradient are one batch at a time's, to rounding."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots", "checker")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    sizes = []
    components.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))

    def run(fraction: float):
        config = ImmunizeConfig(method=method, inner_lr=0.5, caption_bank="toy", hvp="finite-difference",
                                attackers=(LORA,), prior_weight=0.7, retain_weight=0.5, retain_prompt="class",
                                bank_prior_weight=0.0, fused_batches=fraction)
        immunizer = immunizers.get(method)(config)
        immunizer.prepare(components, specs, concepts)
        g = torch.Generator().manual_seed(SEED)
        sizes.clear()
        value, grads, _ = immunizer.gradients({c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts},
                                              torch.Generator().manual_seed(SEED + 1))
        return immunizer.fused, value, grads, list(sizes)

    one, value, grads, one_sizes = run(0.0)
    every, fused_value, fused_grads, fused_sizes = run(1e6)
    assert one == 1 and every >= len(concepts)
    assert set(one_sizes) == {2}
    three = fused_sizes.count(3 * 2)  # calls that take the three concepts' batches at once
    # the prior term 1; the retain term's attack and its product 2 each (one per inner step), its upper losses 1;
    # MIMA's upper losses at the merged weights 1 (its copies' attacks take one batch each); imma-joint's one attack
    # on every concept like the retain term's, 2 + 2 + 1
    assert three == 1 + 5 + (1 if method == "mima" else 5)
    assert len(fused_sizes) == len(one_sizes) - 2 * three
    assert fused_value == pytest.approx(value, rel=1e-12)
    for name, grad in grads.items():  # the finite-difference product divides rounding by its step, 1e-5
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-7, atol=1e-11)


def _retain_term(components, **overrides):
    """The retain term alone (losses, gradient on S^u, the immunizer) of MIMA on two random concepts with class
    images, under the LoRA attacker unless `overrides` say otherwise."""
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    config = ImmunizeConfig(**{"caption_bank": "toy", "attackers": (LORA,), "prior_weight": 0.0, "retain_weight": 0.5,
                               "bank_prior_weight": 0.0, "retain_prompt": "class", **overrides})
    immunizer = immunizers.get("mima")(config)
    immunizer.prepare(components, specs, concepts)
    g = torch.Generator().manual_seed(SEED)
    batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
    base = {name: p.detach() for name, p in immunizer.base_parameters().items()}
    [(name, (losses, grads))] = immunizer.preservation_gradients(base, batches, torch.Generator().manual_seed(1))
    assert name == "retain"
    return losses, grads, immunizer


@pytest.mark.parametrize("attacker", [{"kind": "full", "lr": 0.5}, LORA])
def test_a_first_order_retain_term_skips_the_product_through_its_attack(tiny_components, attacker):
    """`retain_order: first-order`: the retain term's attack and upper losses are the same (same draws, same
    values), its gradient no longer goes through the attack's steps, which saves the finite-difference product's
    one UNet call per class batch and inner step."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    calls = []
    components.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))

    def retain(order: str):
        calls.clear()
        losses, grads, immunizer = _retain_term(components, inner_lr=0.5, hvp="finite-difference",
                                                attackers=(attacker,), retain_order=order, fused_batches=0.0)
        return losses, torch.cat([grads[n].flatten() for n in sorted(immunizer.upper_names)]), len(calls)

    losses, through, attacker_calls = retain("attacker")
    first_losses, first, first_calls = retain("first-order")
    assert first_losses == losses
    assert attacker_calls - first_calls == attacker.get("steps", 1) * 2  # a product per step and class batch
    assert (through - first).norm() > 1e-3 * through.norm()  # the attack's steps depend on S^u


def test_the_retain_terms_attack_steps_at_its_scaled_rate(tiny_components):
    """`retain_lr_scale`: the retain term is the one an attacker at that multiple of the rate would give (same
    draws), while the targets' copies keep the attacker's own rate."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()

    def retain(lr: float, scale: float):
        losses, grads, immunizer = _retain_term(components, attackers=({**LORA, "lr": lr},), retain_lr_scale=scale)
        assert immunizer.attacker.lr == lr  # restored for the copies
        return losses, grads

    scaled_losses, scaled = retain(0.5, 3.0)
    losses, grads = retain(1.5, 1.0)
    assert scaled_losses == losses and scaled.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(scaled[name], grad, rtol=1e-12, atol=0)
    assert retain(0.5, 1.0)[0] != losses  # the rate changes the term


def test_graph_bytes_count_what_a_backward_keeps_and_not_the_weights():
    """`GraphBytes` counts the tensors saved for the backward once each, and none of the ignored ones: for
    relu(x @ w) with w ignored, x and the relu's output."""
    x, w = torch.randn(5, 3, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    with GraphBytes([w]) as graph:
        (x @ w).relu().sum()
    assert graph.bytes == (5 * 3 + 5 * 7) * 4


def test_the_finite_difference_product_needs_no_double_backward(setup, monkeypatch):
    """`hvp: finite-difference` runs where only CPU flash attention is allowed, which has no double backward (the
    exact product fails there without the math kernel), and comes within tolerance of the exact gradient."""
    _, make, _ = setup

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in make.concepts}

    immunizer = make("second-order", inner_clip=0.05)
    value, exact, _ = immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert_finite_differences_close(immunizer, batches, SEED + 1, value, exact)
    monkeypatch.setattr(bilevel, "differentiable_attention", nullcontext)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), pytest.raises(RuntimeError, match="not implemented"):
        immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1))


def test_without_conflict_drops_the_component_against_the_other_gradient_only_where_they_conflict():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    other, free = {"a": randn(3, 4), "b": randn(5)}, {"a": randn(3, 4), "c": randn(2)}

    def inner(x, y):
        return sum((x[n] * y[n]).sum() for n in x if n in y)

    conflicting = functional.add_grads(free, {n: -(abs(inner(free, other)) + 1.0) / inner(other, other) * t
                                              for n, t in other.items()})
    assert inner(conflicting, other) < 0
    projected = functional.without_conflict(conflicting, other)
    assert abs(inner(projected, other)) < 1e-12  # orthogonal to the other: a step on it leaves that objective be
    removed = functional.add_grads(conflicting, {n: -t for n, t in projected.items()})
    ratio = removed["a"].flatten()[0] / other["a"].flatten()[0]  # what it dropped lies along the other
    for name, t in other.items():
        torch.testing.assert_close(removed[name], ratio * t)
    torch.testing.assert_close(projected["c"], conflicting["c"])  # a name the other lacks keeps its value
    agreeing = functional.add_grads(free, {n: (abs(inner(free, other)) + 1.0) / inner(other, other) * t
                                           for n, t in other.items()})
    assert functional.without_conflict(agreeing, other) is agreeing
    assert functional.without_conflict(conflicting, {}) is conflicting


@pytest.mark.parametrize("concept_by_concept", [True, False])
@pytest.mark.parametrize("project_ascent, project_preservation", [(True, False), (False, True), (True, True)])
def test_projection_removes_the_conflict_between_the_ascent_and_the_preservation_terms(
    tiny_components, concept_by_concept, project_ascent, project_preservation
):
    """`project_ascent`: the step's gradient is the preservation terms' plus the ascent's less its component along
    theirs; `project_preservation` the other way round; both: each less its component along the other's (autograd
    of each part of `objective` apart), concept by concept and all at once; here they conflict."""
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec(name) for name in ("stripes", "dots")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    config = ImmunizeConfig(inner_lr=0.5, caption_bank="toy", hvp="exact", prior_weight=0.7, retain_weight=0.5,
                            attackers=DEFAULT_ATTACKERS, retain_prompt="attacker", project_ascent=project_ascent,
                            project_preservation=project_preservation, bank_prior_weight=0.0,
                            concept_by_concept=concept_by_concept)
    immunizer = immunizers.get("mima")(config)
    immunizer.prepare(components, specs, concepts)

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    ascent, terms, _ = immunizer.objective_parts(batches(), torch.Generator().manual_seed(SEED + 1))
    assert len(terms) == 2  # prior and retain
    params = immunizer.trainable_parameters()
    parts = [dict(zip(params, torch.autograd.grad(part, list(params.values()), retain_graph=True), strict=True))
             for part in (ascent, sum(terms))]
    assert sum((parts[0][n] * parts[1][n]).sum() for n in params) < 0  # the projection has something to remove
    kept_ascent = functional.without_conflict(*parts) if project_ascent else parts[0]
    kept_terms = functional.without_conflict(parts[1], parts[0]) if project_preservation else parts[1]
    expected = functional.add_grads(kept_ascent, kept_terms)
    value, grads, _ = immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1))
    assert value == pytest.approx(sum(terms, ascent).item(), rel=1e-10)
    for name in params:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-8, atol=1e-9 * scale + 1e-15)
    unprojected = functional.add_grads(*parts)
    assert max((grads[n] - unprojected[n]).abs().max().item() for n in params) > 1e-6
    if project_preservation:  # the step's part for the terms no longer lowers the upper losses, to first order
        terms_part = {n: grads[n] - kept_ascent[n] for n in params}

        def norm(g: dict) -> torch.Tensor:
            return sum((g[n] ** 2).sum() for n in params) ** 0.5

        assert abs(sum((terms_part[n] * parts[0][n]).sum() for n in params)) < 1e-6 * norm(parts[0]) * norm(parts[1])
