"""End-to-end tests of `mima toy ...` and `mima generate`, through `main([...])` and one real subprocess."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mima
from mima.cli import main
from mima.data.image_folder import read_image_folder
from mima.toy import world as toy_world


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("mima: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_toy_concepts_json(capsys):
    assert main(["toy", "concepts", "--json"]) == 0
    concepts = json.loads(capsys.readouterr().out)
    assert len(concepts) >= 20
    assert {c["name"] for c in concepts if c["held_out"]} == toy_world.HELD_OUT
    assert {c["family"] for c in concepts} == {"style", "object"}
    assert all(c["name"] in prompt for c in concepts for prompt in c["prompts"])


def test_toy_concepts_table(capsys):
    assert main(["toy", "concepts"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["name", "family", "held-out"]
    assert len(rows) == len(toy_world.toy_concepts())
    assert any(row.split()[:3] == ["plaid", "style", "yes"] for row in rows)


def _run_python(*args: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(mima.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_python_m_mima_runs_in_a_subprocess():
    done = _run_python("-m", "mima", "toy", "concepts", "--json")
    assert len(json.loads(done.stdout)) >= 20


def test_building_the_parser_imports_no_heavy_library():
    # Every `mima` call builds the whole parser, so `register()` must leave torch & co. to the command's `func`.
    code = (
        "import sys, mima.cli; mima.cli.build_parser(); "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    done = _run_python("-c", code)
    assert done.stdout.strip() == "[]", "a subcommand's register() imports a heavy library at parser-build time"


def test_toy_images_writes_a_folder_that_reads_back(tmp_path, capsys):
    out = tmp_path / "star"
    assert main(["toy", "images", "star", "--n", "3", "--out", str(out), "--seed", "7"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    images, prompts = read_image_folder(out)
    expected_images, expected_prompts = toy_world.sample_concept_images("star", 3, seed=7)
    assert prompts == expected_prompts
    for image, expected in zip(images, expected_images, strict=True):
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_toy_images_unknown_concept_suggests(tmp_path, capsys):
    assert main(["toy", "images", "circel", "--n", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "did you mean 'circle'?" in _one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_toy_images_unwritable_out(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["toy", "images", "star", "--n", "1", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "file" in _one_error_line(capsys.readouterr().err)


def test_toy_export_copies_the_shipped_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("mima.models.components.toy_model_dir", lambda: tiny_model_dir)
    assert main(["toy", "export", str(tmp_path / "exported")]) == 0
    copied = sorted(p.relative_to(tmp_path / "exported") for p in (tmp_path / "exported").rglob("*"))
    assert copied == sorted(p.relative_to(tiny_model_dir) for p in tiny_model_dir.rglob("*"))
    assert main(["toy", "export", str(tmp_path / "exported")]) == 2
    assert "not an empty folder" in _one_error_line(capsys.readouterr().err)


def test_toy_export_without_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mima.models.components.toy_model_dir", lambda: tmp_path / "absent")
    assert main(["toy", "export", str(tmp_path / "exported")]) == 2
    assert "shipped toy model is missing" in _one_error_line(capsys.readouterr().err)


def test_generate_writes_a_grid(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "grids" / "star.png"
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "a photo of a star", "--n", "2", "--steps", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    # Two 32-pixel images side by side, upscaled 4x by save_grid.
    assert Image.open(out).size == (2 * 32 * 4, 32 * 4)
    out.write_bytes(b"an older grid")
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0  # without it: tests/test_bad_input.py
    assert Image.open(out).size == (2 * 32 * 4, 32 * 4)


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """`mima ls | head -1`: the pipe closes before mima writes; no error line, the shell's SIGPIPE status."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before mima writes anything
    try:
        done = subprocess.run([sys.executable, "-m", "mima", "ls"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_generate_rejects_a_non_diffusers_folder(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    argv = ["generate", "--model", str(tmp_path), "--prompt", "a star", "--out", str(tmp_path / "g.png")]
    assert main(argv) == 2
    assert "model_index.json" in _one_error_line(capsys.readouterr().err)


def test_generate_unwritable_out(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "g.png"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a star", "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err)


def test_toy_pretrain_tiny_run_loads_and_keeps_precedence(tmp_path, monkeypatch, capsys):
    # The final sample grid is 80 images x 25 DDIM steps; 1 step keeps this test fast.
    import mima.sampling

    monkeypatch.setattr(mima.sampling, "sample_images", functools.partial(mima.sampling.sample_images, steps=1))
    config = tmp_path / "pretrain.yaml"
    config.write_text("vae_steps: 2\nvae_batch_size: 2\nsteps: 50\nfocus_steps: 2\nwarmup_steps: 1\n")
    argv = ["toy", "pretrain", "--out", str(tmp_path / "run"), "--config", str(config), "--size", "tiny"]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--steps", "2", "--batch-size", "2", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'run' / 'model'}" in out
    saved = json.loads((tmp_path / "run" / "pretrain_config.json").read_text())
    assert (saved["steps"], saved["vae_steps"], saved["focus_steps"], saved["batch_size"], saved["size"]) == (
        2, 2, 2, 2, "tiny")
    assert (tmp_path / "run" / "samples.png").is_file()

    from mima.models.components import Components

    components = Components.from_pretrained(tmp_path / "run" / "model")
    assert components.unet.config.cross_attention_dim == 8


def test_toy_pretrain_unknown_yaml_key(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("step: 3\n")
    assert main(["toy", "pretrain", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'steps'?" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_vanilla_diffusers_loads_and_samples(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a photo of a star", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("argv", [["--help"], ["toy"], ["generate", "--prompt", "x"]])
def test_usage_errors_and_help_return_a_status(argv):
    assert main(argv) == (0 if argv == ["--help"] else 2)
