"""Contract tests over the attack registry: every attack trains, changes only what it declares, exports an
artifact that plain diffusers loads and that reproduces the attack's own samples, and resumes exactly."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from mima.attacks import AttackConfig, AttackRun, attacks
from mima.attacks import trainer as trainer_module
from mima.attacks.custom_diffusion import load_custom_diffusion
from mima.cli import main
from mima.data.concepts import toy_concept_spec
from mima.data.image_folder import read_image_folder
from mima.errors import ConfigError
from mima.models.components import Components
from mima.sampling import sample_images

# One row per registered attack: how plain diffusers loads its export, and the reproduction tolerance
# (mean absolute uint8 difference) of samples drawn from the reloaded pipeline.
CONTRACT = {
    "dreambooth": {"load": lambda pipe, d: StableDiffusionPipeline.from_pretrained(d, safety_checker=None)},
    "lora": {"load": lambda pipe, d: pipe.load_lora_weights(d, weight_name="pytorch_lora_weights.safetensors")},
    "textual-inversion": {
        "load": lambda pipe, d: pipe.load_textual_inversion(d, weight_name="learned_embeds.safetensors"),
    },
    "custom-diffusion": {"load": load_custom_diffusion},
}
FAST = dict(steps=2, n_images=4, n_class_images=2, eval_images=2, sampling_steps=3, batch_size=2, lr=1e-2)


def test_every_registered_attack_has_a_contract_row():
    assert set(attacks.names()) == set(CONTRACT)


def _state(components):
    return {f"{m}.{n}": p.detach().clone() for m, module in components.modules().items()
            for n, p in module.named_parameters()}


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_attack_changes_only_its_declared_parameters(tiny_model_dir, method):
    components = Components.from_pretrained(tiny_model_dir)
    before = _state(components)
    attack = attacks.get(method)(AttackConfig(method=method, **FAST))
    attack.prepare(components, toy_concept_spec("donut"))
    declared = {id(p) for p in attack.trainable_parameters()}
    initial = [p.detach().clone() for p in attack.trainable_parameters()]
    assert declared
    optimizer = torch.optim.AdamW(attack.trainable_parameters(), lr=1e-2)
    size = components.unet.config.sample_size
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        loss = attack.loss(torch.randn(2, 4, size, size, generator=g), ["a photo of a donut"] * 2, g)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    named = {f"{m}.{n}": p for m, module in components.modules().items() for n, p in module.named_parameters()}
    for name, param in named.items():
        if name in before and id(param) not in declared:
            kept = param.detach()[: before[name].shape[0]]  # a new token adds an embedding row; the rest must stay
            assert torch.equal(before[name], kept), f"{method} changed undeclared {name}"
    assert all(not torch.equal(a, p.detach()) for a, p in zip(initial, attack.trainable_parameters(), strict=True))


@pytest.mark.parametrize("method", sorted(CONTRACT))
def test_attack_export_reloads_in_plain_diffusers_and_reproduces_samples(tiny_model_dir, tmp_path, method):
    out = tmp_path / method
    export = AttackRun(str(tiny_model_dir), toy_concept_spec("donut"), AttackConfig(method=method, **FAST), out).run()
    record = json.loads((out / "attack.json").read_text())
    assert record["config"]["method"] == method and len(record["log"]) == 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0", "step_1", "step_2"]
    attacked, prompts = read_image_folder(out / "samples" / "step_2")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    loaded = CONTRACT[method]["load"](pipe, export)
    pipe = loaded if isinstance(loaded, StableDiffusionPipeline) else pipe
    components = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    expected = {"textual-inversion": "<donut>", "custom-diffusion": "<new-donut> donut"}.get(method, "donut")
    assert all(expected in p for p in prompts) and record["sample_prompts"] == sorted(set(prompts))
    reproduced = sample_images(components, prompts, seed=0, steps=3, guidance_scale=4.0)  # the prompts recorded
    difference = np.abs(reproduced.astype(float) - np.stack([np.asarray(a) for a in attacked]).astype(float))
    assert difference.mean() < 1.0, f"{method}: reloaded samples differ by {difference.mean():.2f}"


def test_attack_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, interrupted_at):
    config = AttackConfig(method="lora", **{**FAST, "steps": 4, "save_every": 2})
    AttackRun(str(tiny_model_dir), toy_concept_spec("donut"), config, tmp_path / "full").run()
    with interrupted_at(trainer_module._Loop, 2), pytest.raises(KeyboardInterrupt):
        AttackRun(str(tiny_model_dir), toy_concept_spec("donut"), config, tmp_path / "cut").run()
    AttackRun(str(tiny_model_dir), toy_concept_spec("donut"), config, tmp_path / "cut").run(resume=True)
    full = json.loads((tmp_path / "full" / "attack.json").read_text())["log"]
    cut = json.loads((tmp_path / "cut" / "attack.json").read_text())["log"]
    assert [r["loss"] for r in full] == [r["loss"] for r in cut]
    from mima.utils.io import load_tensors

    a = load_tensors(tmp_path / "full" / "export" / "pytorch_lora_weights.safetensors")
    b = load_tensors(tmp_path / "cut" / "export" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_attack_inputs_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    def run(*extra):
        code = main(["attack", "--model", str(tiny_model_dir), "--concept", "toy:donut", "--out",
                     str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.startswith("mima:")], err

    code, lines, err = run("--method", "lroa")
    assert code == 2 and len(lines) == 1 and "did you mean 'lora'" in lines[0] and "Traceback" not in err
    code, lines, _ = run("--method", "lora", "--steps", "0")
    assert code == 2 and "steps must be positive" in lines[0]
    code, lines, _ = run("--method", "textual-inversion", "--token", "donut", "--steps", "1")
    assert code == 2 and "already exists" in lines[0]
    code = main(["attack", "--model", str(tiny_model_dir), "--concept", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o2"), "--method", "lora"])
    assert code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        AttackConfig(eval_images=0)


def test_attack_sweep_runs_the_grid_and_skips_finished_runs(tiny_model_dir, tmp_path, capsys):
    args = ["attack-sweep", "--model", str(tiny_model_dir), "--concept", "toy:donut", "--methods", "lora",
            "textual-inversion", "--budgets", "1", "2", "--lrs", "0.01", "--out", str(tmp_path),
            "--n-images", "4", "--eval-images", "2", "--sampling-steps", "2", "--batch-size", "2",
            "--encoder", "toy-judge"]
    assert main(args) == 0, capsys.readouterr().err
    records = sorted(tmp_path.glob("*/lr0.01/steps*/prompt-default/attack.json"))
    assert [r.parent.parent.relative_to(tmp_path).as_posix() for r in records] == [
        "lora/lr0.01/steps1", "lora/lr0.01/steps2", "textual-inversion/lr0.01/steps1",
        "textual-inversion/lr0.01/steps2"]
    assert [json.loads(r.read_text())["config"]["steps"] for r in records] == [1, 2, 1, 2]
    written = [r.stat().st_mtime_ns for r in records]
    assert main(args) == 0
    assert [r.stat().st_mtime_ns for r in records] == written


def test_unset_settings_take_the_methods_defaults_when_the_run_is_built(tmp_path):
    concept = toy_concept_spec("star")
    for method in attacks.names():
        defaults = attacks.get(method)
        config = AttackRun("toy", concept, AttackConfig(method=method), tmp_path).config
        assert (config.steps, config.lr) == (defaults.default_steps, defaults.default_lr)
        assert config.save_every == defaults.default_steps // 4
    given = AttackRun("toy", concept, AttackConfig(steps=10, lr=0.5, save_every=3), tmp_path).config
    assert (given.steps, given.lr, given.save_every) == (10, 0.5, 3)
    assert AttackRun("toy", concept, AttackConfig(steps=3), tmp_path).config.save_every == 1
