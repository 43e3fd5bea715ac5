import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mima.errors import ConfigError, ModelError
from mima.evaluate.encoders import ImageEncoder, encoders, get_encoder, preprocess_images, spec_cache_id
from mima.registry import UnknownNameError
from mima.toy import world as toy_world

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_images(style: str, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(toy_world.render(style, None, rng)) for _ in range(n)]


def _random_images(n: int, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)]


def _assert_unit(feats: torch.Tensor, n: int) -> None:
    assert feats.shape[0] == n and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=1), torch.ones(n), atol=1e-5)


@pytest.fixture(scope="module")
def efficientnet() -> ImageEncoder:
    return get_encoder("efficientnet-lite0")


def test_registry_names_and_unknown_encoder():
    assert encoders.names() == ["clip", "dino", "efficientnet-lite0", "toy-judge"]
    with pytest.raises(UnknownNameError, match="unknown encoder 'clpi'; did you mean 'clip'"):
        get_encoder("clpi")
    with pytest.raises(UnknownNameError, match="did you mean 'efficientnet-lite0'"):
        get_encoder("efficientnet")
    with pytest.raises(ConfigError, match="nothing after ':'"):
        get_encoder("clip:")


def test_importing_encoders_stays_light():
    code = "import sys, mima.evaluate; print(any(m in sys.modules for m in ('transformers', 'diffusers')))"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_preprocess_images_resizes_shorter_side_and_crops():
    pixels = preprocess_images(_random_images(2, (40, 60)), 24, mean=(0, 0, 0), std=(1, 1, 1))
    assert pixels.shape == (2, 3, 24, 24) and 0 <= pixels.min() and pixels.max() <= 1


def test_efficientnet_features_are_unit_and_separate_styles(efficientnet):
    stripes, dots = _toy_images("stripes", 3, seed=0), _toy_images("dots", 3, seed=1)
    feats = efficientnet.embed(stripes + dots)
    _assert_unit(feats, 6)
    assert feats.shape[1] == 1280
    sims = feats @ feats.T
    same = torch.cat([sims[:3, :3][~torch.eye(3, dtype=bool)], sims[3:, 3:][~torch.eye(3, dtype=bool)]])
    assert same.min() > sims[:3, 3:].max()  # every same-style pair beats every cross-style pair
    assert torch.allclose(efficientnet.embed(stripes[:1]), feats[:1], atol=1e-5)  # batching does not matter


def test_efficientnet_is_fused_for_inference_with_the_package_networks_features(efficientnet):
    """Batch norms folded, symmetric paddings moved into their convolutions: the same features as the package's own
    network (to float rounding), with none of the memory-bound passes left that the fusion removes."""
    from efficientnet_lite_pytorch import EfficientNet

    package = EfficientNet.from_name("efficientnet-lite0")
    package.load_state_dict(torch.load(efficientnet.weights, map_location="cpu", weights_only=True))
    package.eval()
    pixels = preprocess_images(_toy_images("stripes", 2, seed=4) + _random_images(2), efficientnet.input_size)
    with torch.no_grad():
        expected = package.extract_features(pixels).mean(dim=(2, 3))
        fused = efficientnet.network.extract_features(pixels).mean(dim=(2, 3))
    assert torch.allclose(fused, expected, rtol=1e-4, atol=1e-4)
    modules = list(efficientnet.network.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    pads = [m.padding for m in modules if isinstance(m, torch.nn.ZeroPad2d)]
    assert pads and all(p[0] != p[1] for p in pads)  # only the asymmetric "same" paddings of strided convs stay


def test_efficientnet_bad_weights_file(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load EfficientNet-Lite0 weights"):
        get_encoder(f"efficientnet-lite0:{bad}")


def test_toy_judge_features_and_success_rate():
    encoder = get_encoder("toy-judge")
    images = _toy_images("stripes", 4, seed=2) + _toy_images("checker", 4, seed=3)
    feats = encoder.embed(images)
    _assert_unit(feats, 8)
    labels = encoder.classify(images)
    assert labels.shape == (8, 2) and labels.dtype == torch.int64
    assert encoder.success_rate(labels[:4], "stripes") >= 0.75
    assert encoder.success_rate(labels[4:], "stripes") <= 0.25
    assert encoder.success_rate(labels, "a-real-painter") is None
    # Larger images are resized to the judge's 32x32 input.
    assert encoder.embed([image.resize((64, 64)) for image in images[:2]]).shape == (2, feats.shape[1])


def test_efficientnet_is_not_a_classifier(efficientnet):
    with pytest.raises(ConfigError, match="not a concept classifier"):
        efficientnet.classify(_random_images(1))


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory) -> dict[str, str]:
    """Tiny randomly initialised CLIP and DINOv2 models with PIL image processors, saved locally (no download)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("hf-encoders")
    crop = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=8,
    ))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessorPil(**crop).save_pretrained(root / "clip")
    dino = Dinov2Model(Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    ))
    dino.save_pretrained(root / "dino")
    BitImageProcessorPil(**crop).save_pretrained(root / "dino")
    return {"clip": str(root / "clip"), "dino": str(root / "dino")}


@pytest.mark.parametrize(("name", "dim"), [("clip", 8), ("dino", 16)])
def test_transformers_encoders_on_tiny_random_models(tiny_hf_models, name, dim):
    encoder = get_encoder(f"{name}:{tiny_hf_models[name]}")
    images = _random_images(3)
    feats = encoder.embed(images)
    _assert_unit(feats, 3)
    assert feats.shape[1] == dim
    assert torch.allclose(encoder.embed(images), feats)
    assert encoder.cache_id.startswith(f"{name}-") and encoder.cache_id != name
    assert spec_cache_id(f"{name}:{tiny_hf_models[name]}") == encoder.cache_id  # known without loading weights


@pytest.mark.parametrize("name", ["clip", "dino"])
def test_transformers_encoders_report_unloadable_models(tmp_path, name):
    with pytest.raises(ConfigError, match=f"encoder '{name}' needs a model"):
        get_encoder(name)
    with pytest.raises(ModelError, match="does not exist"):
        get_encoder(f"{name}:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=f"cannot load {name} encoder from") as caught:
        get_encoder(f"{name}:{tmp_path / 'empty'}")
    assert "\n" not in str(caught.value)


def test_the_cache_id_of_a_spec_is_known_without_loading_weights():
    assert spec_cache_id("toy-judge") == get_encoder("toy-judge").cache_id == "toy-judge"
    with pytest.raises(ConfigError, match="nothing after ':'"):
        spec_cache_id("clip:")
