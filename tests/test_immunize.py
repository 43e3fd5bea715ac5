"""`mima immunize` end to end on the tiny model: outputs, what changes, ascent, resume, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from mima.cli import main
from mima.data.captions import load_caption_bank
from mima.data.concepts import load_concepts, toy_concept_spec
from mima.errors import ConfigError, DataError, ModelError, TrainingError
from mima.immunize import ImmunizationRun, ImmunizeConfig
from mima.immunize import trainer as trainer_module
from mima.utils.io import load_tensors

FAST = dict(steps=2, save_every=1, n_images=4, n_class_images=2, batch_size=2, caption_bank="toy")
WITHOUT_KEYS_VALUES = ("--upper-params", "*transformer_blocks*", "!*attn2.to_k.*", "!*attn2.to_v.*")


def _unet_weights(model_dir):
    return load_tensors(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def _run(model_dir, out, concepts=("toy:stripes", "toy:star"), resume=False, **overrides):
    config = ImmunizeConfig(**{**FAST, **overrides})
    return ImmunizationRun(str(model_dir), load_concepts(list(concepts)), config, out).run(resume=resume)


@pytest.mark.parametrize("setting", ["relearn", "personalize"])
def test_cli_immunize_changes_only_upper_parameters_and_reloads(tiny_model_dir, tmp_path, capsys, setting):
    out = tmp_path / "run"
    code = main([
        "immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out", str(out),
        "--steps", "2", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2", "--setting", setting,
        *(["--fused-batches", "0"] if setting == "relearn" else ["--fused-batches", "1000", "--retain-order",
                                                                 "first-order", *WITHOUT_KEYS_VALUES]),
    ])
    assert code == 0, capsys.readouterr().err
    before, after = _unet_weights(tiny_model_dir), _unet_weights(out / "model")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".transformer_blocks." in name for name in changed)  # S^u
    assert any(".ff." in name for name in changed)  # the ascent moved S^u beyond the erased K/V
    keys_values = {name for name in changed if ".attn2.to_k." in name or ".attn2.to_v." in name}
    assert bool(keys_values) == (setting == "relearn")  # personalize leaves them out of S^u: nothing moves them
    record = json.loads((out / "immunization.json").read_text())
    assert record["config"]["setting"] == setting and len(record["log"]) == 2
    assert (record["batches_per_call"] > 1) == (setting == "personalize")  # --fused-batches 0 / 1000
    assert record["config"]["retain_order"] == ("attacker" if setting == "relearn" else "first-order")
    assert {"upper/stripes", "upper/star", "lower/stripes", "lower/star", "prior"} <= set(record["log"][0])
    assert record["versions"]["torch"] == torch.__version__ and record["elapsed_s"] > 0
    assert not (out / "checkpoint").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out / "model", safety_checker=None)
    images = pipe("a painting in stripes style", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_cli_immunize_with_retain_concepts_draws_and_records_them(tiny_model_dir, tmp_path, capsys):
    """`--retain-concepts`: the concepts' images are drawn into data/ (apart from the targets'), the retain term is
    logged, the record names them, and a run with other retained concepts differs from it."""
    out = tmp_path / "run"
    args = ["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out), "--steps",
            "1", "--n-images", "4", "--n-class-images", "2", "--batch-size", "2", "--caption-bank", "toy",
            "--retain-prompt", "attacker", "--attackers", "lora"]
    assert main([*args, "--retain-concepts", "toy:rings", "toy:zigzag"]) == 0, capsys.readouterr().err
    record = json.loads((out / "immunization.json").read_text())
    assert [c["name"] for c in record["retained"]] == ["rings", "zigzag"]
    assert record["config"]["retain_concepts"] == ["toy:rings", "toy:zigzag"]
    assert len(list((out / "data" / "rings").glob("*.png"))) == 4 and record["log"][0]["retain"] > 0
    other = ImmunizationRun(str(tiny_model_dir), load_concepts(["toy:stripes"]),
                            ImmunizeConfig(retain_concepts=("toy:rings",)), out)
    assert "retain_concepts" in other.differences(record)  # neither resumed nor reused by a benchmark


def test_ascent_raises_the_upper_loss_on_a_fixed_batch(tiny_components, tmp_path):
    import copy

    from mima.immunize import immunizers
    from mima.models.encoding import EncodedConcept, EncodedImages

    components = copy.deepcopy(tiny_components)
    size = components.unet.config.sample_size
    specs = [toy_concept_spec("stripes"), toy_concept_spec("dots")]
    concepts = [
        EncodedConcept(s.name, EncodedImages(
            torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(i)), torch.zeros(4, 4, size, size),
            components.encode_prompts([s.prompt] * 4).detach()), None)
        for i, s in enumerate(specs)
    ]
    config = ImmunizeConfig(prior_weight=0.0, bank_prior_weight=0.0, caption_bank="toy", outer_lr=1e-2)
    immunizer = immunizers.get("mima")(config)
    immunizer.prepare(components, specs, concepts)

    def upper_loss():
        g = torch.Generator().manual_seed(0)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
        return -immunizer.objective(batches, torch.Generator().manual_seed(1))[0].item()

    start = upper_loss()
    params = immunizer.trainable_parameters()
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    for _ in range(4):
        g = torch.Generator().manual_seed(0)
        batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
        objective = immunizer.objective(batches, torch.Generator().manual_seed(1))[0]
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
    assert upper_loss() > start * 1.02


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, interrupted_at):
    settings = dict(steps=4, save_every=1,  # a checkpoint after the first step too: the focus's state is then new
                    upper_lr_scales=("*attn2.to_k.*=0.25",),  # two AdamW groups to restore
                    upper_saliency=0.5,  # the masks drawn again on resume, from the model as the run found it
                    bank_prior_weight=0.5, n_bank_images=4,  # its images drawn once, its batches from the step's draws
                    bank_prior_target="original",  # the teacher: the weights before step 1, not the checkpoint's
                    upper_focus=0.05)  # the weights from the upper losses of every step so far, checkpointed
    full = _run(tiny_model_dir, tmp_path / "full", **settings)
    with interrupted_at(trainer_module._Loop, 2), pytest.raises(KeyboardInterrupt):
        _run(tiny_model_dir, tmp_path / "cut", **settings)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())["step"] == 2
    with pytest.raises(ConfigError, match="--resume"):
        _run(tiny_model_dir, tmp_path / "cut", **settings)
    resumed = _run(tiny_model_dir, tmp_path / "cut", resume=True, **settings)
    expected, actual = _unet_weights(full), _unet_weights(resumed)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_upper_lr_scales_set_each_parameters_rate(tiny_model_dir, tmp_path, capsys):
    """AdamW's first step moves each weight by its rate times g / (|g| + eps): the largest change of each S^u weight
    is its rate, outer_lr times the scale of the last glob that matches it (personalize: no erasure moves them)."""
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
                 "--setting", "personalize", "--steps", "1", "--n-images", "4", "--n-class-images", "2",
                 "--batch-size", "2", "--outer-lr", "1e-3",
                 "--upper-lr-scales", "*attn2.*=3", "*attn2.to_k.*=0.25", "*attn1.to_q.*=2"])
    assert code == 0, capsys.readouterr().err
    before, after = _unet_weights(tiny_model_dir), _unet_weights(out / "model")
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before if ".transformer_blocks." in name
             and name.endswith(".weight") and ".norm" not in name}
    expected = {name: 1e-3 * (0.25 if ".attn2.to_k." in name else 3 if ".attn2." in name
                              else 2 if ".attn1.to_q." in name else 1) for name in moved}
    assert moved == pytest.approx(expected, rel=1e-3)
    config = json.loads((out / "immunization.json").read_text())["config"]
    assert config["upper_lr_scales"][1] == "*attn2.to_k.*=0.25"
    held_out = (config["retain_weight"], config["bank_prior_weight"], config["bank_prior_unconditional"])
    assert held_out == (6.0, 10.0, 1.0)  # the setting's defaults, recorded as the run took them
    assert [entry["kind"] for entry in config["retain_attackers"]] == ["textual-inversion"]


def test_upper_saliency_moves_only_each_tensors_share_of_its_most_salient_entries(tiny_model_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """personalize: no erasure moves a weight, so what changed is what the outer steps moved: within the masks the
    loop drew (which entries they hold, tests/test_saliency.py)."""
    drawn, draw = {}, trainer_module.saliency_masks

    def recorded(*args, **kwargs):
        drawn.update(draw(*args, **kwargs))
        return drawn

    monkeypatch.setattr(trainer_module, "saliency_masks", recorded)
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
                 "--setting", "personalize", "--steps", "2", "--n-images", "4", "--n-class-images", "2",
                 "--batch-size", "2", "--upper-saliency", "0.25", "--upper-saliency-against", "class"])
    assert code == 0, capsys.readouterr().err
    before, after = _unet_weights(tiny_model_dir), _unet_weights(out / "model")
    changed = {name: after[name] != before[name] for name in before if ".transformer_blocks." in name}
    assert drawn.keys() == changed.keys()
    assert all(not (changed[name] & ~drawn[name]).any() for name in changed)  # nothing outside its mask moved
    assert all(int(drawn[name].sum()) == max(1, round(0.25 * drawn[name].numel())) for name in drawn)
    moved = {name: int(mask.sum()) for name, mask in changed.items()}
    large = [name for name in moved if before[name].numel() >= 64]
    assert sum(moved[name] >= 0.2 * before[name].numel() for name in large) >= len(large) // 2  # a share, not none
    assert json.loads((out / "immunization.json").read_text())["config"]["upper_saliency"] == 0.25


def test_cli_immunize_with_upper_contrast_draws_class_images_for_it_alone(tiny_model_dir, tmp_path, capsys):
    """`--upper-contrast 1` with every class-image term off: the class images are drawn anyway (the contrast takes
    their prompt), the record says it, and each logged upper loss is only what the concept's prompt adds: smaller
    in magnitude than the plain ascent's loss of the same run."""
    runs = {}
    for contrast in ("0", "1"):
        out = tmp_path / f"run{contrast}"
        code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes,toy:star", "--out",
                     str(out), "--setting", "personalize", "--steps", "1", "--n-images", "4", "--n-class-images", "2",
                     "--batch-size", "2", "--prior-weight", "0", "--retain-weight", "0", "--bank-prior-weight", "0",
                     "--upper-contrast", contrast])
        assert code == 0, capsys.readouterr().err
        runs[contrast] = json.loads((out / "immunization.json").read_text())
        assert any((out / "data").glob("class-*/*.png")) == (contrast == "1")
    assert runs["1"]["config"]["upper_contrast"] == 1.0
    for name in ("upper/stripes", "upper/star"):
        assert abs(runs["1"]["log"][0][name]) < 0.5 * runs["0"]["log"][0][name]


@pytest.mark.parametrize("args, message", [
    (["--upper-saliency", "1"], "upper_saliency is a share in [0, 1) (0: all of S^u), got 1.0"),
    (["--upper-saliency", "-0.5"], "upper_saliency is a share in [0, 1) (0: all of S^u), got -0.5"),
    (["--upper-saliency-against", "class"], "upper_saliency_against 'class' needs upper_saliency > 0 and class"),
    (["--upper-contrast", "-1"], "upper_contrast must be >= 0 (0: off), got -1.0"),
    (["--upper-focus", "-1"], "upper_focus must be >= 0 (0: off), got -1.0"),
])
def test_a_bad_upper_loss_setting_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, args, message):
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out",
                 str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("mima:")]
    assert len(errors) == 1 and errors[0].startswith(f"mima: error: {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("entry, message", [("*attn2.to_k.*", "GLOB=SCALE"), ("*attn2.to_k.*=0", "GLOB=SCALE"),
                                            ("*to_kk.*=0.5", "matches no upper-level")])
def test_bad_upper_lr_scales_are_a_one_line_error_before_class_images(tiny_model_dir, tmp_path, capsys, entry,
                                                                       message):
    out = tmp_path / "run"
    code = main(["immunize", "--model", str(tiny_model_dir), "--concepts", "toy:stripes", "--out", str(out),
                 "--n-images", "4", "--upper-lr-scales", entry])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("mima:")]
    assert code == 2 and "Traceback" not in err
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not list(out.glob("data/*class*"))


def test_nan_objective_is_a_one_line_error_and_keeps_the_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    original_step = trainer_module._Loop.train_step

    def nan_after_first_checkpoint(loop):
        if loop.step == 1:
            monkeypatch.setattr(loop.immunizer, "gradients", lambda *a: (float("nan"), {}, {}))
        return original_step(loop)

    monkeypatch.setattr(trainer_module._Loop, "train_step", nan_after_first_checkpoint)
    with pytest.raises(TrainingError, match="non-finite objective nan at outer step 2"):
        _run(tiny_model_dir, tmp_path / "run", steps=3, save_every=1)
    checkpoint = tmp_path / "run" / "checkpoint"
    assert json.loads((checkpoint / "progress.json").read_text())["step"] == 1
    assert load_tensors(checkpoint / "trainable.safetensors")


def _folder_concept(tmp_path, name="mine"):
    from mima.data.image_folder import write_image_folder
    from mima.toy.world import sample_concept_images

    images, prompts = sample_concept_images("circle", 3, seed=0)
    folder = tmp_path / name
    write_image_folder(images, prompts, folder)
    return {"name": name, "prompt": "a photo of a circle", "images": str(folder)}


def test_bad_concept_inputs_fail_before_training(tiny_model_dir, tmp_path):
    def entry(folder):
        return [{"name": "x", "prompt": "p", "images": str(tmp_path / folder)}]

    with pytest.raises(DataError, match="missing"):
        _run(tiny_model_dir, tmp_path / "a", concepts=entry("missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        _run(tiny_model_dir, tmp_path / "b", concepts=entry("empty"))
    entry = _folder_concept(tmp_path)
    (tmp_path / "mine" / "broken.png").write_bytes(b"not a png")
    shutil.copy(tmp_path / "mine" / "metadata.csv", tmp_path / "metadata.bak")
    with (tmp_path / "mine" / "metadata.csv").open("a") as f:
        f.write("broken.png,a photo of a circle\n")
    with pytest.raises(DataError, match="broken.png"):
        _run(tiny_model_dir, tmp_path / "c", concepts=[entry])
    with pytest.raises(ConfigError, match="duplicate concept name"):
        load_concepts(["toy:stripes", "toy:stripes"])
    with pytest.raises(ConfigError, match="empty"):
        load_concepts([])
    with pytest.raises(ConfigError, match="did you mean 'stripes'"):
        load_concepts(["toy:stripe"])
    with pytest.raises(ConfigError, match="did you mean 'mima'"):
        _run(tiny_model_dir, tmp_path / "d", method="mimaa")


def test_model_without_cross_attention_is_rejected(tiny_components, tmp_path, capsys):
    import copy

    components = copy.deepcopy(tiny_components)
    components.unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=2, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        mid_block_type=None, cross_attention_dim=8,
    )
    model_dir = components.save_pretrained(tmp_path / "no-xattn")
    code = main(["immunize", "--model", str(model_dir), "--concepts", "toy:stripes", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("mima:")]
    assert code == 2 and "Traceback" not in err
    assert len(error_lines) == 1 and "no cross-attention" in error_lines[0]
    with pytest.raises(ModelError):
        _run(model_dir, tmp_path / "o2")


def test_authors_json_concept_list(tmp_path):
    entry = _folder_concept(tmp_path)
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{
        "instance_prompt": entry["prompt"], "class_prompt": "a photo of an object",
        "instance_data_dir": entry["images"], "class_data_dir": str(tmp_path / "class"),
    }]))
    (spec,) = load_concepts(path)
    assert spec.prompt == "a photo of a circle" and spec.class_prompt == "a photo of an object"
    assert spec.images == tmp_path / "mine" and spec.class_images == tmp_path / "class"


def test_a_toy_concept_named_in_a_mapping_takes_its_own_class_prompt_and_images(tmp_path):
    path = tmp_path / "concepts.yaml"
    path.write_text("concepts:\n- {name: 'toy:square', class_images: free}\n- {name: 'toy:dots', class_prompt: art}\n")
    square, dots = load_concepts(path)
    assert (square.toy, square.prompts, square.class_prompt) == ("square", toy_concept_spec("square").prompts,
                                                                 "a photo of an object")
    assert square.class_images == tmp_path / "free" and (dots.class_prompt, dots.class_images) == ("art", None)
    with pytest.raises(ConfigError, match=r"unknown toy concept key\(s\) \['images'\]; valid: name, class_prompt"):
        load_concepts([{"name": "toy:square", "images": "mine"}])
    with pytest.raises(ConfigError, match="did you mean 'square'"):
        load_concepts([{"name": "toy:squares", "class_images": "free"}])


def _prepared_on_stripes(tiny_components, method: str, config: ImmunizeConfig):
    """`method` bound to a copy of the tiny model, with stripes' encoded images and class images, and one batch."""
    import copy

    from mima.immunize import immunizers
    from mima.models.encoding import EncodedConcept, EncodedImages

    components = copy.deepcopy(tiny_components)
    size = components.unet.config.sample_size

    def images(seed: int, prompt: str) -> EncodedImages:
        latents = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(seed))
        return EncodedImages(latents, torch.zeros_like(latents), components.encode_prompts([prompt] * 4).detach())

    spec = toy_concept_spec("stripes")
    concept = EncodedConcept(spec.name, images(0, spec.prompt), images(1, "a painting"))
    immunizer = immunizers.get(method)(config)
    immunizer.prepare(components, [spec], [concept])
    g = torch.Generator().manual_seed(0)
    return immunizer, {spec.name: (concept.batch(2, g), concept.batch(2, g))}


def _assert_term_adds_its_weighted_log(immunizer, batches, term: str, weight: float) -> None:
    """Switching a term on adds weight * its logged value to the objective, and its gradient reaches S^u."""
    config = immunizer.config
    without = immunizer.objective(batches, torch.Generator().manual_seed(2))[0]
    immunizer.config = config.with_overrides(**{f"{term}_weight": weight})
    with_term, logs = immunizer.objective(batches, torch.Generator().manual_seed(2))
    torch.testing.assert_close(with_term - without, weight * torch.tensor(logs[term]), rtol=1e-5, atol=1e-6)
    with_term.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in immunizer.trainable_parameters().values())
    immunizer.config = config


def test_retain_term_is_the_class_loss_after_a_simulated_attack(tiny_components):
    from mima.models.encoding import Batch

    # the step by hand below is unclipped (test_meta_gradient checks the clipped one), with one `full` attacker and
    # the class images captioned with their class prompt
    config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, bank_prior_weight=0.0, inner_lr=0.5, inner_clip=0.0,
                            caption_bank="toy", attackers=(), retain_prompt="class")
    immunizer, batches = _prepared_on_stripes(tiny_components, "imma-joint", config)
    lower, upper = next(iter(batches.values()))

    base = immunizer.base_parameters()
    g = torch.Generator().manual_seed(1)
    names = immunizer.lower_names
    grads = torch.autograd.grad(immunizer.loss(base, Batch(*lower.prior), g), [base[n] for n in names])
    adapted = {**base, **{n: base[n] - 0.5 * grad for n, grad in zip(names, grads, strict=True)}}
    by_hand = immunizer.loss(adapted, Batch(*upper.prior), g)
    retain = immunizer.retain_loss(immunizer.base_parameters(), batches, torch.Generator().manual_seed(1))
    torch.testing.assert_close(retain, by_hand)
    _assert_term_adds_its_weighted_log(immunizer, batches, "retain", 3.0)


def test_the_distilled_retain_term_pulls_the_attacked_model_toward_the_originals_prediction(tiny_components):
    """`retain_target: original`: after the same simulated attack, the MSE between the attacked model's prediction
    and the original model's under the same noise and timesteps, where the plain term has the noise."""
    from mima.functional import unet_call_with
    from mima.losses import draw_noise
    from mima.models.encoding import Batch

    config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, bank_prior_weight=0.0, inner_lr=0.5, inner_clip=0.0,
                            caption_bank="toy", attackers=(), retain_prompt="class", retain_target="original")
    immunizer, batches = _prepared_on_stripes(tiny_components, "imma-joint", config)
    lower, upper = next(iter(batches.values()))
    base = immunizer.base_parameters()
    with pytest.raises(ValueError, match="original weights"):  # not the current weights teaching themselves
        immunizer.retain_loss(base, batches, torch.Generator().manual_seed(1))
    immunizer.original = {name: base[name].detach().clone() for name in immunizer.upper_names}

    g = torch.Generator().manual_seed(1)
    names = immunizer.lower_names
    grads = torch.autograd.grad(immunizer.loss(base, Batch(*lower.prior), g), [base[n] for n in names])
    adapted = {**base, **{n: base[n] - 0.5 * grad for n, grad in zip(names, grads, strict=True)}}
    latents, hidden = upper.prior
    noise, timesteps = draw_noise(immunizer.scheduler, latents, g)
    noisy = immunizer.scheduler.add_noise(latents, noise, timesteps)
    attacked, original = (unet_call_with(immunizer.unet, p)(noisy, timesteps, hidden) for p in (adapted, base))
    retain = immunizer.retain_loss(immunizer.base_parameters(), batches, torch.Generator().manual_seed(1))
    torch.testing.assert_close(retain, ((attacked - original) ** 2).mean())
    assert abs(retain.item() - ((attacked - noise) ** 2).mean().item()) > 1e-3  # not the plain term
    _assert_term_adds_its_weighted_log(immunizer, batches, "retain", 3.0)


def test_anchor_term_is_the_class_images_loss_under_the_target_prompt(tiny_components):
    from mima.models.encoding import Batch

    config = ImmunizeConfig(prior_weight=0.0, retain_weight=0.0, bank_prior_weight=0.0, caption_bank="toy")
    immunizer, batches = _prepared_on_stripes(tiny_components, "mima", config)
    _, upper = next(iter(batches.values()))
    class_latents, class_hidden = upper.prior
    assert not torch.equal(upper.hidden, class_hidden)

    base = immunizer.base_parameters()
    by_hand = immunizer.loss(base, Batch(class_latents, upper.hidden), torch.Generator().manual_seed(1))
    anchor = immunizer.anchor_loss(base, batches, torch.Generator().manual_seed(1))
    torch.testing.assert_close(anchor, by_hand)
    _assert_term_adds_its_weighted_log(immunizer, batches, "anchor", 2.0)
    with pytest.raises(ConfigError, match="anchor_weight"):
        ImmunizeConfig(anchor_weight=-1.0)


@pytest.mark.parametrize(("mode", "expected"), [("per-class", [0, 2]), ("per-concept", [0, 1, 2])])
def test_the_prior_and_retain_terms_take_one_class_batch_per_class(tiny_components, mode, expected):
    """Concepts of one class prompt and class-image folder share its class batch (the first concept's): two styles
    and an object give two class batches, or with `per-concept` three; the prior term is their mean loss."""
    from mima.immunize import immunizers
    from mima.immunize.class_batches import class_batches, retain_batches
    from mima.models.encoding import Batch, EncodedConcept, EncodedImages

    specs = [toy_concept_spec(name) for name in ("stripes", "dots", "circle")]
    assert [s.class_prompt for s in specs] == ["a painting", "a painting", "a photo of an object"]
    size = tiny_components.unet.config.sample_size

    def images(seed: int, prompt: str) -> EncodedImages:
        latents = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(seed))
        return EncodedImages(latents, torch.zeros_like(latents), tiny_components.encode_prompts([prompt] * 4).detach())

    concepts = [EncodedConcept(s.name, images(i, s.prompt), images(10 + i, s.class_prompt))
                for i, s in enumerate(specs)]
    immunizer = immunizers.get("mima")(ImmunizeConfig(caption_bank="toy", bank_prior_weight=0.0, class_batches=mode))
    immunizer.prepare(tiny_components, specs, concepts)
    g = torch.Generator().manual_seed(0)
    batches = {c.name: (c.batch(2, g), c.batch(2, g)) for c in concepts}
    chosen = class_batches(batches, immunizer.class_of)
    assert list(chosen) == expected
    for n, (lower, upper) in chosen.items():
        own_lower, own_upper = batches[specs[n].name]
        assert torch.equal(lower.latents, own_lower.prior[0]) and torch.equal(upper.latents, own_upper.prior[0])
        assert torch.equal(upper.hidden, own_upper.prior[1])
    retained = retain_batches(batches, immunizer.class_of, immunizer.attacker, "class")
    assert len(retained) == len(chosen)
    for (lower, upper, concept), (class_lower, class_upper) in zip(retained, chosen.values(), strict=True):
        assert torch.equal(lower.latents, class_lower.latents) and torch.equal(upper.hidden, class_upper.hidden)
        assert concept is None  # conditioned as the batch is: its class prompt
    base, g = immunizer.base_parameters(), torch.Generator().manual_seed(1)
    by_hand = torch.stack([immunizer.loss(base, Batch(*batches[specs[n].name][1].prior), g) for n in expected]).mean()
    torch.testing.assert_close(immunizer.prior_loss(base, batches, torch.Generator().manual_seed(1)), by_hand)


def test_erase_erases_the_targets_once_in_either_setting(tiny_model_dir, tmp_path):
    """`--method erase` is the erased model: in relearn (which erases first) the same as `none`, and the same as
    erasing without the setting's step (personalize); erasing twice would move K/V further. Neither iterates, so
    neither draws the bank prior's images (on by default)."""
    closed_form = dict(prior_weight=0.0, retain_weight=0.0)
    models = {(method, setting): _unet_weights(_run(tiny_model_dir, tmp_path / f"{method}-{setting}",
                                                    method=method, setting=setting, **closed_form))
              for method, setting in (("none", "relearn"), ("erase", "relearn"), ("erase", "personalize"))}
    erased = models["none", "relearn"]
    assert any(not torch.equal(erased[n], w) for n, w in _unet_weights(tiny_model_dir).items())  # it did erase
    for key in (("erase", "relearn"), ("erase", "personalize")):
        assert all(torch.equal(erased[name], weights) for name, weights in models[key].items()), key
    assert list(tmp_path.glob("*/data")) and not list(tmp_path.glob("*/data/bank-prior"))


def test_caption_bank_auto_follows_the_tokenizer(tiny_model_dir, tmp_path):
    """`auto` is resolved when the run is built: `toy` for the toy model or a folder made from it, else `generic`."""
    specs = load_concepts(["toy:stripes"])
    config = ImmunizeConfig(caption_bank="auto")
    other = tmp_path / "other"  # the tiny model with a tokenizer that knows general English
    shutil.copytree(tiny_model_dir, other)
    shutil.rmtree(other / "tokenizer")
    words = {w for bank in ("toy", "generic") for caption in load_caption_bank(bank) for w in caption.split()}
    tokens = [*"abcdefghijklmnopqrstuvwxyz", *(w + "</w>" for w in sorted(words)), "<|startoftext|>", "<|endoftext|>"]
    (other / "tokenizer").mkdir()
    (other / "tokenizer" / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (other / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    banks = {model: ImmunizationRun(model, specs, config, tmp_path / "out").config.caption_bank
             for model in ("toy", str(tiny_model_dir), str(other), "CompVis/stable-diffusion-v1-4")}
    assert banks == {"toy": "toy", str(tiny_model_dir): "toy", str(other): "generic",
                     "CompVis/stable-diffusion-v1-4": "generic"}
    assert ImmunizationRun("toy", specs, config.with_overrides(caption_bank="generic"), tmp_path).config.caption_bank \
        == "generic"


def test_default_steps_grow_with_the_targets(tmp_path):
    """`steps: 0` (the default) is resolved when the run is built, so that the record says what ran: 80 outer steps,
    plus 12 per target past three; steps given stay as given."""
    ten = load_concepts([f"toy:{name}" for name in ("stripes", "checker", "dots", "zigzag", "rings", "circle",
                                                     "crescent", "cross", "star", "square")])
    config = ImmunizeConfig(caption_bank="toy")
    steps = {n: ImmunizationRun("toy", ten[:n], config, tmp_path).config.steps for n in (1, 3, 4, 5, 10)}
    assert steps == {1: 80, 3: 80, 4: 92, 5: 104, 10: 164}
    assert ImmunizationRun("toy", ten, config, tmp_path).run_settings()["config"]["steps"] == 164  # what is recorded
    assert ImmunizationRun("toy", ten, config.with_overrides(steps=30), tmp_path).config.steps == 30
