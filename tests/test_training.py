"""The shared training-loop skeleton (src/mima/training.py) on a small least-squares problem: autocast precision,
fp16 loss scaling (run on the CPU here, where the CLI refuses fp16), checkpoints with the loss scale, exact resume,
the NaN guard and the checkpoint hook."""

import pytest
import torch

from mima.errors import TrainingError
from mima.training import LoopSettings, TrainingLoop
from mima.utils.device import Placement


class LeastSquares(TrainingLoop):
    """Fit w to y = x @ target from batches drawn with each step's generator."""

    def __init__(self, folder, mixed_precision="no", steps=4, save_every=2):
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.target = torch.tensor([1.0, -2.0, 0.5, 3.0])
        settings = LoopSettings(steps=steps, save_every=save_every, seed=0, grad_clip=0.0,
                                checkpoint_dir=folder / "checkpoint", desc="least squares")
        super().__init__({"w": self.w}, torch.optim.Adam([self.w], lr=0.1), settings,
                         Placement(torch.device("cpu"), mixed_precision))
        self.compute_dtypes, self.checkpoints = set(), []
        # A scale that doubles after every finite step, so that a resume which lost it would show.
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1,
                                           enabled=mixed_precision == "fp16")

    def loss(self, generator):
        x = torch.randn(16, 4, generator=generator)
        prediction = x @ self.w  # (16,), in the autocast dtype
        self.compute_dtypes.add(prediction.dtype)
        return ((prediction.float() - x @ self.target.to(prediction.dtype).float()) ** 2).mean(), {"norm": 0.0}

    def at_checkpoint(self):
        self.checkpoints.append(self.step)


@pytest.mark.parametrize("mixed_precision,dtype", [("no", torch.float32), ("bf16", torch.bfloat16),
                                                   ("fp16", torch.float16)])
def test_the_loop_trains_in_the_chosen_precision(tmp_path, mixed_precision, dtype):
    loop = LeastSquares(tmp_path, mixed_precision, steps=30, save_every=10)
    log = loop.run(resume=False)
    assert loop.compute_dtypes == {dtype} and loop.w.dtype == torch.float32  # float32 master weights
    assert log[-1]["loss"] < 0.2 * log[0]["loss"] and set(log[0]) == {"step", "loss", "norm"}
    assert loop.checkpoints == [0, 10, 20, 30]
    assert loop.scaler.is_enabled() == (mixed_precision == "fp16")


@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_resume_is_exact_and_keeps_the_loss_scale(tmp_path, interrupted_at, mixed_precision):
    full = LeastSquares(tmp_path / "full", mixed_precision)
    full.run(resume=False)
    with interrupted_at(LeastSquares, 2), pytest.raises(KeyboardInterrupt):
        LeastSquares(tmp_path / "cut", mixed_precision).run(resume=False)
    assert (tmp_path / "cut" / "checkpoint" / "grad_scaler.pt").is_file() == (mixed_precision == "fp16")
    resumed = LeastSquares(tmp_path / "cut", mixed_precision)
    resumed.run(resume=True)
    assert torch.equal(resumed.w, full.w) and resumed.log == full.log
    assert resumed.scaler.get_scale() == full.scaler.get_scale() == (2.0**12 if mixed_precision == "fp16" else 1.0)


def test_a_non_finite_loss_stops_the_loop_with_the_step_named(tmp_path, monkeypatch):
    loop = LeastSquares(tmp_path)
    monkeypatch.setattr(loop, "loss", lambda generator: (torch.tensor(float("inf")), {}))
    with pytest.raises(TrainingError, match="non-finite loss inf at step 1"):
        loop.run(resume=False)
