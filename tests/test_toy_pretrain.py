"""The toy pretraining recipe: three stages, and a resumed run identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from mima.errors import ConfigError
from mima.toy import model as toy
from mima.toy.pretrain import ToyPretrainConfig, ToyPretrainer

TINY = dict(size="tiny", vae_steps=2, vae_batch_size=2, steps=2, focus_steps=3, batch_size=2, warmup_steps=1,
            save_every=1)


class Interrupted(Exception):
    pass


def _weights(trainer: ToyPretrainer) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v for m, module in trainer.final_components().modules().items()
            for k, v in module.state_dict().items()}


def test_resume_inside_the_focus_stage_is_exact(tmp_path, monkeypatch, one_thread):
    cfg = ToyPretrainConfig(**TINY)
    straight = ToyPretrainer(cfg, tmp_path / "straight")
    straight.train()
    assert straight.step == 7 and straight.lr_schedule.last_epoch == 3  # the focus schedule replaced stage 2's

    original_step, original_merges = ToyPretrainer._train_step, toy.train_bpe_merges

    def fail_at_step_5(self):
        if self.step == 5:
            raise Interrupted
        return original_step(self)

    monkeypatch.setattr(ToyPretrainer, "_train_step", fail_at_step_5)
    with pytest.raises(Interrupted):
        ToyPretrainer(cfg, tmp_path / "resumed").train()
    monkeypatch.setattr(ToyPretrainer, "_train_step", original_step)
    # A rebuilt tokenizer with other ids must not matter: the resumed run uses the checkpoint's.
    monkeypatch.setattr(toy, "train_bpe_merges", lambda words: original_merges(words)[::-1])
    resumed = ToyPretrainer(cfg, tmp_path / "resumed")
    resumed.train()

    assert [e["loss"] for e in resumed.log if "loss" in e] == [e["loss"] for e in straight.log if "loss" in e]
    expected, actual = _weights(straight), _weights(resumed)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def test_focus_stage_uses_its_own_learning_rate(tmp_path, one_thread):
    cfg = ToyPretrainConfig(**{**TINY, "focus_steps": 4, "warmup_steps": 2, "focus_lr": 3e-4})
    trainer = ToyPretrainer(cfg, tmp_path)
    trainer.train()
    peak = max(group["initial_lr"] for group in trainer.opt.param_groups)
    assert peak == pytest.approx(3e-4)


@pytest.mark.parametrize("bad", [{"focus_steps": -1}, {"focus_style_share": 0.9}])
def test_bad_focus_settings(bad):
    with pytest.raises(ConfigError):
        ToyPretrainConfig(**bad)
