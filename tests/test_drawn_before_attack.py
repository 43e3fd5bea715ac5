"""benchmarks/drawn_before_attack.py tells a model that draws a concept from one that draws noise in its colours."""

import json
import sys

import pytest
import torch

from mima.models.components import Components


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("drawn_before_attack")


def test_noise_in_the_cross_attention_outputs_shows_in_the_similarity(script, tmp_path, monkeypatch):
    broken = Components.from_pretrained("toy")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in broken.unet.named_parameters():
            if name.endswith("attn2.to_out.0.weight"):
                weight.add_(torch.randn(weight.shape, generator=generator) * 3 * weight.std())
    broken.save_pretrained(tmp_path / "broken")
    out = tmp_path / "rows.json"
    argv = ["toy", str(tmp_path / "broken"), "--steps", "10", "--images", "8", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", ["drawn_before_attack.py", *argv])
    script.main()
    shipped, noisy = json.loads(out.read_text())
    assert (shipped["model"], shipped["concept"], shipped["steps"]) == ("toy", "waves", 10)
    assert shipped["judge_rate"] >= 0.75 and shipped["similarity"] > 0.6
    assert noisy["similarity"] < shipped["similarity"] - 0.2  # measured 0.35 against 0.82 (the judge: 100 % on both)


def test_an_unknown_concept_is_one_line_before_any_model_loads(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["drawn_before_attack.py", "no-such-folder", "--concepts", "wavez"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert "did you mean 'waves'?" in capsys.readouterr().err
