"""Every command on models shaped like Stable Diffusion 1.5, 2.x and XL (tests/sd_shaped.py), through the CLI,
outputs reloaded in plain diffusers.

The concept is a real one in form: its name ("zorblax-style") is no word of its prompt, its words split into several
tokens, its class images are generated into the `class_images:` folder the concept file names.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from mima.attacks import attacks
from mima.attacks.custom_diffusion import load_custom_diffusion
from mima.cli import main
from mima.data.image_folder import read_image_folder, write_image_folder
from mima.models.cross_attention import cross_attention_modules

PROMPT = "a painting in the style of Zorblax Quenn"
# One step of everything, one image per call: the point is that every path runs on SD's shapes. A bank of 24
# captions (the generic bank's first) keeps the 77-token, 768-wide encoding of the bank to a second.
FAST_IMMUNIZE = ["--steps", "1", "--batch-size", "1", "--n-class-images", "2"]
FAST_ATTACK = ["--steps", "1", "--batch-size", "1", "--n-class-images", "2", "--eval-images", "1",
               "--sampling-steps", "1"]


def _load_textual_inversion(pipe: DiffusionPipeline, directory: Path) -> None:
    """Plain diffusers: one file for SD, SDXL's `clip_l` / `clip_g` embeddings into each of its text encoders."""
    if not isinstance(pipe, StableDiffusionXLPipeline):
        pipe.load_textual_inversion(directory, weight_name="learned_embeds.safetensors")
        return
    embeddings = load_file(directory / "learned_embeds.safetensors")
    pipe.load_textual_inversion(embeddings["clip_l"], token="<zorblax-style>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(embeddings["clip_g"], token="<zorblax-style>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert pipe.tokenizer_2.convert_tokens_to_ids("<zorblax-style>") != pipe.tokenizer_2.unk_token_id


LOADERS = {
    "dreambooth": lambda pipe, d: DiffusionPipeline.from_pretrained(d),
    "lora": lambda pipe, d: pipe.load_lora_weights(d, weight_name="pytorch_lora_weights.safetensors")
    or pipe.get_list_adapters()["unet"],
    "textual-inversion": _load_textual_inversion,
    "custom-diffusion": load_custom_diffusion,
}


@pytest.fixture(scope="module")
def concept_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A concept file naming 4 images, a class prompt, and a class-image folder that does not exist yet."""
    root = tmp_path_factory.mktemp("zorblax")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    write_image_folder(pixels, [PROMPT] * 4, root / "images")
    bank = (resources.files("mima") / "assets" / "captions" / "generic.txt").read_text().splitlines()[:24]
    (root / "captions.txt").write_text("\n".join(bank) + "\n")
    path = root / "concepts.yaml"
    path.write_text(
        f"concepts:\n  - name: zorblax-style\n    prompt: {PROMPT}\n    images: images\n"
        "    class_prompt: a painting\n    class_images: class-painting\n"
    )
    return path


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    """The SD-1.5-shaped, SD-2.x-shaped (v-prediction, 1024-wide) and SDXL-shaped random pipelines."""
    return request.getfixturevalue(f"{request.param}_model_dir")


@pytest.fixture(scope="module")
def immunized(model_dir, concept_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imm-mima")
    argv = ["immunize", "--model", str(model_dir), "--concepts", str(concept_file), "--method", "mima"]
    assert main([*argv, *_fast_immunize(concept_file), "--out", str(out)]) == 0
    return out / "model"


def _fast_immunize(concept_file: Path) -> list[str]:
    return [*FAST_IMMUNIZE, "--caption-bank", str(concept_file.parent / "captions.txt")]


def _attack(model: Path, concept_file: Path, method: str, out: Path) -> Path:
    argv = ["attack", "--model", str(model), "--method", method, "--concept", str(concept_file), "--out", str(out)]
    assert main([*argv, *FAST_ATTACK]) == 0
    return out


def test_the_fixture_has_the_shapes_of_sd15(sd15_model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd15_model_dir)
    assert list(pipe.unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 768
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size * 8 == 64
    assert len(pipe.tokenizer.tokenize("Zorblax")) > 1 and pipe.tokenizer.model_max_length == 77
    assert pipe.safety_checker is not None and pipe.feature_extractor is not None


def test_the_sd15_builder_sizes_latents_and_vae_to_a_resolution(tmp_path):
    from sd_shaped import build_sd15_shaped

    pipe = StableDiffusionPipeline.from_pretrained(build_sd15_shaped(tmp_path / "model", resolution=128))
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.sample_size == 128


def test_immunize_generates_class_images_once_and_keeps_every_component(immunized, model_dir, concept_file):
    class_images = concept_file.parent / "class-painting"
    assert len(read_image_folder(class_images)[0]) == 2  # generated into the concept's folder, not under --out
    pipe, base = (DiffusionPipeline.from_pretrained(d) for d in (immunized, model_dir))
    assert type(pipe) is type(base) and type(pipe.scheduler) is type(base.scheduler)
    assert pipe.scheduler.config == base.scheduler.config
    assert (getattr(pipe, "safety_checker", None) is None) == (getattr(base, "safety_checker", None) is None)
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))}
    assert changed and all(".transformer_blocks." in name for name in changed)  # S^u only
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if hasattr(base, name):
            assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in
                       (getattr(pipe, name), getattr(base, name))), strict=True))
    written = {"tokenizer", "text_encoder", "text_encoder_2", "vae", "unet"}
    kept = {p.name for p in model_dir.iterdir() if p.is_dir()} - written
    assert kept >= {"scheduler"}
    for file in (f for part in kept for f in (model_dir / part).iterdir()):
        assert (immunized / file.relative_to(model_dir)).read_bytes() == file.read_bytes()


def test_the_sd15_fixture_keeps_its_pndm_scheduler_and_safety_checker(immunized, model_dir, sd15_model_dir):
    if model_dir != sd15_model_dir:
        pytest.skip("SD 1.5 only")
    pipe = StableDiffusionPipeline.from_pretrained(immunized)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is not None and pipe.feature_extractor is not None


@pytest.mark.parametrize("method", ["none", "erase", "imma", "imma-joint"])
def test_every_other_method_immunizes_and_reloads(model_dir, concept_file, immunized, tmp_path, method):
    class_images = concept_file.parent / "class-painting"
    generated = {p.name: p.stat().st_mtime_ns for p in class_images.iterdir()}
    argv = ["immunize", "--model", str(model_dir), "--concepts", str(concept_file), "--method", method]
    assert main([*argv, *_fast_immunize(concept_file), "--setting", "personalize", "--out", str(tmp_path)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in class_images.iterdir()} == generated  # reused, not redrawn
    base, pipe = (DiffusionPipeline.from_pretrained(d) for d in (model_dir, tmp_path / "model"))
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))}
    assert (changed == set()) == (method == "none")
    assert all((".attn2." if method == "erase" else ".transformer_blocks.") in name for name in changed)


@pytest.mark.parametrize("method", sorted(attacks.names()))
def test_every_attack_runs_with_reference_learning_rates_and_its_export_reloads(
    model_dir, concept_file, tmp_path, method
):
    run = _attack(model_dir, concept_file, method, tmp_path)
    record = json.loads((run / "attack.json").read_text())
    assert record["config"]["lr"] == attacks.get(method).reference_lr  # not the toy's
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    LOADERS[method](pipe, run / "export")
    assert len(read_image_folder(run / "samples" / "step_1")[0]) == 1


def test_token_attacks_replace_the_words_that_name_the_concept(concept_file):
    from mima.attacks.tokens import with_token
    from mima.data.concepts import load_concepts

    spec = load_concepts(concept_file)[0]
    assert with_token(PROMPT, spec, "<zorblax-style>") == "a painting in the style of <zorblax-style>"
    assert with_token(PROMPT, spec, "<new>", keep_words=True) == "a painting in the style of <new> Zorblax Quenn"


def test_evaluate_on_real_concepts_leaves_the_toy_judge_out(
    model_dir, immunized, concept_file, tmp_path, capsys
):
    without = _attack(model_dir, concept_file, "lora", tmp_path / "without")
    with_ = _attack(immunized, concept_file, "lora", tmp_path / "with")
    references = f"zorblax-style={concept_file.parent / 'images'}"
    argv = ["evaluate", "--without", str(without), "--with", str(with_), "--references", references]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    assert "toy-judge" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics["results"]["encoders"]) == ["efficientnet-lite0"]


def test_generate_draws_at_the_model_resolution(model_dir, tmp_path):
    out = tmp_path / "zorblax.png"
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--n", "1", "--steps", "1",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 128)  # one 64-px image, upscaled x2 by the grid


@pytest.mark.parametrize(("family", "width", "prediction"), [("sd15", 768, "epsilon"), ("sd2", 1024, "v_prediction")])
def test_every_cross_attention_reads_the_family_text_width(request, family, width, prediction):
    pipe = StableDiffusionPipeline.from_pretrained(request.getfixturevalue(f"{family}_model_dir"))
    layers = cross_attention_modules(pipe.unet)
    assert len(layers) == 10 and {a.to_k.in_features for a in layers.values()} == {width}
    assert pipe.text_encoder.config.hidden_size == width and pipe.scheduler.config.prediction_type == prediction


@pytest.mark.parametrize("command", ["immunize", *sorted(attacks.names()), "generate"])
def test_every_command_runs_in_bf16(model_dir, concept_file, immunized, tmp_path, command):
    """bf16 autocast on the CPU (float32 weights) through the real model shapes; the run records its precision."""
    bf16 = ["--device", "cpu", "--mixed-precision", "bf16"]
    if command == "generate":
        out = tmp_path / "zorblax.png"
        assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--n", "1", "--steps", "1",
                     "--out", str(out), *bf16]) == 0
        assert np.isfinite(np.asarray(Image.open(out))).all()
        return
    if command == "immunize":
        argv = ["immunize", "--model", str(model_dir), "--concepts", str(concept_file), "--method", "mima"]
        assert main([*argv, *_fast_immunize(concept_file), "--out", str(tmp_path), *bf16]) == 0
        record, key = json.loads((tmp_path / "immunization.json").read_text()), "objective"
    else:
        argv = ["attack", "--model", str(model_dir), "--method", command, "--concept", str(concept_file)]
        assert main([*argv, *FAST_ATTACK, "--out", str(tmp_path), *bf16]) == 0
        record, key = json.loads((tmp_path / "attack.json").read_text()), "loss"
    assert (record["device"], record["dtype"]) == ("cpu", "bfloat16")
    assert all(np.isfinite(row[key]) for row in record["log"])
