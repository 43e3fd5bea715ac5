import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mima.data.image_folder import read_image_folder, write_image_folder
from mima.errors import ConfigError, DataError
from mima.evaluate import evaluate_runs, pair_runs, read_evaluation, resolve_references, write_evaluation
from mima.evaluate.cache import FeatureCache
from mima.evaluate.encoders import ImageEncoder
from mima.evaluate.evaluate import read_attack_run, write_toy_references
from mima.evaluate.metrics import MRSGR, MSGR, AttackSuccessRate, NonTargetSGR, SimilarityAfterAttack
from mima.evaluate.results import ConceptResult, EncoderResult, Evaluation, RunPair
from mima.evaluate.toy_judge_encoder import ToyJudgeEncoder
from mima.toy import world as toy_world

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _make_run(folder: Path, concept: str, steps: dict[int, tuple[str, int]], method: str = "lora") -> Path:
    """A fake `mima attack` run: samples/step_<k> hold 6 toy images of steps[k] = (toy concept, seed)."""
    for step, (shown, seed) in steps.items():
        images, prompts = toy_world.sample_concept_images(shown, 6, seed=seed)
        write_image_folder(images, prompts, folder / "samples" / f"step_{step}")
    record = {"config": {"method": method}, "concept": concept, "model": "toy", "prompts": [], "eval_prompts": []}
    (folder / "attack.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def runs(tmp_path) -> dict:
    """Target 'stripes': the attack teaches it without immunization, but yields 'checker' on the immunized model.
    Non-target 'dots': both runs learn it identically."""
    base = {0: ("circle", 1)}
    return {
        "pairs": {
            "stripes": (
                _make_run(tmp_path / "wo-stripes", "stripes", {**base, 2: ("stripes", 2)}),
                _make_run(tmp_path / "w-stripes", "stripes", {**base, 2: ("checker", 3)}),
            ),
            "dots": (
                _make_run(tmp_path / "wo-dots", "dots", {**base, 2: ("dots", 4)}),
                _make_run(tmp_path / "w-dots", "dots", {**base, 2: ("dots", 4)}),
            ),
        },
        "references": write_toy_references(["stripes", "dots"], tmp_path / "refs", n=12),
    }


def test_evaluate_runs_end_to_end_and_cached_reevaluation(runs, tmp_path, monkeypatch):
    result = evaluate_runs(runs["pairs"], runs["references"], ["toy-judge"], non_targets=["dots"])
    block = result.encoders["toy-judge"]
    stripes, dots = block.concepts["stripes"], block.concepts["dots"]
    assert stripes.steps == [0, 2] and stripes.target and not dots.target
    assert stripes.s_without[0] == stripes.s_with[0] and stripes.sgr[0] == 0  # same images before attack
    assert stripes.s_without[1] > stripes.s_without[0]
    assert stripes.sgr[1] > 0.2 and block.value(MSGR) == pytest.approx(100 * stripes.sgr[1])
    assert block.value(MRSGR) == pytest.approx(100 * stripes.rsgr) and block.value(MRSGR) > 0
    assert stripes.asr_without[1] >= 0.8 and stripes.asr_with[1] <= 0.2
    assert block.value(AttackSuccessRate) == stripes.asr_with[1]
    assert block.value(SimilarityAfterAttack) == pytest.approx(stripes.s_with[1])
    assert block.value(NonTargetSGR) == 0 and dots.sgr == [0, 0]

    metrics_file = write_evaluation(result, tmp_path / "out")
    record = json.loads(metrics_file.read_text())
    assert record["results"] == result.to_json()
    assert read_evaluation(metrics_file).to_json() == record["results"]  # the reader inverts the writer
    assert record["results"]["encoders"]["toy-judge"]["msgr"] == block.value(MSGR)  # the schema of metrics.json
    assert record["metrics"]["msgr"]["higher_is_better"] is True
    assert record["metrics"]["similarity_after_attack"]["higher_is_better"] is False
    assert {"versions", "git_commit", "date"} <= set(record["provenance"])
    for png in ("plots/toy-judge/stripes.png", "plots/toy-judge/dots.png", "grids/stripes.png", "grids/dots.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG_MAGIC)
    assert (runs["pairs"]["stripes"][0] / ".feature_cache" / "toy-judge.safetensors").is_file()

    # Same inputs again: everything comes from the feature caches, nothing is encoded.
    calls = []
    monkeypatch.setattr(ToyJudgeEncoder, "features", lambda self, images: calls.append(len(images)))
    monkeypatch.setattr(ToyJudgeEncoder, "predict_labels", lambda self, images: calls.append(len(images)))
    again = evaluate_runs(runs["pairs"], runs["references"], ["toy-judge"], non_targets=["dots"])
    assert calls == [] and again.to_json() == result.to_json()
    second = json.loads(write_evaluation(again, tmp_path / "out2").read_text())
    record["provenance"].pop("date"), second["provenance"].pop("date")
    assert second == record


def test_cache_encodes_only_new_images(runs, monkeypatch):
    pairs = {"stripes": runs["pairs"]["stripes"]}
    evaluate_runs(pairs, runs["references"], ["toy-judge"])
    images, prompts = toy_world.sample_concept_images("stripes", 6, seed=77)
    write_image_folder(images, prompts, pairs["stripes"][1] / "samples" / "step_2")  # replaces the 'with' samples
    encoded = []
    original = ToyJudgeEncoder.features
    monkeypatch.setattr(ToyJudgeEncoder, "features", lambda self, ims: encoded.append(len(ims)) or original(self, ims))
    result = evaluate_runs(pairs, runs["references"], ["toy-judge"])
    assert encoded == [6]
    assert result.encoders["toy-judge"].concepts["stripes"].sgr[1] < 0.2


class MeanColour(ImageEncoder):
    """A stand-in encoder: the mean RGB colour plus a constant, with a settable weights fingerprint."""

    name = "mean-colour"

    def __init__(self, weights: str = "v1") -> None:
        super().__init__()
        self.weights, self.calls = weights, 0

    def fingerprint(self) -> str:
        return self.weights

    def features(self, images: list) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([[*np.asarray(image, dtype=np.float32).mean(axis=(0, 1)), 50.0] for image in images])


def test_encoder_instances_and_cache_invalidation_by_weights(runs, tmp_path):
    folder = tmp_path / "images"
    write_image_folder(*toy_world.sample_concept_images("dots", 4, seed=0), folder)
    images = read_image_folder(folder)[0]
    for weights, expected_calls in (("v1", 1), ("v1", 0), ("v2", 1)):
        encoder = MeanColour(weights)
        with FeatureCache(folder, encoder) as cache:
            feats, labels = cache.encode(images)
        assert encoder.calls == expected_calls and feats.shape == (4, 4) and labels is None
    result = evaluate_runs({"dots": runs["pairs"]["dots"]}, runs["references"], [MeanColour()])
    assert result.encoders["mean-colour"].value(MSGR) == 0
    assert result.encoders["mean-colour"].concepts["dots"].asr_with is None


def test_pair_runs_by_concept(runs, tmp_path):
    wo, w = runs["pairs"]["stripes"], runs["pairs"]["dots"]
    pairs = pair_runs([wo[0], w[0]], [w[1], wo[1]])
    assert pairs == {"dots": (w[0], w[1]), "stripes": (wo[0], wo[1])}
    with pytest.raises(ConfigError, match="dots have a run without immunization or with it, not both"):
        pair_runs([wo[0], w[0]], [wo[1]])
    with pytest.raises(ConfigError, match="both attack 'stripes'"):
        pair_runs([wo[0], wo[1]], [wo[1]])
    with pytest.raises(DataError, match="no attack.json"):
        pair_runs([tmp_path], [wo[1]])


def test_run_validation(runs, tmp_path):
    early = _make_run(tmp_path / "early", "stripes", {0: ("circle", 1)})
    with pytest.raises(DataError, match="must hold step_0 and a later step"):
        read_attack_run(early)
    other = _make_run(tmp_path / "dreambooth", "stripes", {0: ("circle", 1), 2: ("stripes", 2)}, "dreambooth")
    stripes = runs["pairs"]["stripes"]
    with pytest.raises(ConfigError, match="compare the same attack"):
        evaluate_runs({"stripes": (stripes[0], other)}, runs["references"], ["toy-judge"])
    with pytest.raises(ConfigError, match="do not attack concept 'dots'"):
        evaluate_runs({"dots": stripes}, runs["references"], ["toy-judge"])
    with pytest.raises(DataError, match="reference image folder"):
        evaluate_runs({"stripes": stripes}, {"stripes": tmp_path / "missing"}, ["toy-judge"])
    with pytest.raises(ConfigError, match="non-target concept"):
        evaluate_runs({"stripes": stripes}, runs["references"], ["toy-judge"], non_targets=["dots"])


def test_resolve_references(tmp_path):
    toy = resolve_references(["toy"], ["stripes"], tmp_path / "toy")
    assert toy == {"stripes": tmp_path / "toy" / "stripes"}
    assert len(list(toy["stripes"].glob("*.png"))) == 64
    assert resolve_references([str(tmp_path / "refs")], ["a", "b"], tmp_path) == {
        "a": tmp_path / "refs" / "a", "b": tmp_path / "refs" / "b"
    }
    mixed = resolve_references(["a=/x/y", str(tmp_path)], ["a", "b"], tmp_path)
    assert mixed == {"a": Path("/x/y"), "b": tmp_path / "b"}
    with pytest.raises(ConfigError, match="no reference images for 'b'"):
        resolve_references(["a=/x/y"], ["a", "b"], tmp_path)
    with pytest.raises(ConfigError, match="not a toy concept"):
        resolve_references(["toy"], ["van-gogh"], tmp_path)


def test_cli_evaluate(runs, tmp_path, capsys):
    from mima.cli import evaluate as cli_evaluate

    parser = argparse.ArgumentParser()
    cli_evaluate.register(parser.add_subparsers())
    stripes = runs["pairs"]["stripes"]
    args = parser.parse_args([
        "evaluate", "--without", str(stripes[0]), "--with", str(stripes[1]), "--references", "toy",
        "--encoder", "toy-judge", "--out", str(tmp_path / "cli"),
    ])
    args.func(args)
    assert "toy-judge: MSGR" in capsys.readouterr().out
    record = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert record["results"]["encoders"]["toy-judge"]["msgr"] > 0
    assert (tmp_path / "cli" / "references" / "stripes" / "metadata.csv").is_file()


def test_cli_ls(capsys):
    from mima.cli import ls

    parser = argparse.ArgumentParser()
    ls.register(parser.add_subparsers())
    for kind, expected in (("encoders", "efficientnet-lite0"), ("metrics", "msgr"),
                           ("attacks", "(defaults: 300 steps, lr 0.005; on a real model 0.0005)")):
        args = parser.parse_args(["ls", kind])
        args.func(args)
        assert expected in capsys.readouterr().out


def test_grid_of_differently_sized_images(tmp_path):
    from mima.evaluate.report import save_comparison_grid

    rng = np.random.default_rng(0)
    write_image_folder([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)] * 3, ["p"] * 3, tmp_path / "a")
    write_image_folder([rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)] * 2, ["p"] * 2, tmp_path / "b")
    path = save_comparison_grid(tmp_path / "a", tmp_path / "b", tmp_path / "grid.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_results_json_round_trip_keeps_undefined_values():
    nan = float("nan")
    concept = ConceptResult("lora", True, [0, 1], [0.0, 0.0], [0.0, 0.5], [nan, nan], nan)
    evaluation = Evaluation({"c": RunPair("wo", "w", [0, 1])}, {"c": "refs/c"}, [],
                            {"judge": EncoderResult({"c": concept}, {"msgr": nan, "mrsgr": 1.5})})
    data = json.loads(json.dumps(evaluation.to_json(), allow_nan=False))
    assert data["encoders"]["judge"]["concepts"]["c"]["rsgr"] is None and data["encoders"]["judge"]["msgr"] is None
    again = Evaluation.from_json(data)
    assert np.isnan(again.encoders["judge"].concepts["c"].rsgr) and np.isnan(again.encoders["judge"].value(MSGR))
    assert again.encoders["judge"].value(MRSGR) == 1.5 and again.pairs["c"].immunized == "w"
    assert again.to_json() == data
