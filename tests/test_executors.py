"""The benchmark's executors: the Ray one gives the local one's metrics and resumes a failed run; flag errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mima.cli import main

CONFIG = {
    "targets": ["toy:stripes"], "non_targets": ["toy:star"], "methods": ["mima"], "attacks": ["lora"],
    "encoders": ["toy-judge"], "immunize": {"steps": 1, "n_images": 4, "n_class_images": 2, "batch_size": 2},
    "attack": {"steps": 2, "save_every": 1, "eval_images": 2, "sampling_steps": 2, "n_images": 4},
}


@pytest.fixture(scope="module")
def local_ray():
    """A Ray of two CPUs on this machine only, for this module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def _results(out) -> dict:
    """What a benchmark measured: its metrics.json without provenance, timings and the runs' paths."""
    record = json.loads((out / "report" / "metrics.json").read_text())
    evaluations = {method: {attack: {seed: result["encoders"] for seed, result in by_seed.items()}
                            for attack, by_seed in by_attack.items()}
                   for method, by_attack in record["evaluations"].items()}
    return {"summary": record["summary"], "before_attack": record["before_attack"], "evaluations": evaluations}


def _records(out) -> dict:
    """Each finished piece's record file and its modification time."""
    paths = [*out.glob("models/*/immunization.json"), *out.glob("attacks/**/attack.json"),
             *out.glob("attacks/**/.feature_cache/*.safetensors")]
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in paths}


def test_ray_gives_the_local_metrics_and_resumes_a_failed_run(local_ray, tiny_model_dir, tmp_path, capsys, one_thread):
    """Each Ray task runs on one thread (`--piece-cpus 1`), as the local pieces do here (`one_thread`)."""
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "model": str(tiny_model_dir)}))
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert main(["benchmark", "--config", str(path), "--out", str(local)]) == 0
    # A run that fails part-way: the mima model is recorded as made but its weights are missing, so every attack on
    # it fails in its Ray task, after the `none` model was made.
    (distributed / "models" / "mima").mkdir(parents=True)
    shutil.copy(local / "models" / "mima" / "immunization.json", distributed / "models" / "mima")
    capsys.readouterr()
    ray_run = ["benchmark", "--config", str(path), "--out", str(distributed), "--executor", "ray"]
    assert main(ray_run) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith("mima: error:") and "\n" not in error and "models/mima/model" in error
    failed = _records(distributed)
    assert "models/none/immunization.json" in failed and not (distributed / "report").exists()
    shutil.rmtree(distributed / "models" / "mima")
    del failed["models/mima/immunization.json"]
    assert main(ray_run) == 0
    resumed = _records(distributed)
    assert {name: resumed[name] for name in failed} == failed  # what the failed run finished is not redone
    assert resumed.keys() == _records(local).keys()
    assert _results(distributed) == _results(local)


def test_executor_flags_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    base = ["benchmark", "--preset", "toy-demo-quick", "--out", str(tmp_path / "out")]
    for flags, message in ((["--ray-address", "auto"], "--ray-address does not apply to --executor local"),
                           (["--executor", "ray", "--jobs", "2"], "--jobs does not apply to --executor ray"),
                           (["--executor", "ray", "--piece-gpus", "nan"], "--piece-gpus must be >= 0")):
        assert main(base + flags) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"mima: error: {message}") and error.count("\n") == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(base + ["--executor", "ray"]) == 2
    assert "pip install 'mima[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_local_executor_needs_no_ray():
    code = ("import sys, mima.cli.benchmark, mima.benchmark; from mima.executors import make_executor; "
            "make_executor('local', jobs=2).run([]); print('ray' in sys.modules)")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_the_demo_runs_one_local_worker_per_cpu_thread_unless_told(tmp_path, monkeypatch):
    import torch

    from mima.cli import benchmark as cli

    jobs = []
    monkeypatch.setattr(cli, "_run", lambda benchmarks, out, args: jobs.append(args.jobs))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 12)
    for flags in ([], ["--jobs", "1"], ["--executor", "ray"]):
        assert main(["demo", "--device", "cpu", "--out", str(tmp_path), *flags]) == 0
    assert jobs == [8, 1, None]  # capped at 8; as given; Ray places pieces itself
