"""The distribution of simulated attackers (issue 18, item 2): the specs, the per-step sampling, Adam inner steps,
first-order trajectories against a hand-written reference, the bounded ascent, and the alternating schedule."""

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.func import functional_call

from gradient_checks import assert_gradients_equal_the_objectives
from mima.cli import main
from mima.data.concepts import toy_concept_spec
from mima.errors import ConfigError
from mima.functional import adam_update
from mima.immunize import ImmunizeConfig, immunizers
from mima.immunize.distribution import _RETAIN_SAMPLING_STREAM, sample_attacker
from mima.losses import diffusion_loss
from test_immunize import _run, _unet_weights
from test_meta_gradient import SEED, _random_concept

UPPER = ("*attn2.to_k*", "*attn2.to_v*", "*attn2.to_q*")


def test_an_entry_takes_what_it_leaves_out_from_the_run():
    config = ImmunizeConfig(inner_lr=0.3, inner_steps=2, inner_clip=0.5, order="first-order",
                            attackers=("full", {"kind": "full", "steps": 6, "optimizer": "adam", "weight": 3.0,
                                                "trajectory_points": 3}))
    plain, adam = config.attacker_specs()
    assert (plain.lr, plain.steps, plain.clip, plain.order, plain.optimizer) == (None, 2, 0.5, "first-order", "sgd")
    assert (adam.steps, adam.weight, adam.trajectory_steps) == (6, 3.0, [2, 4, 6])
    assert adam.with_overrides(trajectory_start=True).trajectory_steps == [0, 2, 4, 6]
    assert ImmunizeConfig.from_dict(config.to_dict()) == config
    (default,) = config.with_overrides(attackers=[]).attacker_specs()  # today's attacker, from the inner_* fields
    assert (default.kind, default.lr, default.steps, default.order) == ("full", 0.3, 2, "first-order")


@pytest.mark.parametrize(("entry", "words"), [
    ({"optimizer": "adam"}, "Adam inner steps are first order only"),
    ({"steps": 5, "trajectory_points": 2}, "trajectory_points > 1 and trajectory_start need first order"),
    ({"trajectory_start": True}, "trajectory_points > 1 and trajectory_start need first order"),
    ({"steps": 2, "trajectory_points": 3, "order": "first-order"}, "between 1 and its steps"),
    ({"weight": 0}, "weight must be positive"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    (3, "a kind or a mapping"),
])
def test_bad_attackers_are_refused_when_the_config_is_built(entry, words):
    with pytest.raises(ConfigError, match=words):
        ImmunizeConfig(attackers=(entry,))


def test_sampling_depends_on_seed_and_step_only_and_follows_the_weights():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    draws = [sample_attacker([3.0, 1.0], seed=5, step=step) for step in range(400)]
    assert torch.equal(torch.random.get_rng_state(), before)  # no global draw: every process samples the same
    assert draws == [sample_attacker([3.0, 1.0], seed=5, step=step) for step in range(400)]
    assert 0.65 < draws.count(0) / 400 < 0.85
    assert draws != [sample_attacker([3.0, 1.0], seed=6, step=step) for step in range(400)]
    assert all(sample_attacker([2.0], seed=5, step=step) == 0 for step in range(5))


def test_functional_adam_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) for _ in range(4)]
    param = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([param], lr=0.1)
    phi, state = {"w": start.clone()}, None
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        phi, state = adam_update(phi, {"w": grad}, 0.1, state)
    torch.testing.assert_close(phi["w"], param.detach(), rtol=1e-6, atol=1e-7)


def _prepared(tiny_components, method, **overrides):
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    specs = [toy_concept_spec("stripes"), toy_concept_spec("dots")]
    concepts = [_random_concept(s.name, components, i, with_prior=True) for i, s in enumerate(specs)]
    config = ImmunizeConfig(method=method, caption_bank="toy", upper_params=UPPER,
                            **{"prior_weight": 0.0, "retain_weight": 0.0, "bank_prior_weight": 0.0, "hvp": "exact",
                               **overrides})
    immunizer = immunizers.get(method)(config)
    immunizer.prepare(components, specs, concepts)

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}

    return components, immunizer, batches


@pytest.mark.parametrize("start", [False, True])
def test_first_order_trajectory_gradient_is_the_mean_of_the_upper_gradients_at_its_points(tiny_components, start):
    """imma-joint, 4 plain SGD steps, upper loss after steps 2 and 4 (and at the start, `trajectory_start`): the
    gradient is minus the mean over the points and the two concepts of the upper loss's gradient at that point
    (first order: d phi_t / d theta = I)."""
    attacker = {"kind": "full", "steps": 4, "lr": 0.5, "clip": 0.0, "trajectory_points": 2, "trajectory_start": start}
    components, immunizer, batches = _prepared(tiny_components, "imma-joint", order="first-order",
                                               attackers=(attacker,))
    value, grads, _ = immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1))

    unet, scheduler = components.unet, components.scheduler
    upper = set(immunizer.upper_names)

    def loss_and_grad(phi, batch, g, wrt):
        leaves = {n: p.detach().requires_grad_() for n, p in phi.items()}
        call = lambda x, t, h: functional_call(unet, leaves, (x, t), {"encoder_hidden_states": h}).sample  # noqa: E731
        loss = diffusion_loss(call, scheduler, batch.latents, batch.hidden, generator=g)
        return loss, dict(zip(wrt, torch.autograd.grad(loss, [leaves[n] for n in wrt]), strict=True))

    g, pairs = torch.Generator().manual_seed(SEED + 1), list(batches().values())
    phi = {n: p.detach() for n, p in unet.named_parameters()}
    points = [phi] if start else []
    for step in range(4):  # the attacker: SGD on the mean of both concepts' lower losses
        step_grads = [loss_and_grad(phi, lower, g, list(phi))[1] for lower, _ in pairs]
        phi = {n: p - 0.5 * (step_grads[0][n] + step_grads[1][n]) / 2 for n, p in phi.items()}
        if step in (1, 3):
            points.append(phi)
    expected, upper_losses = {n: torch.zeros_like(phi[n]) for n in upper}, []
    for point in points:
        for _, up in pairs:
            loss, grad = loss_and_grad(point, up, g, sorted(upper))
            upper_losses.append(loss.item())
            for n in upper:
                expected[n] -= grad[n] / (2 * len(points))
    assert value == pytest.approx(-sum(upper_losses) / (2 * len(points)), rel=1e-10)
    assert set(grads) == upper
    for n in upper:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("method", "overrides"), [
    ("mima", {"attackers": ({"steps": 3, "trajectory_points": 3, "lr": 0.5},), "retain_weight": 0.5}),
    ("mima", {"attackers": ({"steps": 3, "trajectory_points": 2, "optimizer": "adam", "lr": 0.01},)}),
    ("imma-joint", {"attackers": ({"steps": 2, "optimizer": "adam", "lr": 0.01, "trajectory_points": 2},),
                    "retain_weight": 0.5}),
    ("mima", {"attackers": ({"steps": 2, "lr": 0.5, "trajectory_start": True},), "retain_weight": 0.5}),
])
def test_trajectories_and_adam_agree_with_the_reference_objective(tiny_components, method, overrides):
    """At each point of a first-order trajectory, MIMA merges the copies there; `gradients` (concept by concept)
    equals differentiating `objective`, Adam inner steps and the retain term included."""
    components, immunizer, batches = _prepared(tiny_components, method, order="first-order", **overrides)
    assert len(immunizer.attacker.spec.trajectory_steps) > 1
    assert_gradients_equal_the_objectives(immunizer, batches, SEED + 1)


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_a_concept_above_the_cap_pushes_no_further(tiny_components, method):
    _, plain, batches = _prepared(tiny_components, method, order="second-order", inner_lr=0.5)
    _, logs = plain.objective(batches(), torch.Generator().manual_seed(SEED + 1))
    low, high = sorted([logs["upper/stripes"], logs["upper/dots"]])
    for cap, counted in (((low + high) / 2, [low, (low + high) / 2]), (low / 2, [low / 2, low / 2])):
        _, capped, _ = _prepared(tiny_components, method, order="second-order", inner_lr=0.5, upper_cap=cap)
        value, grads = assert_gradients_equal_the_objectives(capped, batches, SEED + 1)
        assert value == pytest.approx(-sum(counted) / 2, rel=1e-10)
        if cap < low:  # both concepts above the cap: nothing to climb
            assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        else:
            assert any(torch.count_nonzero(g) > 0 for g in grads.values())


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_the_alternating_schedule_carries_the_same_attacks_in_both_paths(tiny_components, method):
    """Second order, two outer steps on fixed batches: the second starts where the first's attacks ended, in the
    concept-by-concept gradient as in the reference objective, and that start changes the gradient."""
    settings = dict(order="second-order", inner_lr=0.5, persistent_attacker=True)
    _, by_concept, batches = _prepared(tiny_components, method, **settings)
    _, reference, _ = _prepared(tiny_components, method, **settings, concept_by_concept=False)
    steps = [[immunizer.gradients(batches(), torch.Generator().manual_seed(SEED + 1)) for _ in range(2)]
             for immunizer in (by_concept, reference)]
    for (value, grads, _), (expected_value, expected, _) in zip(*steps, strict=True):
        assert value == pytest.approx(expected_value, rel=1e-10)
        for name in expected:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-8, atol=1e-12)
    assert steps[0][1][0] != pytest.approx(steps[0][0][0], rel=1e-6)  # the carried start moved the second step


def test_the_alternating_schedule_resumes_exactly(tiny_model_dir, tmp_path, interrupted_at):
    from mima.immunize import trainer as trainer_module

    settings = dict(steps=4, save_every=2, persistent_attacker=True, order="first-order")
    full = _run(tiny_model_dir, tmp_path / "full", **settings)
    fresh = _run(tiny_model_dir, tmp_path / "fresh", **{**settings, "persistent_attacker": False})
    with interrupted_at(trainer_module._Loop, 2), pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, tmp_path / "cut", **settings)
    assert (tmp_path / "cut" / "checkpoint" / "state.safetensors").is_file()
    resumed = _run(tiny_model_dir, tmp_path / "cut", resume=True, **settings)
    expected, actual, other = _unet_weights(full), _unet_weights(resumed), _unet_weights(fresh)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert not all(torch.equal(expected[name], other[name]) for name in expected)  # the schedule mattered


def test_each_step_records_the_attacker_it_sampled(tiny_model_dir, tmp_path, capsys):
    """End to end: `--attackers` names kinds (overriding the YAML's mappings); each outer step's sampled index
    lands in immunization.json."""
    settings = tmp_path / "settings.yaml"
    settings.write_text("attackers: [{kind: full, steps: 2, order: first-order, trajectory_points: 2}]\n")
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out", str(out),
                 "--config", str(settings), "--attackers", "full", "lora", "--steps", "3", "--n-images", "4",
                 "--n-class-images", "2", "--batch-size", "2", "--caption-bank", "toy"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "immunization.json").read_text())
    assert [entry["kind"] for entry in record["config"]["attackers"]] == ["full", "lora"]
    assert [row["attacker"] for row in record["log"]] == [sample_attacker([1.0, 1.0], 0, step) for step in range(3)]
    assert len({row["attacker"] for row in record["log"]}) == 2  # this seed samples both in three steps


def test_each_step_records_the_retain_terms_own_attacker(tiny_model_dir, tmp_path, capsys):
    """End to end: `--retain-attackers` names kinds, recorded with their kinds' defaults; each outer step samples
    one from a stream of its own (the ascent's draws unchanged) and immunization.json logs it."""
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out", str(out),
                 "--attackers", "full", "lora", "--retain-attackers", "textual-inversion", "lora", "--steps", "3",
                 "--n-images", "4", "--n-class-images", "2", "--batch-size", "2", "--caption-bank", "toy"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "immunization.json").read_text())
    retain = record["config"]["retain_attackers"]
    assert [(entry["kind"], entry["lr"], entry["prompt"]) for entry in retain] == [
        ("textual-inversion", 3.0, "fresh-token"), ("lora", 3.0, "concept")]
    assert [row["attacker"] for row in record["log"]] == [sample_attacker([1.0, 1.0], 0, step) for step in range(3)]
    drawn = [row["retain_attacker"] for row in record["log"]]
    assert drawn == [sample_attacker([1.0, 1.0], 0, step, _RETAIN_SAMPLING_STREAM) for step in range(3)]
    assert drawn != [row["attacker"] for row in record["log"]]  # apart from the ascent's


@pytest.mark.parametrize(("overrides", "words"), [
    ({"retain_weight": 0.0}, "give retain_weight > 0"),
    ({"retain_attackers": ({"kind": "lora", "upper_skip": ["*attn2*"]},)}, "upper_skip is for the ascent"),
    ({"retain_attackers": ({"kind": "lora", "steps": 0},)}, "must be positive"),
])
def test_bad_retain_attackers_are_refused_when_the_config_is_built(overrides, words):
    with pytest.raises(ConfigError, match=words):
        ImmunizeConfig(**{"retain_attackers": ("textual-inversion",), **overrides})


def test_the_alternating_schedule_is_refused_under_several_processes(tiny_model_dir, tmp_path, monkeypatch):
    """Each process would carry only its own concepts' attacks, and the main process alone saves checkpoints."""
    from mima.immunize import trainer as trainer_module
    from mima.utils.distributed import Shard

    monkeypatch.setattr(trainer_module, "join_process_group", lambda device: Shard(rank=0, size=2))
    with pytest.raises(ConfigError, match="persistent_attacker runs in one process"):
        _run(tiny_model_dir, tmp_path / "run", persistent_attacker=True)
    assert not (tmp_path / "run").exists()


def test_an_attackers_upper_skip_holds_those_weights_and_their_optimizer_state(tiny_model_dir, tmp_path,
                                                                               interrupted_at):
    """The keys skipped by attacker 0 take an AdamW step only at the outer steps that drew attacker 1, every other
    S^u weight at each step; with attacker 0 alone they keep their values bit for bit (personalize: no erasure)."""
    from mima.immunize import trainer as trainer_module
    from mima.utils.io import load_torch_state

    skip_keys = {"kind": "lora", "upper_skip": ["*attn2.to_k.*"]}
    settings = dict(steps=4, save_every=3, setting="personalize", attackers=(skip_keys, {"kind": "lora"}))
    with interrupted_at(trainer_module._Loop, 3), pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, tmp_path / "two", **settings)
    checkpoint = tmp_path / "two" / "checkpoint"
    drawn = [row["attacker"] for row in json.loads((checkpoint / "progress.json").read_text())["log"]]
    assert sorted(set(drawn)) == [0, 1]  # this seed draws both in three steps
    upper = [name for name, _ in UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").named_parameters()
             if ".transformer_blocks." in name]
    state = load_torch_state(checkpoint / "optimizer.pt")["state"]
    assert {name: int(state[i]["step"]) for i, name in enumerate(upper)} == {
        name: drawn.count(1) if ".attn2.to_k." in name else 3 for name in upper}

    alone = _run(tiny_model_dir, tmp_path / "one", **{**settings, "attackers": (skip_keys,)})
    before, after = _unet_weights(tiny_model_dir), _unet_weights(alone)
    moved = {name for name in upper if not torch.equal(before[name], after[name])}
    assert moved == {name for name in upper if ".attn2.to_k." not in name}


@pytest.mark.parametrize("skip, message", [(["*to_kk.*"], "match no UNet parameter"),
                                           (["*transformer_blocks*"], "holds every S^u weight")])
def test_a_bad_upper_skip_is_a_one_line_error_before_class_images(tiny_model_dir, tmp_path, capsys, skip, message):
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"attackers": [{"kind": "lora"}, {"kind": "lora", "upper_skip": skip}]}))
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
                 "--config", str(settings), "--n-images", "4"])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("mima:")]
    assert code == 2 and "Traceback" not in err
    assert len(error_lines) == 1 and message in error_lines[0], err
    assert not list(out.glob("data/*class*"))
