"""Concept-parallel immunization: two gloo processes under torchrun give the one-process run's S^u weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mima.cli import main
from mima.immunize import ImmunizeConfig
from mima.immunize import trainer as trainer_module
from mima.utils.io import load_tensors

CONCEPTS = "toy:stripes,toy:star,toy:checker,toy:dots"
FAST = ["--steps", "2", "--save-every", "1", "--n-images", "2", "--n-class-images", "2", "--batch-size", "1",
        "--device", "cpu"]


# One `full` attacker on the cross-attention: its two-process sums match the one-process run to float tolerance. The
# default LoRA attackers leave some S^u entries a gradient at rounding level, which AdamW's first steps turn into
# +-lr moves of either sign (test below).
FULL_ATTACKER = str(Path(__file__).resolve().parents[1] / "configs" / "attackers-full.yaml")


def _args(model_dir, out, method, config=FULL_ATTACKER):
    return ["immunize", "--model", str(model_dir), "--concepts", CONCEPTS, "--out", str(out), "--method", method,
            *FAST, *(["--config", config] if config else [])]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "mima", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _upper_weights(out):
    weights = load_tensors(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    return {name: w for name, w in weights.items() if "attn2." in name}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    """The one-process run's S^u weights for a method (each method run once for the module)."""
    runs = {}

    def weights(method):
        if method not in runs:
            out = tmp_path_factory.mktemp("one") / method
            assert main(_args(tiny_model_dir, out, method)) == 0
            runs[method] = _upper_weights(out)
        return runs[method]

    return weights


@pytest.mark.parametrize("method", ["mima", "imma-joint"])
def test_two_processes_give_the_one_process_weights(tiny_model_dir, tmp_path, method, one_process, one_thread):
    log = _torchrun(_args(tiny_model_dir, tmp_path / "two", method))
    assert log.count(f"immunize ({method}):   0%") == 1  # one progress bar, the main process's
    one, two = one_process(method), _upper_weights(tmp_path / "two")
    before = _upper_weights(tiny_model_dir.parent)
    assert max((one[name] - before[name]).abs().max() for name in one) > 1e-3  # the steps moved S^u, far
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "two" / "checkpoint").exists() and (tmp_path / "two" / "immunization.json").is_file()


def test_two_processes_follow_the_one_process_run_with_the_default_attackers(tiny_model_dir, tmp_path, one_thread):
    """With the default LoRA attackers the runs agree but for entries whose gradient is rounding noise, where AdamW
    steps +-lr either way (as it does between one process run on one thread and on two)."""
    assert main(_args(tiny_model_dir, tmp_path / "one", "mima", None)) == 0
    _torchrun(_args(tiny_model_dir, tmp_path / "two", "mima", None))
    one, two = _upper_weights(tmp_path / "one"), _upper_weights(tmp_path / "two")
    differences = torch.cat([(two[name] - one[name]).abs().flatten() for name in one])
    assert (differences > 1e-5).float().mean() < 0.05  # a missing or doubled share would move most entries
    steps = int(FAST[FAST.index("--steps") + 1])
    assert differences.max() <= 2 * steps * ImmunizeConfig().outer_lr * 1.01  # each AdamW step +-lr at most


def test_a_one_process_checkpoint_resumes_on_two_processes(tiny_model_dir, tmp_path, interrupted_at, one_process,
                                                           one_thread):
    with interrupted_at(trainer_module._Loop, 1):
        assert main(_args(tiny_model_dir, tmp_path / "cut", "mima")) == 130  # interrupted after its first checkpoint
    assert (tmp_path / "cut" / "checkpoint").is_dir()
    _torchrun([*_args(tiny_model_dir, tmp_path / "cut", "mima"), "--resume"])
    full, resumed = one_process("mima"), _upper_weights(tmp_path / "cut")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-4, atol=1e-5)


def test_every_process_samples_the_same_attacker(tiny_model_dir, tmp_path, one_thread):
    """A distribution (today's step, and a first-order attack with two trajectory points): both processes take
    the attacker the one-process run takes at each step (so the summed shares make its gradient)."""
    # attackers-full.yaml's S^u and terms, whose two-process sums match to float tolerance (the defaults' leave
    # entries at rounding level, which AdamW moves +-lr either way: test above)
    full = yaml.safe_load(Path(FULL_ATTACKER).read_text())
    attackers = [{"kind": "full"}, {"kind": "full", "steps": 2, "order": "first-order", "trajectory_points": 2}]
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({**full, "attackers": attackers}))
    extra = ["--config", str(settings), "--steps", "3"]
    assert main([*_args(tiny_model_dir, tmp_path / "one", "mima", None), *extra]) == 0
    _torchrun([*_args(tiny_model_dir, tmp_path / "two", "mima", None), *extra])
    logs = [json.loads((tmp_path / run / "immunization.json").read_text())["log"] for run in ("one", "two")]
    assert [row["attacker"] for row in logs[0]] == [row["attacker"] for row in logs[1]] == [1, 1, 0]
    one, two = _upper_weights(tmp_path / "one"), _upper_weights(tmp_path / "two")
    before = _upper_weights(tiny_model_dir.parent)
    assert max((one[name] - before[name]).abs().max() for name in one) > 1e-3  # the steps moved S^u, far
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
