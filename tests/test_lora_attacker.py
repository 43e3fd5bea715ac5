"""The `lora` simulated attacker: fresh factors on the attention projections in S^l, what its steps train, and
`mima immunize` end to end with it. Its meta-gradients are tested with the others' in tests/test_meta_gradient.py."""

import copy
import json

import pytest
import torch
import yaml

from mima.cli import main
from mima.data.concepts import toy_concept_spec
from mima.errors import ConfigError
from mima.immunize import ImmunizeConfig, immunizers
from mima.immunize.attacker_spec import AttackerSpec
from mima.immunize.attackers import simulated_attackers
from mima.losses import diffusion_loss
from mima.models.encoding import Batch

PROJECTIONS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


@pytest.fixture
def unet_params(tiny_components):
    components = copy.deepcopy(tiny_components)
    components.unet.double()
    return components, {n: p.detach() for n, p in components.unet.named_parameters()}


def _attacker(components, lower_names, **spec):
    attacker = simulated_attackers.get("lora")(AttackerSpec(kind="lora", **spec))
    attacker.prepare(components, [toy_concept_spec("stripes")], lower_names)
    return attacker


def test_fresh_factors_start_at_the_weights_and_draw_down_from_the_generator(unet_params):
    components, base = unet_params
    attacker = _attacker(components, list(base), rank=3)
    phi = attacker.start(base, [0], torch.Generator().manual_seed(5))
    adapted = [n for n in base if n.endswith(PROJECTIONS)]
    assert attacker.adapted == adapted and len(adapted) % 4 == 0 and any("attn1" in n for n in adapted)
    assert not set(phi) & set(base) and set(phi) == {f"lora:{n}:{f}" for n in adapted for f in ("down", "up")}
    again = torch.Generator().manual_seed(5)
    for name in adapted:
        down, up = phi[f"lora:{name}:down"], phi[f"lora:{name}:up"]
        assert down.dtype == up.dtype == torch.float64 and down.requires_grad and up.requires_grad
        assert down.shape == (3, base[name].shape[1]) and up.shape == (base[name].shape[0], 3)
        torch.testing.assert_close(down, torch.randn(down.shape, generator=again).double() / 3)  # std 1/rank
        assert not up.any()
    weights = attacker.weights({**base, **phi})
    assert set(weights) == set(adapted) and all(torch.equal(weights[n], base[n]) for n in adapted)


def test_only_projections_in_the_lower_level_are_adapted(unet_params):
    components, base = unet_params
    attn2 = [n for n in base if "attn2." in n]
    assert {n.split("attn2.")[1] for n in _attacker(components, attn2).adapted} == {p[1:] for p in PROJECTIONS}
    with pytest.raises(ConfigError, match="no attention projection"):
        _attacker(components, [n for n in base if "conv_in" in n])


@pytest.mark.parametrize("steps", [1, 2])
def test_the_inner_steps_train_the_factors_as_the_math_says(unet_params, steps):
    """Step 1 moves only `up`, by -lr G down^T (G: the loss gradient on W; up = 0 gives `down` no gradient), so
    the first update of W is -lr G down^T down; a second step moves `down` too."""
    components, _ = unet_params
    specs = [toy_concept_spec("stripes")]
    config = ImmunizeConfig(method="imma-joint", caption_bank="toy", prior_weight=0.0, retain_weight=0.0,
                            attackers=({"kind": "lora", "lr": 0.3, "steps": steps, "clip": 0.0},))
    immunizer = immunizers.get("imma-joint")(config)
    immunizer.prepare(components, specs, [])
    g = torch.Generator().manual_seed(0)
    size = components.unet.config.sample_size
    batch = Batch(torch.randn(2, 4, size, size, generator=g, dtype=torch.float64),
                  components.encode_prompts(["a painting in stripes style"] * 2).detach().double())
    base = {n: p.detach().requires_grad_() for n, p in immunizer.base_parameters().items()}
    phi = immunizer.adapt_trajectory(base, [batch], [0], torch.Generator().manual_seed(1))[0][-1]
    phi0 = immunizer.attacker.start(base, [0], torch.Generator().manual_seed(1))  # the same draws as its start
    name = immunizer.attacker.adapted[0]
    down0, down = phi0[f"lora:{name}:down"], phi[f"lora:{name}:down"]
    if steps == 2:
        assert not torch.equal(down, down0)
        return
    assert torch.equal(down, down0)
    replay = torch.Generator().manual_seed(1)
    immunizer.attacker.start(base, [0], replay)  # skip the factors' draws: the loss sees the generator as adapt's
    loss = diffusion_loss(lambda x, t, h: torch.func.functional_call(
        immunizer.unet, base, (x, t), {"encoder_hidden_states": h}).sample, immunizer.scheduler, batch.latents,
        batch.hidden, generator=replay)
    grad = torch.autograd.grad(loss, base[name])[0]
    delta = immunizer.attacker.weights({**base, **phi})[name] - base[name]
    torch.testing.assert_close(delta, -0.3 * grad @ down0.T @ down0, rtol=1e-9, atol=1e-14)


def test_cli_immunize_with_a_lora_attacker_records_it(tiny_model_dir, tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"attackers": [{"kind": "lora", "steps": 2, "rank": 2}]}))
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out", str(out),
                 "--config", str(settings), "--steps", "2", "--n-images", "4", "--n-class-images", "2",
                 "--batch-size", "2", "--caption-bank", "toy"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "immunization.json").read_text())
    default_lr = simulated_attackers.get("lora").default_lr
    assert record["config"]["attackers"] == [{"kind": "lora", "steps": 2, "rank": 2, "lr": default_lr,
                                              "prompt": "concept"}]
    assert len(record["log"]) == 2 and {"lower/stripes", "lower/star", "retain"} <= set(record["log"][0])
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_ls_lists_lora_with_its_default_learning_rate(capsys):
    assert main(["ls", "simulated-attackers"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lora "))
    assert f"(default lr {simulated_attackers.get('lora').default_lr:g})" in line
