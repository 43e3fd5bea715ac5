"""`mima attack-sweep` ranks its grid worst case first: by MSGR against a reference model's twin runs (the numbers
`mima evaluate` gives for the same pair), or by the last checkpoint's similarity to the concept's images."""

import json
import shutil

import torch

from mima.cli import main
from mima.evaluate import evaluate_runs
from mima.evaluate.evaluate import run_similarity, write_toy_references
from mima.evaluate.metrics import MSGR
from mima.evaluate.toy_judge_encoder import ToyJudgeEncoder
from mima.utils.io import load_tensors, save_tensors

GRID = ["--methods", "lora", "--budgets", "2", "--lrs", "0.05", "--prompts", "concept", "fresh-token",
        "an image of a ring", "--n-images", "4", "--eval-images", "2", "--sampling-steps", "2", "--batch-size", "2",
        "--save-every", "1", "--encoder", "toy-judge"]


def _perturbed_copy(model_dir, out):
    """The model with its UNet's weights moved a little: a stand-in for an immunized model."""
    shutil.copytree(model_dir, out)
    path = next((out / "unet").glob("*.safetensors"))
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in load_tensors(path).items()}
    save_tensors(path, tensors)
    return out


def test_a_sweep_against_a_reference_model_ranks_by_msgr(tiny_model_dir, tmp_path, capsys):
    immunized = _perturbed_copy(tiny_model_dir, tmp_path / "immunized")
    out = tmp_path / "sweep"
    args = ["attack-sweep", "--model", str(immunized), "--reference-model", str(tiny_model_dir),
            "--concept", "toy:donut", "--out", str(out), *GRID]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    record = json.loads((out / "sweep.json").read_text())
    assert record["ranked_by"] == "msgr" and len(record["runs"]) == 3
    assert record["worst_case"] == record["runs"][0]
    references = write_toy_references(["donut"], tmp_path / "refs")["donut"]
    msgrs = []
    for run in record["runs"]:
        attack = json.loads((tmp_path / run["run"] / "attack.json").read_text())
        assert run["prompt"] == attack["prompt_mode"] and run["steps"] == 2 and run["lr"] == 0.05
        assert run["reference_run"].startswith(str(out / "reference"))
        pair = {"donut": (run["reference_run"], run["run"])}
        expected = evaluate_runs(pair, {"donut": references}, ["toy-judge"]).encoders["toy-judge"].value(MSGR)
        assert abs(run["msgr"] - expected) < 1e-9
        msgrs.append(run["msgr"])
    assert msgrs == sorted(msgrs) and len(set(msgrs)) == 3
    worst = record["runs"][0]
    assert printed.splitlines()[2].split()[:2] == ["1", "lora"] and f"{worst['msgr']:.1f}" in printed.splitlines()[2]


def test_a_sweep_without_reference_ranks_by_final_similarity(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["attack-sweep", "--model", str(tiny_model_dir), "--concept", "toy:donut", "--out", str(out),
                 *GRID]) == 0, capsys.readouterr().err
    record = json.loads((out / "sweep.json").read_text())
    assert record["ranked_by"] == "final_similarity" and not (out / "reference").exists()
    finals = [run["final_similarity"] for run in record["runs"]]
    assert finals == sorted(finals, reverse=True) and all(run["msgr"] is None for run in record["runs"])
    judge = ToyJudgeEncoder()
    for run in record["runs"]:
        assert run_similarity(run["run"], out / "references" / "donut", judge).values[-1] == run["final_similarity"]
    assert {run["prompt"] for run in record["runs"]} == {"concept", "fresh-token", "an image of a ring"}
