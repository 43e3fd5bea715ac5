import numpy as np
import pytest
import torch

from mima.errors import ConfigError, DataError, ModelError
from mima.toy import world as toy_world
from mima.toy.judge import (
    OBJECT_LABELS,
    STYLE_LABELS,
    ToyJudge,
    ToyJudgeConfig,
    default_judge_dir,
    evaluate_judge,
    load_default_judge,
    to_pixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 0) -> np.ndarray:
    return toy_world.sample_training_batch(n, np.random.default_rng(seed), include_held_out=True)[0]


def _judge(seed: int = 0) -> ToyJudge:
    torch.manual_seed(seed)
    return ToyJudge(ToyJudgeConfig(seed=seed)).eval()


def test_features_shape_and_determinism():
    judge = _judge()
    pixels = to_pixels(_images(5))
    assert pixels.shape == (5, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    with torch.no_grad():
        first, second = judge.features(pixels), judge.features(pixels)
        style_logits, object_logits = judge(pixels)
    assert first.shape == (5, judge.feature_dim) == (5, 64)
    assert torch.equal(first, second)
    assert style_logits.shape == (5, len(STYLE_LABELS)) and object_logits.shape == (5, len(OBJECT_LABELS))
    with torch.no_grad():
        assert torch.equal(_judge().features(pixels), first)  # same seed, same weights
        # train() and eval() compute the same function (GroupNorm, no BatchNorm or dropout).
        assert torch.equal(judge.train().features(pixels), first)


def test_to_pixels_accepts_single_image_and_list():
    images = _images(3)
    batch = to_pixels(images)
    assert torch.equal(to_pixels(list(images)), batch)
    assert torch.equal(to_pixels(images[0]), batch[:1])
    assert torch.equal(to_pixels(batch), batch)
    with pytest.raises(DataError, match="uint8"):
        to_pixels(images.astype(np.float32))


def test_save_load_round_trip(tmp_path):
    judge = _judge(seed=3)
    pixels = to_pixels(_images(4))
    judge.save_pretrained(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ToyJudge.from_pretrained(tmp_path / "judge")
    assert loaded.config == judge.config
    with torch.no_grad():
        assert torch.equal(loaded.features(pixels), judge.features(pixels))
        for a, b in zip(loaded(pixels), judge(pixels), strict=True):
            assert torch.equal(a, b)
    assert loaded.predict(_images(4)) == judge.predict(_images(4))


def test_from_pretrained_missing_or_mismatched(tmp_path):
    with pytest.raises(ModelError, match="no toy judge") as info:
        ToyJudge.from_pretrained(tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    _judge().save_pretrained(tmp_path / "judge")
    ToyJudgeConfig(widths=(8, 16)).save_json(tmp_path / "judge" / "config.json")
    with pytest.raises(ModelError, match="do not match"):
        ToyJudge.from_pretrained(tmp_path / "judge")


def test_config_validation():
    with pytest.raises(ConfigError):
        ToyJudgeConfig(widths=(16, 30))
    with pytest.raises(ConfigError):
        ToyJudgeConfig(steps=0)


def test_concept_rate_counts_the_right_head():
    judge = _judge()
    # Force predictions: style head always says "dots", object head always says "none" except for image 0.
    with torch.no_grad():
        for head in (judge.style_head, judge.object_head):
            head.weight.zero_()
            head.bias.zero_()
        judge.style_head.bias[STYLE_LABELS.index("dots")] = 1.0
        judge.object_head.bias[OBJECT_LABELS.index("none")] = 1.0
    images = _images(4)
    assert judge.predict(images) == (["dots"] * 4, ["none"] * 4)
    assert judge.concept_rate(images, "dots") == 1.0
    assert judge.concept_rate(images, "stripes") == 0.0
    assert judge.concept_rate(images, "star") == 0.0
    with torch.no_grad():
        judge.object_head.bias[OBJECT_LABELS.index("star")] = 2.0
    assert judge.concept_rate(images, "star") == 1.0
    assert judge.concept_rate(images, "dots") == 1.0  # style head unaffected
    with pytest.raises(ConfigError, match="unknown toy concept"):
        judge.concept_rate(images, "none")


def test_shipped_judge_is_accurate():
    if not (default_judge_dir() / "model.safetensors").is_file():
        pytest.skip(f"no shipped toy judge at {default_judge_dir()}")
    judge = load_default_judge()
    assert (default_judge_dir() / "model.safetensors").stat().st_size < 1_000_000
    accuracy = evaluate_judge(judge, n_per_concept=30, seed=2024)
    assert set(accuracy) == {*toy_world.STYLES, *toy_world.OBJECTS, "compositions"}
    failing = {name: acc for name, acc in accuracy.items() if acc < 0.98}
    assert not failing, f"shipped judge below 98 % on {failing}"
    images, _ = toy_world.sample_concept_images("donut", 10, seed=99)
    assert judge.concept_rate(np.stack(images), "donut") >= 0.9
